"""A load generator over HTTP: requests streamed through `raypp.client.AsyncClient`, timed by
their chunks, with the server's per-stage counters read before and after.

Requests are token-id prompts of a fixed length with a fixed number of output tokens (EOS
ignored), so every request costs the same and runs at different concurrencies compare.
At most `concurrency` are in flight; with a `rate` they also arrive as a Poisson process
(seeded) of that many requests per second, as a population of independent users would.
A token is timed when the chunk carrying it arrives: the server sends nothing for a token
whose text it holds back (a stop-string prefix, a partial character), so TTFT and the
inter-token latency (ITL) are what a streaming user sees.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from raypp.benchmark.stats import Summary, stage_delta
from raypp.client import AsyncClient, RayppError

# Prompt ids are drawn below this: every tokenizer raypp serves has more ids (the tiny
# checkpoints 2048), and 0..2 are special ids.
PROMPT_ID_LIMIT = 1024


def token_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, PROMPT_ID_LIMIT) for _ in range(length)] for _ in range(n)]


@dataclass
class RequestRecord:
    submit: float                                           # perf_counter when sent
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk with text
    end: float = 0.0
    output_tokens: int = 0                                  # the server's usage count
    error: str | None = None                                # the client's exception class name

    @property
    def ttft_s(self) -> float:
        return self.chunk_times[0] - self.submit

    @property
    def itls_s(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass(frozen=True)
class LevelResult:
    """One load level: `requests` sent = `succeeded` + `failed`."""
    concurrency: int
    rate: float | None
    requests: int
    succeeded: int
    failed: int
    errors: dict[str, int]               # exception class -> count
    input_len: int
    output_len: int
    wall_s: float
    output_tokens: int
    req_s: float
    output_tok_s: float
    ttft_ms: Summary
    itl_ms: Summary
    e2e_ms: Summary
    stages: list[dict] | None            # per-stage busy / bubble over the run (None: no /stats)
    timeline_s: list[float]              # every timed chunk's arrival, s after the start (for the plot)

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "timeline_s"}
        out.update(ttft_ms=self.ttft_ms.to_json(), itl_ms=self.itl_ms.to_json(), e2e_ms=self.e2e_ms.to_json(),
                   bubble_ratio=[s["bubble_ratio"] for s in self.stages] if self.stages else None)
        return out


@dataclass(frozen=True)
class Workload:
    requests: int
    input_len: int
    output_len: int
    rate: float | None = None
    seed: int = 0


async def _one(client: AsyncClient, prompt: list[int], output_len: int, rec: RequestRecord,
               on_token: Callable[[], None]) -> None:
    try:
        stream = await client.complete(prompt, max_tokens=output_len, temperature=0, ignore_eos=True, stream=True)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.text:
                rec.chunk_times.append(now)
                on_token()
            if chunk.usage is not None:
                rec.output_tokens = chunk.usage.completion_tokens
    except RayppError as e:
        rec.error = type(e).__name__
    rec.end = time.perf_counter()


async def _stats(client: AsyncClient):
    try:
        return (await client.stats()).stages
    except RayppError:   # a server without raypp's /stats still gets measured
        return None


async def run_level(client: AsyncClient, work: Workload, concurrency: int,
                    progress: Callable[[int, int, int, float], None] | None = None) -> LevelResult:
    """`work.requests` requests, at most `concurrency` in flight; progress(done, failed, tokens,
    elapsed_s) is called as requests finish."""
    prompts = token_prompts(work.requests, work.input_len, work.seed)
    gaps = random.Random(work.seed + 1)
    sem = asyncio.Semaphore(concurrency)
    records: list[RequestRecord] = []
    counts = {"done": 0, "failed": 0, "tokens": 0}

    def on_token() -> None:
        counts["tokens"] += 1

    async def one(prompt: list[int]) -> None:
        async with sem:
            rec = RequestRecord(time.perf_counter())
            records.append(rec)
            await _one(client, prompt, work.output_len, rec, on_token)
        counts["done"] += 1
        counts["failed"] += rec.error is not None
        if progress:
            progress(counts["done"], counts["failed"], counts["tokens"], time.perf_counter() - t0)

    before = await _stats(client)
    t0 = time.perf_counter()
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(one(p)))
        if work.rate:
            await asyncio.sleep(gaps.expovariate(work.rate))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    after = await _stats(client)
    ok = [r for r in records if r.error is None]
    errors: dict[str, int] = {}
    for r in records:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    return LevelResult(
        concurrency=concurrency, rate=work.rate, requests=len(records), succeeded=len(ok),
        failed=len(records) - len(ok), errors=dict(sorted(errors.items())), input_len=work.input_len,
        output_len=work.output_len, wall_s=wall, output_tokens=out_tokens, req_s=len(ok) / wall,
        output_tok_s=out_tokens / wall, ttft_ms=Summary.of([r.ttft_s for r in ok if r.chunk_times]),
        itl_ms=Summary.of([x for r in ok for x in r.itls_s]), e2e_ms=Summary.of([r.end - r.submit for r in ok]),
        stages=stage_delta(before, after) if before and after else None,
        timeline_s=sorted(t - t0 for r in ok for t in r.chunk_times))
