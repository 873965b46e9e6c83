"""The engine: requests in, tokens out, over one pipeline (one model replica).

An asyncio loop keeps up to `micro_batches` micro-batches in flight: whenever
one returns, its sequences get their tokens (streamed to their callers) and the
scheduler forms the next.  The same engine runs in one process (TP = PP = 1,
no Ray actors) or over TP x PP Ray actors; only the executor differs.

A worker that dies fails every request in flight with `EngineDeadError` and
the engine reports itself unhealthy: it never keeps accepting requests it
cannot serve.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
import uuid
from collections import deque
from pathlib import Path
from typing import AsyncIterator, Callable

from raypp.config import DeploymentConfig
from raypp.errors import UserError
from raypp.model.config import ModelConfig
from raypp.model.sampling_params import SamplingParams
from raypp.parallel.layout import make_layout
from raypp.runtime.block_manager import BlockManager
from raypp.runtime.checkpoint_dir import ensure_checkpoint
from raypp.runtime.driver_clock import DriverClock
from raypp.runtime.executors import Executor, LocalExecutor, RayExecutor
from raypp.runtime.kv_budget import kv_block_count
from raypp.runtime.outputs import QueueFullError, RequestOutput
from raypp.runtime.scheduler import MicroBatch, Scheduler, StepCost
from raypp.runtime.sequence import MAX_STEPS_IN_FLIGHT, Sequence, Status
from raypp.runtime.stage_balance import suggest_stage_layers
from raypp.runtime.request_stats import RequestTracker
from raypp.runtime.stats import EngineStats, PipelineStats


log = logging.getLogger("raypp")

# How often (in steps) the measured stage times are checked for a better layer split.
BALANCE_CHECK_STEPS = 512


class EngineDeadError(RuntimeError):
    """A worker failed and no rebuild is left; the engine cannot serve until it is restarted."""


class StepTimeoutError(RuntimeError):
    """No step came back within parallel.step_timeout_s."""


class Engine:
    def __init__(self, config: DeploymentConfig, model_path: Path, model_config: ModelConfig, executor: Executor,
                 num_blocks: int, max_model_len: int, stage_layers: tuple[int, ...],
                 make_executor: Callable[[], Executor] | None = None):
        num_stages = len(stage_layers)
        self.stage_layers = stage_layers
        self._suggested_split: list[int] | None = None
        self.config, self.model_path, self.model_config = config, model_path, model_config
        self.executor = executor
        self.max_model_len = max_model_len
        sched = config.scheduler
        self.blocks = BlockManager(num_blocks, sched.block_size)
        self.scheduler = Scheduler(self.blocks, sched.max_num_seqs, sched.max_tokens_per_micro_batch,
                                   config.micro_batches, num_stages, StepCost.for_model(model_config))
        # Each micro-batch's sequences may have their next step queued behind the one computing.
        self.max_steps_in_flight = MAX_STEPS_IN_FLIGHT * config.micro_batches
        self.driver = DriverClock()
        self._steps_in_flight: deque[tuple[MicroBatch, object, float]] = deque()   # (micro-batch, handle, sent)
        self.requests = RequestTracker()
        self.pipeline_stats = PipelineStats(num_stages, on_step=self.requests.on_step)
        self._seqs: dict[str, Sequence] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.error: BaseException | None = None
        self.tokens_generated = 0
        # Rebuilding after a worker failure (None: this executor cannot be rebuilt, e.g. in process).
        self._make_executor = make_executor
        self.rebuilds = 0
        self.rebuilding = False
        self._failure: BaseException | None = None     # found outside the step loop (a failed ping)
        self._last_progress = time.monotonic()          # a step came back, or work began

    @classmethod
    def from_config(cls, config: DeploymentConfig, use_ray: bool | None = None) -> "Engine":
        path = ensure_checkpoint(config)
        model_config = ModelConfig.from_dir(path)
        par = config.parallel
        layout = make_layout(model_config, par.tp, par.pp, par.stage_layers)
        max_model_len = min(config.model.max_model_len or model_config.max_position_embeddings,
                            model_config.max_position_embeddings)
        num_blocks = kv_block_count(model_config, layout, config, max_model_len)
        use_ray = layout.world_size > 1 if use_ray is None else use_ray
        make = functools.partial(RayExecutor if use_ray else LocalExecutor, str(path), config, layout, num_blocks)
        return cls(config, path, model_config, make(), num_blocks, max_model_len, layout.stage_layers,
                   make_executor=make if use_ray else None)

    # ---- requests -------------------------------------------------------------------------

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise UserError("prompt is empty: give at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise UserError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.model_config.vocab_size})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise UserError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                            f"exceeds the context length {self.max_model_len}")
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if total > capacity:
            raise UserError(f"prompt + max_tokens = {total} tokens exceeds the KV cache ({capacity} tokens)")

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if self.error is not None:
            raise EngineDeadError(f"engine is dead: {self.error!r}")
        self._validate(prompt_ids, params)
        if len(self.scheduler.waiting) >= self.config.scheduler.max_queue:
            raise QueueFullError(len(self.scheduler.waiting))
        rid = request_id or uuid.uuid4().hex
        if rid in self._seqs:
            raise UserError(f"request id {rid!r} is already running")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        seq = Sequence(rid, list(prompt_ids), params, seed, frozenset(self.model_config.eos_token_ids))
        queue: asyncio.Queue = asyncio.Queue()
        self._seqs[rid], self._queues[rid] = seq, queue
        self.scheduler.add(seq)
        clock = self.requests.start(seq)
        self._ensure_loop()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                clock.output(out)
                yield out
        finally:
            clock.close()
            if not finished:  # the caller went away (client disconnect, cancellation)
                self.abort(rid)
            self._seqs.pop(rid, None)
            self._queues.pop(rid, None)

    def abort(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is Status.FINISHED:
            return
        self.scheduler.abort(seq)
        self._emit(seq, [], None)

    def _emit(self, seq: Sequence, new_ids: list[int], new_logprobs: list[float] | None) -> None:
        queue = self._queues.get(seq.request_id)
        if queue is not None:
            queue.put_nowait(RequestOutput(seq.request_id, len(seq.prompt_ids), list(seq.output_ids), new_ids,
                                           new_logprobs, finished=seq.finish_reason is not None,
                                           finish_reason=seq.finish_reason))

    # ---- the step loop --------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def _run(self) -> None:
        """Runs steps; after a worker failure rebuilds the pipeline and resumes, up to max_rebuilds."""
        while True:
            try:
                await self._step_loop()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a worker died or stalled, or a step failed: never hang
                while True:
                    if self._make_executor is None or self.rebuilds >= self.config.parallel.max_rebuilds:
                        # Dead for good: give the workers and placement groups back now, not when
                        # Serve gets round to replacing the replica.
                        await asyncio.to_thread(self.executor.shutdown)
                        self._fail_all(e)
                        return
                    try:
                        await self._rebuild(e)
                        break
                    except Exception as again:  # e.g. no room left in the cluster for a stage
                        e = again

    async def _step_loop(self) -> None:
        # Steps come back in the order they were sent (every stage runs them in that order) and
        # are applied in that order, so a sequence's tokens arrive in sequence.  The queue lives on
        # the engine: steps still in flight when an event loop ends are awaited by the next one.
        queue = self._steps_in_flight
        timeout_s = self.config.parallel.step_timeout_s
        quiet = not queue
        head = None
        try:
            while True:
                if self._failure is not None:
                    failure, self._failure = self._failure, None
                    raise failure
                with self.driver.timed():
                    while len(queue) < self.max_steps_in_flight and (mb := self.scheduler.schedule()):
                        if not queue:
                            self._last_progress = time.monotonic()
                        mb.step.resumed = quiet
                        quiet = False
                        queue.append((mb, self.executor.submit(mb.step), time.perf_counter()))
                if not queue:
                    quiet = True
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._wake.clear()
                if head is None:
                    head = asyncio.ensure_future(self.executor.outputs(queue[0][1]))
                if not head.done():
                    waker = asyncio.ensure_future(self._wake.wait())
                    left = timeout_s - (time.monotonic() - self._last_progress)
                    await asyncio.wait([head, waker], timeout=max(0.0, left), return_when=asyncio.FIRST_COMPLETED)
                    waker.cancel()
                    if not head.done() and time.monotonic() - self._last_progress > timeout_s:
                        raise StepTimeoutError(f"no step came back for {timeout_s:g}s (parallel.step_timeout_s): "
                                               f"a worker is stalled or unreachable")
                if head.done():
                    outputs, head = head.result(), None
                    self._last_progress = time.monotonic()
                    with self.driver.timed():
                        mb, _, started = queue.popleft()
                        self._complete(mb, started, outputs)
        finally:
            if head is not None:
                head.cancel()

    async def _rebuild(self, cause: BaseException) -> None:
        """New workers for the whole pipeline; every unfinished request is recomputed from its prompt
        and the tokens already streamed, so its stream pauses and then continues (seeded sampling is
        stateless per token: the text is what an undisturbed run gives)."""
        self.rebuilds += 1
        self.rebuilding = True
        t0 = time.monotonic()
        log.warning("pipeline worker failure (%r): rebuilding the pipeline (%d of at most %d); "
                    "%d running and %d waiting requests resume", cause, self.rebuilds,
                    self.config.parallel.max_rebuilds, len(self.scheduler.running), len(self.scheduler.waiting))
        try:
            self._steps_in_flight.clear()
            self.scheduler.requeue_all()
            await asyncio.to_thread(self.executor.shutdown)
            self.executor = await asyncio.to_thread(self._make_executor)
        finally:
            self.rebuilding = False
            self._last_progress = time.monotonic()
        log.warning("pipeline rebuilt in %.1fs", time.monotonic() - t0)

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Returns once no step is in flight: a finished sequence's step behind it has come back and
        its blocks are free."""
        self._ensure_loop()
        deadline = time.monotonic() + timeout_s
        while self._steps_in_flight and self.error is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._steps_in_flight)} steps still in flight after {timeout_s:g}s")
            await asyncio.sleep(0.005)

    def _complete(self, mb: MicroBatch, started: float, outputs) -> None:
        carrier = next(o for o in outputs if o.token_ids is not None or not mb.step.sample_rows)
        ids, logprobs = carrier.token_ids or [], carrier.logprobs
        stage_timings = {}
        for o in outputs:  # TP rank 0 (the first reported) speaks for its stage
            stage_timings.setdefault(o.timing.stage, o.timing)
        self.pipeline_stats.record(list(stage_timings.values()), time.perf_counter() - started)
        self.driver.returned(max(t.end for t in stage_timings.values()))
        if self.driver.steps % BALANCE_CHECK_STEPS == 0:
            self._check_stage_balance()
        updated = self.scheduler.complete(mb, ids, logprobs)
        for seq in updated:
            self.tokens_generated += 1
            lp = seq.output_logprobs[-1:] if seq.params.logprobs else None
            self._emit(seq, seq.output_ids[-1:], lp)

    def _check_stage_balance(self) -> None:
        """Logs the layer split that would even out the stages when one is >10% above the mean."""
        busy = [st.busy_s / st.steps if st.steps else 0.0 for st in self.pipeline_stats.snapshot()]
        split = suggest_stage_layers(self.stage_layers, busy)
        if split is not None and split != self._suggested_split:
            log.warning("pipeline stages are unbalanced: busy ms per step %s with stage_layers %s; "
                        "set parallel.stage_layers: %s to balance them",
                        [round(b * 1e3, 1) for b in busy], list(self.stage_layers), split)
        self._suggested_split = split

    def _fail_all(self, error: BaseException) -> None:
        self.error = error
        dead = EngineDeadError(f"engine failed: {error!r}")
        for queue in self._queues.values():
            queue.put_nowait(dead)

    # ---- introspection and lifecycle ------------------------------------------------------

    async def check_health(self) -> None:
        """Raises EngineDeadError once the engine is dead for good (a failure with no rebuild left),
        or when it has work but no step came back for twice the step timeout (a stalled loop).
        A worker that does not answer a ping starts a rebuild; while one runs, this passes."""
        if self.error is not None:
            raise EngineDeadError(f"engine is dead: {self.error!r}")
        if self.rebuilding:
            return
        stalled = time.monotonic() - self._last_progress > 2 * self.config.parallel.step_timeout_s
        if self._steps_in_flight and stalled:
            raise EngineDeadError(f"no step came back for {time.monotonic() - self._last_progress:.0f}s")
        try:
            await self.executor.check_health()
        except Exception as e:
            self._failure = e
            self._ensure_loop()

    @property
    def state(self) -> str:
        """"ok", "rebuilding" (after a worker failure; requests wait) or "dead" (no rebuild left)."""
        return "dead" if self.error is not None else "rebuilding" if self.rebuilding else "ok"

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            micro_batches_in_flight=len(self._steps_in_flight),
            micro_batches=self.config.micro_batches,
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_free=self.blocks.num_free,
            preemptions=self.scheduler.num_preemptions,
            tokens_generated=self.tokens_generated,
            mean_step_time_s=self.pipeline_stats.mean_step_time_s(),
            requests=self.requests.totals(),
            stages=self.pipeline_stats.snapshot(),
            driver=self.driver.snapshot(),
            rebuilds=self.rebuilds,
        )

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.executor.shutdown()
