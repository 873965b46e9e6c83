"""The engine a benchmark drives: its layout as a DeploymentConfig, started in-process or on a
local Ray cluster, and the deterministic prompts every layout gets."""
from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterator

from raypp.errors import UserError

PROMPT_SEED = 1234


def env_defaults() -> None:
    """Ray must not phone home, and its components stay on loopback (docs/architecture.md)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"--model {path}: no such directory (make one with `raypp make-tiny --preset small DIR`)")
    if not (p / "config.json").is_file():
        raise UserError(f"--model {path}: no config.json there; give a Hugging Face format checkpoint directory")
    return p.resolve()


def make_config(model: str | os.PathLike, *, tp: int = 1, pp: int = 1, micro_batches: int | None = None,
                device: str = "cpu", cpus_per_worker: float = 1.0, max_num_seqs: int = 64,
                max_model_len: int | None = None, max_tokens_per_micro_batch: int = 512,
                dtype: str = "auto", step_transport: str = "socket"):
    """A DeploymentConfig for one benchmarked layout (validation errors become UserError)."""
    from pydantic import ValidationError

    from raypp.config import DeploymentConfig
    try:
        return DeploymentConfig.model_validate({
            "model": {"path": str(model), "dtype": dtype, "max_model_len": max_model_len},
            "parallel": {"tp": tp, "pp": pp, "device": device, "cpus_per_worker": cpus_per_worker,
                         "step_transport": step_transport},
            "scheduler": {"micro_batches": micro_batches, "max_num_seqs": max_num_seqs,
                          "max_tokens_per_micro_batch": max_tokens_per_micro_batch},
        })
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise UserError(f"bad benchmark layout: {errs}") from None


def describe_layout(config) -> str:
    p, s = config.parallel, config.scheduler
    return (f"TP={p.tp} PP={p.pp} micro_batches={config.micro_batches} device={p.device} "
            f"cpus_per_worker={p.cpus_per_worker:g} steps_over={p.step_transport} max_num_seqs={s.max_num_seqs} "
            f"token_budget={s.max_tokens_per_micro_batch}")


@contextlib.contextmanager
def open_engine(config, use_ray: bool | None = None, ray_num_cpus: int | None = None,
                log: Callable[[str], None] = print) -> Iterator:
    """An Engine for `config`; on Ray (a local cluster started here if none is running) when
    TP x PP > 1 or `use_ray`.  Shuts the engine, and a Ray cluster it started, down on exit."""
    env_defaults()
    from raypp.runtime.engine import Engine

    world = config.parallel.tp * config.parallel.pp
    use_ray = world > 1 if use_ray is None else use_ray
    started_ray = False
    engine = None
    try:
        if use_ray:
            import ray
            if not ray.is_initialized():
                cpus = ray_num_cpus or max(4, int(round(world * config.parallel.cpus_per_worker)))
                ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                         object_store_memory=100 * 2**20, log_to_driver=False)
                started_ray = True
        t0 = time.perf_counter()
        engine = Engine.from_config(config, use_ray=use_ray)
        log(f"[bench] engine up in {time.perf_counter() - t0:.1f}s: {describe_layout(config)}"
            f" ({'Ray actors' if use_ray else 'in-process'})")
        yield engine
    finally:
        if engine is not None:
            engine.shutdown()
        if started_ray:
            import ray
            ray.shutdown()


def make_prompts(vocab_size: int, n: int, length: int, seed: int = PROMPT_SEED) -> list[list[int]]:
    """n deterministic prompts of `length` ids, never a special id (0..2) -- the same recipe as
    the peers' common.make_prompts, so the same seed gives the same prompts."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(length)] for _ in range(n)]


def greedy(max_tokens: int):
    from raypp.model.sampling_params import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
