"""Where steps run: in this process (TP = PP = 1), or on TP x PP Ray actors.

Both `submit` a `StepInput` at once and hand back a handle whose `outputs` (every
worker's `StepOutput`) can be awaited later, from any event loop: a step in flight
outlives the loop that sent it (a caller's `asyncio.run` may end first).  The Ray
executor sends the step to all workers at once, each runs its steps in submission
order, so stage 1 starts micro-batch k (blocking on the activations from stage 0)
while stage 0 already computes k+1: the pipeline.  Only the small step metadata
travels from the driver (by default over a socket per worker, `step_channel.py`;
or as Ray actor calls); activations go stage to stage by torch.distributed.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Protocol

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raypp.config import DeploymentConfig
from raypp.errors import WorkerSetupError
from raypp.layout import Layout
from raypp.parallel.placement import create_stage_groups, remove_groups, worker_bundle
from raypp.runtime.step import StepInput, StepOutput
from raypp.runtime.step_channel import StepClient, StepServer, settled
from raypp.runtime.worker import StageWorker


class Executor(Protocol):
    """What the engine needs of the workers: send a step, await its outputs, ping, stop."""

    def submit(self, step: StepInput) -> Any:
        """Starts the step on every worker at once; returns a handle for `outputs`."""

    async def outputs(self, handle: Any) -> list[StepOutput]:
        """Every worker's output of a submitted step; raises if a worker failed."""

    async def check_health(self) -> None:
        """Raises if a worker does not answer."""

    def shutdown(self) -> None:
        """Stops every worker and frees what they reserved; safe to call twice."""


class LocalExecutor:
    def __init__(self, model_path: str, config: DeploymentConfig, layout: Layout, num_blocks: int):
        self.worker = StageWorker(model_path, config.model.dtype, layout, 0, 0, num_blocks,
                                  config.scheduler.block_size, config.parallel.device, progress=True,
                                  cuda_graph_max_batch=config.parallel.cuda_graph_max_batch)
        # One thread keeps the event loop (HTTP streams, new requests) responsive during a step
        # and runs the steps in flight one after another, in submission order.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raypp-step")

    def submit(self, step: StepInput) -> Future:
        return self._thread.submit(self.worker.execute, step)

    async def outputs(self, handle: Future) -> list[StepOutput]:
        return [await settled(handle)]

    async def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


class StageActor:
    """Ray actor around one StageWorker."""

    def rendezvous_address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, rank: int, world_size: int, address: tuple[str, int], threads: int, backend: str,
              timeout_s: float, worker_args: dict) -> dict:
        import torch
        import torch.distributed as dist
        # Ray sets OMP_NUM_THREADS=1 in actors; a CPU worker uses the CPUs its bundle reserved.
        self.threads = threads
        torch.set_num_threads(threads)
        dist.init_process_group(backend, init_method=f"tcp://{address[0]}:{address[1]}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        self.worker = StageWorker(**worker_args)
        return {"rank": rank, "bytes_loaded": self.worker.bytes_loaded, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def execute(self, step: StepInput) -> StepOutput:
        return self.worker.execute(step)

    def open_step_server(self, token: str) -> tuple[str, int]:
        """Starts serving steps on a socket (step_channel.py); returns its address."""
        import torch
        # OpenMP's thread count is per thread: the serving thread sets its own.
        self.step_server = StepServer(self.worker.execute, lambda: torch.set_num_threads(self.threads), token)
        return ray.util.get_node_ip_address(), self.step_server.port

    def wait_until_killed(self) -> None:
        """Never returns: the driver holds this call's result so that Ray tells it when this worker
        is gone (process, node), which a socket to an orphaned process would not."""
        threading.Event().wait()

    def ping(self) -> bool:
        return True


class ActorCalls:
    """Steps as plain Ray actor calls (parallel.step_transport: ray)."""

    def __init__(self, actors: list):
        self.actors = actors

    def submit(self, step: StepInput) -> list[ray.ObjectRef]:
        # By value: a step is a few KB, so Ray inlines it in each call; a ray.put into the object
        # store first costs the driver twice the CPU (benchmarks/ray_call_cost.py).
        return [a.execute.remote(step) for a in self.actors]

    async def outputs(self, refs: list[ray.ObjectRef]) -> list[StepOutput]:
        return await asyncio.gather(*refs)

    def close(self) -> None:
        pass


class RayExecutor:
    def __init__(self, model_path: str, config: DeploymentConfig, layout: Layout, num_blocks: int):
        par = config.parallel
        self.step_timeout_s = par.step_timeout_s
        self.steps: StepClient | ActorCalls | None = None
        # Named per executor: several replicas (or engines) share one Ray namespace.
        self.groups = create_stage_groups(layout.tp, layout.pp, par, name=f"raypp-{uuid.uuid4().hex[:8]}")
        bundle = worker_bundle(par)
        extra = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        actor_cls = ray.remote(StageActor)
        self.actors = []
        try:
            for stage in range(layout.pp):
                for tp_rank in range(layout.tp):
                    strategy = PlacementGroupSchedulingStrategy(self.groups[stage], placement_group_bundle_index=tp_rank)
                    self.actors.append(actor_cls.options(
                        num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), resources=extra,
                        scheduling_strategy=strategy, name=None,
                        # Over the socket a thread of its own holds `wait_until_killed`; over
                        # actor calls one thread keeps the steps in order.
                        max_concurrency=2 if par.step_transport == "socket" else 1).remote())
            address = ray.get(self.actors[0].rendezvous_address.remote(), timeout=par.setup_timeout_s)
            backend = "nccl" if par.device == "cuda" else "gloo"
            threads = max(1, int(par.cpus_per_worker))
            # A collective or point-to-point wait longer than a step may take is a dead peer.
            setups = [
                actor.setup.remote(rank, layout.world_size, address, threads, backend, par.step_timeout_s, dict(
                    model_path=model_path, dtype=config.model.dtype, layout=layout, stage=rank // layout.tp,
                    tp_rank=rank % layout.tp, num_blocks=num_blocks, block_size=config.scheduler.block_size,
                    device=par.device, timeout_s=par.step_timeout_s, cuda_graph_max_batch=par.cuda_graph_max_batch))
                for rank, actor in enumerate(self.actors)]
            self.worker_info = self._wait_setup(setups, layout, par.setup_timeout_s, address[0], model_path)
            if par.step_transport == "socket":
                token = uuid.uuid4().hex
                addresses = ray.get([a.open_step_server.remote(token) for a in self.actors],
                                    timeout=par.setup_timeout_s)
                self.steps = StepClient(addresses, token, connect_timeout_s=par.setup_timeout_s)
                watches = [a.wait_until_killed.remote() for a in self.actors]
                threading.Thread(target=self._watch, args=(self.steps, watches), name="raypp-watch",
                                 daemon=True).start()
            else:
                self.steps = ActorCalls(self.actors)
        except BaseException:
            self.shutdown()
            raise

    @staticmethod
    def _wait_setup(setups: list, layout: Layout, timeout_s: float, host: str, model_path: str) -> list[dict]:
        """Every worker's setup, or an error naming the worker that failed and why."""
        ready, pending = ray.wait(setups, num_returns=len(setups), timeout=timeout_s)
        for rank, ref in enumerate(setups):
            if ref in ready:
                try:
                    ray.get(ref)
                except Exception as e:
                    cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause else e
                    raise WorkerSetupError(
                        f"worker rank {rank} (stage {rank // layout.tp}, tp rank {rank % layout.tp}) failed to "
                        f"start from {model_path}: {type(cause).__name__}: {cause}") from None
        if pending:
            late = [rank for rank, ref in enumerate(setups) if ref in pending]
            raise WorkerSetupError(
                f"worker setup (process groups, weight loading) of ranks {late} did not finish within "
                f"{timeout_s:g}s (parallel.setup_timeout_s): raise it for large checkpoints on slow storage, "
                f"or check that every node can reach {host}")
        return ray.get(setups)

    @staticmethod
    def _watch(steps: StepClient, watches: list) -> None:
        """Fails the steps once Ray reports a worker dead (killed, or its node lost)."""
        (done, *_), _ = ray.wait(watches, num_returns=1, timeout=None)
        try:
            ray.get(done)
        except Exception as e:
            steps.fail(f"worker rank {watches.index(done)} is gone: {type(e).__name__}")

    def submit(self, step: StepInput) -> list:
        return self.steps.submit(step)

    async def outputs(self, handles: list) -> list[StepOutput]:
        return await self.steps.outputs(handles)

    async def check_health(self) -> None:
        # Over actor calls a ping waits behind the steps queued on its actor: allow what a step may take.
        await asyncio.wait_for(asyncio.gather(*[a.ping.remote() for a in self.actors]), self.step_timeout_s)

    def shutdown(self) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        remove_groups(self.groups)
        self.groups = []
