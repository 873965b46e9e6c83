"""Where each pipeline stage's time went: typed totals, a sliding bubble ratio, step times.

Every worker reports a `StepTiming` per step; TP rank 0 speaks for its stage.  A
stage's time splits into busy (prep + compute + comm) and bubble: idle (the
scheduler had nothing for it), waiting for the previous stage's activations, and
(stage 0) waiting for sampled ids from the last stage.  Consecutive steps tile the
wall clock, so busy + bubble equals the time a stage spanned, except across a
`resumed` step: time with no request at all is not a bubble.

The bubble ratio of a stage is bubble / (busy + bubble) over the last `window_s`
seconds.  PP=2 with one micro-batch reads ~0.5 (each stage waits while the other
works); with enough micro-batches in flight it drops towards zero.

`EngineStats` / `StageStats` are the one typed snapshot that `/stats`, the Prometheus
metrics and the benchmarks all read.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from raypp.runtime.driver_clock import DriverStats
from raypp.runtime.step import StepTiming


@dataclass(frozen=True)
class StageStats:
    stage: int
    tp_rank: int                 # the TP rank whose timings speak for the stage
    steps: int
    busy_s: float                # prep + compute + comm
    compute_s: float             # prep + compute
    comm_s: float                # TP all-reduces + sends to the next stage
    idle_s: float                # the scheduler had nothing queued for this stage
    wait_prev_stage_s: float     # blocked on the previous stage's activations
    wait_tokens_s: float         # stage 0: blocked on sampled ids from the last stage
    bubble_s: float              # idle + both waits
    bubble_ratio: float          # bubble / (busy + bubble) over the sliding window
    prep_s: float = 0.0          # of compute_s, host-side work per step that does not scale with tokens


@dataclass(frozen=True)
class RequestStats:
    """Request-lifecycle totals since the engine started."""
    prompt_tokens: int = 0
    finished: tuple[tuple[str, int], ...] = ()   # (finish reason, count), sorted by reason


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    micro_batches_in_flight: int
    micro_batches: int
    kv_blocks_total: int
    kv_blocks_free: int
    preemptions: int
    tokens_generated: int
    mean_step_time_s: float
    requests: RequestStats
    stages: list[StageStats]
    driver: DriverStats = DriverStats()   # the driver's own time per step (off the pipeline's critical path)
    rebuilds: int = 0                     # pipeline rebuilds after worker failures

    @classmethod
    def from_json(cls, d: dict) -> "EngineStats":
        """The inverse of `dataclasses.asdict` (what `/stats` serves)."""
        req = d["requests"]
        return cls(**{**d, "requests": RequestStats(req["prompt_tokens"], tuple(map(tuple, req["finished"]))),
                      "stages": [StageStats(**st) for st in d["stages"]], "driver": DriverStats(**d.get("driver", {}))})

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV-cache blocks in use, 0..1 (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.kv_blocks_free / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass
class _StageTotals:
    tp_rank: int = 0
    steps: int = 0
    compute_s: float = 0.0
    prep_s: float = 0.0
    comm_s: float = 0.0
    idle_s: float = 0.0
    wait_prev_stage_s: float = 0.0
    wait_tokens_s: float = 0.0
    # Sliding window of (end, bubble, span) with running sums, so a snapshot costs O(1).
    window: deque = field(default_factory=deque)
    window_bubble_s: float = 0.0
    window_span_s: float = 0.0


class PipelineStats:
    # Step times not yet taken by a metrics publisher; bounded so an engine without one
    # (in-process, benchmarks) does not grow without limit.
    PENDING_STEP_TIMES = 65536

    def __init__(self, num_stages: int, window_s: float = 30.0, on_step: Callable[[], None] | None = None):
        self.on_step = on_step   # called after every recorded step (the request tracker's queue clock)
        self._stages = [_StageTotals() for _ in range(num_stages)]
        self.window_s = window_s
        self.step_times: deque[float] = deque(maxlen=256)
        self.pending_step_times: deque[float] = deque(maxlen=self.PENDING_STEP_TIMES)

    def record(self, timings: list[StepTiming], step_time_s: float) -> None:
        """One micro-batch's timings: one per stage (TP rank 0 speaks for its stage)."""
        self.step_times.append(step_time_s)
        self.pending_step_times.append(step_time_s)
        for t in timings:
            st = self._stages[t.stage]
            st.tp_rank = t.tp_rank
            st.steps += 1
            st.compute_s += t.prep_s + t.compute_s
            st.prep_s += t.prep_s
            st.comm_s += t.comm_s
            st.idle_s += t.idle_s
            st.wait_prev_stage_s += t.wait_s
            st.wait_tokens_s += t.token_wait_s
            bubble, span = t.bubble_s, t.busy_s + t.bubble_s
            st.window.append((t.end, bubble, span))
            st.window_bubble_s += bubble
            st.window_span_s += span
        self._trim(time.time())
        if self.on_step is not None:
            self.on_step()

    def _trim(self, now: float) -> None:
        for st in self._stages:
            while st.window and st.window[0][0] < now - self.window_s:
                _, bubble, span = st.window.popleft()
                st.window_bubble_s -= bubble
                st.window_span_s -= span

    def snapshot(self) -> list[StageStats]:
        self._trim(time.time())
        out = []
        for s, st in enumerate(self._stages):
            bubble = st.idle_s + st.wait_prev_stage_s + st.wait_tokens_s
            # Running sums drift by float rounding; an empty window is exactly zero.
            ratio = st.window_bubble_s / st.window_span_s if st.window and st.window_span_s > 0 else 0.0
            out.append(StageStats(stage=s, tp_rank=st.tp_rank, steps=st.steps, busy_s=st.compute_s + st.comm_s,
                                  compute_s=st.compute_s, prep_s=st.prep_s, comm_s=st.comm_s, idle_s=st.idle_s,
                                  wait_prev_stage_s=st.wait_prev_stage_s, wait_tokens_s=st.wait_tokens_s,
                                  bubble_s=bubble, bubble_ratio=min(max(ratio, 0.0), 1.0)))
        return out

    def take_step_times(self) -> list[float]:
        """Step times recorded since the last call (for a histogram)."""
        out = list(self.pending_step_times)
        self.pending_step_times.clear()
        return out

    def mean_step_time_s(self) -> float:
        return sum(self.step_times) / len(self.step_times) if self.step_times else 0.0
