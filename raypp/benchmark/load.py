"""Load over the in-process Engine API: closed-loop requests timed token by token, the steady
decode window, batch-1 decode latency and batch throughput."""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from raypp.benchmark.engine import greedy
from raypp.benchmark.stats import stage_delta, summarize
from raypp.errors import UserError
from raypp.runtime.stats import StageStats


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
