"""`raypp bench`: a load generator over the in-process Engine API, and the measurement code
the scripts in benchmarks/ share.

    raypp bench --model DIR [--tp N --pp N --micro-batches M --device cpu] \
        --concurrency C --input-len L --output-len N --out benchmarks/results/NAME.json

One run measures, for one layout:

- batch-1 latency: decode ms/token = (t(N new) - t(1 new)) / (N - 1) for one L-token prompt,
  the formula of the peer benchmarks (../shared/peers/common.py), median of --reps;
- throughput under load: C requests in flight (closed loop, --num-requests in all, each
  L prompt tokens and N new tokens, greedy, EOS ignored): output tokens / wall time, prefill
  included; TTFT and inter-token latency (ITL) per request;
- per-stage busy / idle time and the bubble ratio (idle / (busy + idle)) over the whole run
  and over the steady decode window (from the moment the first C requests have had one decode
  step each, i.e. 2 tokens, to the first request that finishes), from `Engine.stats()`.

It writes a JSON file and a PNG next to it (cumulative tokens over time, TTFT/ITL
distribution, per-stage busy/idle).  Layouts with TP x PP > 1 (or --ray) run on a local Ray
cluster started here (one CPU per worker by default) and shut down at the end.

Everything below `run()`'s helpers is importable: `benchmarks/model_decode.py` and
`benchmarks/pipeline_scaling.py` build on `make_config`, `open_engine`, `decode_latency`,
`run_load` and the plotting helpers instead of keeping their own copies.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from raypp.errors import UserError
from raypp.runtime.stats import StageStats

PROMPT_SEED = 1234


# ---------------------------------------------------------------------------------- setup

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
                dtype: str = "auto"):
    """A DeploymentConfig for one benchmarked layout (validation errors become UserError)."""
    from pydantic import ValidationError

    from raypp.config import DeploymentConfig
    try:
        return DeploymentConfig.model_validate({
            "model": {"path": str(model), "dtype": dtype, "max_model_len": max_model_len},
            "parallel": {"tp": tp, "pp": pp, "device": device, "cpus_per_worker": cpus_per_worker},
            "scheduler": {"micro_batches": micro_batches, "max_num_seqs": max_num_seqs,
                          "max_tokens_per_micro_batch": max_tokens_per_micro_batch},
        })
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise UserError(f"bad benchmark layout: {errs}") from None


def describe_layout(config) -> str:
    p, s = config.parallel, config.scheduler
    return (f"TP={p.tp} PP={p.pp} micro_batches={config.micro_batches} device={p.device} "
            f"cpus_per_worker={p.cpus_per_worker:g} max_num_seqs={s.max_num_seqs} "
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


# ---------------------------------------------------------------------------------- measurement

@dataclass
class RequestTrace:
    submit: float                                        # perf_counter when submitted
    token_times: list[float] = field(default_factory=list)  # arrival time of every output token
    ids: list[int] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.submit

    @property
    def itls_s(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2e_s(self) -> float:
        return self.token_times[-1] - self.submit


async def trace_request(engine, prompt: list[int], params, on_token: Callable | None = None) -> RequestTrace:
    tr = RequestTrace(time.perf_counter())
    async for out in engine.generate(prompt, params):
        now = time.perf_counter()
        for t in out.new_token_ids:
            tr.token_times.append(now)
            tr.ids.append(t)
            if on_token:
                on_token(tr, now)
    return tr


def _stage_totals(engine) -> list[StageStats]:
    return engine.stats().stages


_DELTA_FIELDS = ("steps", "busy_s", "compute_s", "comm_s", "idle_s", "wait_prev_stage_s", "wait_tokens_s",
                 "bubble_s")


def stage_delta(before: list[StageStats], after: list[StageStats]) -> list[dict]:
    """Per-stage time between two snapshots, as the results' JSON records; bubble ratio =
    bubble / (busy + bubble), bubble = scheduler idle + waiting for another stage."""
    out = []
    for b, a in zip(before, after):
        d = {"stage": a.stage, **{k: getattr(a, k) - getattr(b, k) for k in _DELTA_FIELDS}}
        span = d["busy_s"] + d["bubble_s"]
        d["bubble_ratio"] = d["bubble_s"] / span if span > 0 else 0.0
        d["busy_ms_per_step"] = d["busy_s"] / d["steps"] * 1e3 if d["steps"] else None
        d["bubble_ms_per_step"] = d["bubble_s"] / d["steps"] * 1e3 if d["steps"] else None
        out.append(d)
    return out


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarize(xs: list[float], scale: float = 1e3) -> dict:
    """mean/p50/p90/p99 (x scale, default ms)."""
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "mean": statistics.fmean(xs) * scale, "p50": _pct(xs, 50) * scale,
            "p90": _pct(xs, 90) * scale, "p99": _pct(xs, 99) * scale}


@dataclass
class LoadResult:
    concurrency: int
    num_requests: int
    input_len: int
    output_len: int
    wall_s: float
    output_tokens: int
    traces: list[RequestTrace]
    stages_run: list[dict]            # per-stage busy/idle over the whole run
    stages_steady: list[dict] | None  # ... over the steady decode window (None if there was none)
    engine_step_ms: float             # mean time from a micro-batch's submission to its return (engine's view)
    steady_window_s: tuple[float, float] | None  # relative to the run's start
    t0: float

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    def to_json(self) -> dict:
        ttft = [t.ttft_s for t in self.traces]
        itl = [x for t in self.traces for x in t.itls_s]
        steady_tok = None
        if self.steady_window_s:
            a, b = self.steady_window_s
            n = sum(1 for t in self.traces for x in t.token_times if a <= x - self.t0 <= b)
            steady_tok = n / (b - a) if b > a else None
        return {
            "concurrency": self.concurrency, "num_requests": self.num_requests,
            "input_len": self.input_len, "output_len": self.output_len,
            "wall_s": self.wall_s, "output_tokens": self.output_tokens, "engine_step_ms": self.engine_step_ms,
            "output_tok_s": self.output_tok_s,
            "steady_decode_tok_s": steady_tok,
            "steady_window_s": list(self.steady_window_s) if self.steady_window_s else None,
            "ttft_ms": summarize(ttft), "itl_ms": summarize(itl),
            "e2e_ms": summarize([t.e2e_s for t in self.traces]),
            "stages_run": self.stages_run,
            "stages_steady": self.stages_steady,
            "bubble_ratio_run": [s["bubble_ratio"] for s in self.stages_run],
            "bubble_ratio_steady": [s["bubble_ratio"] for s in self.stages_steady] if self.stages_steady else None,
        }

    def timeline(self) -> list[float]:
        """Every output token's arrival time, seconds after the run's start, sorted."""
        return sorted(x - self.t0 for t in self.traces for x in t.token_times)


async def run_load(engine, prompts: list[list[int]], output_len: int, concurrency: int,
                   num_requests: int | None = None, progress_every_s: float = 5.0,
                   log: Callable[[str], None] = print, label: str = "") -> LoadResult:
    """Closed loop: `concurrency` requests in flight until `num_requests` (default: one wave,
    = concurrency) have finished; request i uses prompts[i % len(prompts)]."""
    num_requests = num_requests or concurrency
    params = greedy(output_len)
    sem = asyncio.Semaphore(concurrency)
    started = [0]        # requests with a second token
    finished = [0]
    tokens = [0]
    marks: dict[str, tuple[float, list[dict]]] = {}
    steady_start_after = min(concurrency, num_requests)

    def on_token(tr: RequestTrace, now: float) -> None:
        tokens[0] += 1
        # The steady window opens once the first wave has had one decode step each (2 tokens):
        # a stage's first decode step still waits for the later stages' prefill, which is
        # pipeline fill, not steady-state bubble.
        if len(tr.token_times) == 2:
            started[0] += 1
            if started[0] == steady_start_after:
                marks["steady_start"] = (now, _stage_totals(engine))

    async def one(i: int) -> RequestTrace:
        async with sem:
            tr = await trace_request(engine, prompts[i % len(prompts)], params, on_token)
        finished[0] += 1
        if "steady_end" not in marks:
            marks["steady_end"] = (time.perf_counter(), _stage_totals(engine))
        return tr

    async def reporter(t0: float) -> None:
        while True:
            await asyncio.sleep(progress_every_s)
            dt = time.perf_counter() - t0
            log(f"[bench]{label} {dt:6.1f}s: {finished[0]}/{num_requests} requests done, "
                f"{tokens[0]} tokens ({tokens[0] / dt:.1f} tok/s)")

    before = _stage_totals(engine)
    t0 = time.perf_counter()
    rep = asyncio.ensure_future(reporter(t0)) if progress_every_s > 0 else None
    try:
        traces = await asyncio.gather(*(one(i) for i in range(num_requests)))
    finally:
        if rep:
            rep.cancel()
    wall = time.perf_counter() - t0
    after = _stage_totals(engine)
    steady = window = None
    if "steady_start" in marks and marks["steady_end"][0] > marks["steady_start"][0]:
        steady = stage_delta(marks["steady_start"][1], marks["steady_end"][1])
        window = (marks["steady_start"][0] - t0, marks["steady_end"][0] - t0)
    return LoadResult(concurrency, num_requests, len(prompts[0]), output_len, wall,
                      sum(len(t.ids) for t in traces), list(traces), stage_delta(before, after),
                      steady, engine.stats().mean_step_time_s * 1e3, window, t0)


async def generate_timed(engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """All prompts at once; wall seconds and the generated ids (in prompt order)."""
    params = greedy(new_tokens)

    async def one(p):
        ids = []
        async for out in engine.generate(p, params):
            ids += out.new_token_ids
        return ids

    t = time.perf_counter()
    ids = await asyncio.gather(*(one(p) for p in prompts))
    dt = time.perf_counter() - t
    assert all(len(x) == new_tokens for x in ids), [len(x) for x in ids]
    return dt, list(ids)


async def decode_latency(engine, prompt: list[int], new_tokens: int, reps: int, warmup: bool = True) -> dict:
    """Batch-1 decode ms/token = (t(new) - t(1 new)) / (new - 1), median of reps (the peers' formula:
    prefill and the first token are subtracted).  One warm-up of each shape first."""
    if new_tokens < 2:
        raise UserError("batch-1 decode latency needs --output-len >= 2")
    if warmup:
        await generate_timed(engine, [prompt], new_tokens)
        await generate_timed(engine, [prompt], 1)
    t_full, t_first, per_tok = [], [], []
    ids = None
    for _ in range(reps):
        t_n, ids_n = await generate_timed(engine, [prompt], new_tokens)
        t_1, _ = await generate_timed(engine, [prompt], 1)
        t_full.append(t_n)
        t_first.append(t_1)
        per_tok.append((t_n - t_1) / (new_tokens - 1) * 1e3)
        ids = ids_n[0]
    return {"decode_ms_per_token": statistics.median(per_tok), "decode_ms_per_token_reps": per_tok,
            "e2e_s": statistics.median(t_full), "prefill_plus_first_token_s": statistics.median(t_first),
            "ids": ids}


async def batch_throughput(engine, prompts: list[list[int]], new_tokens: int, reps: int,
                           warmup: bool = True) -> dict:
    """All prompts submitted at once: output tokens / wall s (prefill included), median of reps."""
    if warmup:
        await generate_timed(engine, prompts, new_tokens)
    tps, walls = [], []
    for _ in range(reps):
        dt, ids = await generate_timed(engine, prompts, new_tokens)
        walls.append(dt)
        tps.append(sum(len(x) for x in ids) / dt)
    return {"output_tok_s": statistics.median(tps), "output_tok_s_reps": tps, "e2e_s": statistics.median(walls)}


# ---------------------------------------------------------------------------------- step capture (profiling)

class StepRecorder:
    """Keeps a copy of every StepInput the engine sends to its executor, so a decode step
    can be replayed on an in-process worker under a profiler."""

    def __init__(self, engine):
        self.steps = []
        self._engine = engine
        self._orig = engine.executor.submit

        def submit(step):
            self.steps.append(copy.deepcopy(step))
            return self._orig(step)

        engine.executor.submit = submit

    def close(self) -> None:
        self._engine.executor.submit = self._orig

    def decode_steps(self, batch: int) -> list:
        return [s for s in self.steps if len(s.query_lens) == batch and all(q == 1 for q in s.query_lens)]


def profile_step(worker, step, iters: int = 20, row_limit: int = 15) -> dict:
    """Replay one StepInput on an in-process StageWorker: wall time of execute() and of its parts
    (metadata build, model forward, sampling), and torch.profiler's top ops by self CPU time.
    The replay rewrites the same K/V into the same cache slots: harmless once the run is over."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from raypp.model.attention import AttentionMetadata
    from raypp.model.sampling import sample

    def timed(fn, n=iters):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    for _ in range(3):
        worker.execute(step)
    meta_args = (step.query_lens, step.seq_lens, step.block_tables, worker.block_size)
    meta = AttentionMetadata.build(*meta_args)
    x = torch.tensor(step.token_ids, dtype=torch.long)
    with torch.inference_mode():
        logits = worker.model(x, meta)
        parts = {
            "execute_ms": timed(lambda: worker.execute(step)),
            "metadata_build_ms": timed(lambda: AttentionMetadata.build(*meta_args)),
            "forward_ms": timed(lambda: worker.model(x, meta)),
            "sample_ms": timed(lambda: sample(logits, step.params, step.seeds, step.output_positions)),
        }
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                worker.execute(step)
    ka = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in ka) / iters / 1e3
    rows = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:row_limit]
    top = [{"op": e.key, "calls_per_step": e.count / iters, "self_cpu_ms_per_step": e.self_cpu_time_total / iters / 1e3}
           for e in rows]
    n_ops = sum(e.count for e in ka) / iters
    parts.update({"batch": len(step.query_lens), "context_len": max(step.seq_lens),
                  "profiler_self_cpu_ms_per_step": total_self, "ops_per_step": n_ops, "top_ops": top,
                  "table": ka.table(sort_by="self_cpu_time_total", row_limit=row_limit)})
    return parts


# ---------------------------------------------------------------------------------- plotting

def _plt():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_bench(result: dict, load: LoadResult, path: str | os.PathLike) -> str | None:
    """Three panels: cumulative output tokens over time (steady window shaded), TTFT and ITL
    distributions, per-stage busy vs idle time.  Returns the path, or None without matplotlib."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    tl = load.timeline()
    ax[0].plot(tl, range(1, len(tl) + 1), lw=1.5)
    if load.steady_window_s:
        ax[0].axvspan(*load.steady_window_s, color="tab:green", alpha=0.15, label="steady decode")
        ax[0].legend(loc="upper left")
    ax[0].set(xlabel="s since start", ylabel="output tokens (cumulative)",
              title=f"{load.output_tok_s:.1f} tok/s at concurrency {load.concurrency}")
    ttft = sorted(t.ttft_s * 1e3 for t in load.traces)
    itl = sorted(x * 1e3 for t in load.traces for x in t.itls_s)
    for xs, name in ((ttft, "TTFT"), (itl, "ITL")):
        if xs:
            ax[1].plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
    ax[1].set(xscale="log", xlabel="ms", ylabel="fraction of requests/tokens", title="TTFT and ITL (CDF)")
    ax[1].legend()
    stages = load.stages_steady or load.stages_run
    idx = [s["stage"] for s in stages]
    busy = [s["busy_s"] for s in stages]
    bubble = [s["bubble_s"] for s in stages]
    ax[2].bar(idx, busy, label="busy (compute + comm)")
    ax[2].bar(idx, bubble, bottom=busy, label="bubble (idle + waiting)")
    for i, s in zip(idx, stages):
        ax[2].text(i, s["busy_s"] + s["bubble_s"], f"{s['bubble_ratio']:.1%}", ha="center", va="bottom")
    ax[2].set(xticks=idx, xlabel="pipeline stage", ylabel="s",
              title="stage time, " + ("steady decode window" if load.stages_steady else "whole run"))
    ax[2].legend(loc="lower right")
    fig.suptitle(result.get("title", ""))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_json(obj: dict, path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2) + "\n")


def host_info() -> dict:
    import platform

    import torch
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu,
            "ncpu": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


# ---------------------------------------------------------------------------------- the command

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face format)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (default 1)")
    p.add_argument("--micro-batches", type=int, default=None, help="micro-batches in flight (default: pp)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs (torch threads) per worker; in-process runs use this many torch threads")
    p.add_argument("--ray", action="store_true", help="run even TP=PP=1 on a Ray actor (default: in-process)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--num-requests", type=int, default=None, help="requests in all (default: = concurrency)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="new tokens per request (EOS ignored)")
    p.add_argument("--token-budget", type=int, default=None,
                   help="scheduler.max_tokens_per_micro_batch (default: max(512, concurrency x input-len))")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the batch-1 latency measurement")
    p.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency measurement")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up wave")
    p.add_argument("--seed", type=int, default=PROMPT_SEED, help="prompt seed")
    p.add_argument("--out", default="benchmarks/results/bench.json", help="JSON path; the PNG goes beside it")


def _check_args(args) -> Path:
    for name in ("tp", "pp", "concurrency", "input_len", "output_len", "reps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.micro_batches is not None and args.micro_batches < 1:
        raise UserError(f"--micro-batches must be >= 1, got {args.micro_batches}")
    if args.num_requests is not None and args.num_requests < 1:
        raise UserError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    if not str(args.out).endswith(".json"):
        raise UserError(f"--out {args.out}: give a .json path (the PNG is written beside it)")
    model = check_model_dir(args.model)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device here; use --device cpu")
    return model


def run(args) -> int:
    env_defaults()
    model = _check_args(args)
    import torch

    from raypp.model.config import ModelConfig

    cfg = ModelConfig.from_dir(model)
    world = args.tp * args.pp
    use_ray = world > 1 or args.ray
    if not use_ray:
        torch.set_num_threads(max(1, int(args.cpus_per_worker)))
    budget = args.token_budget or max(512, args.concurrency * args.input_len)
    max_len = args.input_len + args.output_len
    if max_len > cfg.max_position_embeddings:
        raise UserError(f"--input-len + --output-len = {max_len} exceeds the model's context "
                        f"({cfg.max_position_embeddings})")
    config = make_config(model, tp=args.tp, pp=args.pp, micro_batches=args.micro_batches, device=args.device,
                         cpus_per_worker=args.cpus_per_worker, max_num_seqs=max(args.concurrency, 1),
                         max_model_len=max_len, max_tokens_per_micro_batch=budget)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot create its directory ({e.strerror})") from None
    n_req = args.num_requests or args.concurrency
    prompts = make_prompts(cfg.vocab_size, max(n_req, 1), args.input_len, args.seed)
    title = (f"raypp bench: {model.name} {describe_layout(config)}; concurrency {args.concurrency}, "
             f"{args.input_len} in / {args.output_len} out")
    print(title, flush=True)

    def log(msg):
        print(msg, flush=True)

    async def main(engine):
        res = {}
        if not args.no_warmup:
            log("[bench] warm-up: one wave")
            await generate_timed(engine, prompts[: args.concurrency], min(args.output_len, 8))
        if not args.no_latency and args.output_len >= 2:
            log(f"[bench] batch-1 latency: {args.reps} x (t({args.output_len} new) - t(1 new))")
            lat = await decode_latency(engine, prompts[0], args.output_len, args.reps, warmup=not args.no_warmup)
            res["batch1"] = {k: v for k, v in lat.items() if k != "ids"}
            res["batch1"]["first_ids"] = lat["ids"][:16]
            log(f"[bench] batch-1 decode {lat['decode_ms_per_token']:.2f} ms/token, "
                f"prefill+first token {lat['prefill_plus_first_token_s'] * 1e3:.1f} ms")
        log(f"[bench] load: {n_req} requests, {args.concurrency} in flight")
        load = await run_load(engine, prompts, args.output_len, args.concurrency, n_req, log=log)
        res["load"] = load.to_json()
        return res, load

    t0 = time.perf_counter()
    with open_engine(config, use_ray=use_ray, log=log) as engine:
        startup = time.perf_counter() - t0
        res, load = asyncio.run(main(engine))
    result = {
        "title": title, "argv": sys.argv, "args": vars(args),
        "model": str(model), "layout": {"tp": args.tp, "pp": args.pp, "micro_batches": config.micro_batches,
                                        "device": args.device, "cpus_per_worker": args.cpus_per_worker,
                                        "executor": "ray" if use_ray else "in-process",
                                        "token_budget": budget},
        "host": host_info(), "startup_s": startup, **res,
    }
    png = plot_bench(result, load, out.with_suffix(".png"))
    result["png"] = png
    write_json(result, out)
    ld = res["load"]
    bub = ld["bubble_ratio_steady"] or ld["bubble_ratio_run"]
    print("\nsummary")
    if "batch1" in res:
        print(f"  batch-1 decode      {res['batch1']['decode_ms_per_token']:.2f} ms/token")
    print(f"  throughput          {ld['output_tok_s']:.1f} output tok/s (concurrency {args.concurrency}, "
          f"prefill included); steady decode {ld['steady_decode_tok_s'] or float('nan'):.1f} tok/s")
    print(f"  TTFT p50/p90        {ld['ttft_ms']['p50']:.1f} / {ld['ttft_ms']['p90']:.1f} ms")
    if ld["itl_ms"]["n"]:
        print(f"  ITL p50/p90         {ld['itl_ms']['p50']:.1f} / {ld['itl_ms']['p90']:.1f} ms")
    print("  bubble per stage    " + ", ".join(f"{b:.1%}" for b in bub)
          + (" (steady decode window)" if ld["bubble_ratio_steady"] else " (whole run)"))
    print(f"  wrote {out}" + (f" and {png}" if png else " (no PNG: matplotlib is not installed)"))
    return 0
