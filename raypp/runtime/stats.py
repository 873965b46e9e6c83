"""Pipeline bubble accounting: where each stage's time went.

Every worker reports a `StepTiming` per step.  Per stage we keep running
totals and a sliding window; the bubble ratio of a stage is its idle time
(waiting for the scheduler or for the previous stage) over the wall time its
steps spanned in the window.  PP=2 with one micro-batch reads ~50% (each stage
waits while the other works); with enough micro-batches in flight it drops
towards zero.  Time with no request at all is not a bubble: the first step
after the engine went quiet starts a new span.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from raypp.runtime.step import StepTiming


@dataclass
class StageTotals:
    steps: int = 0
    compute_s: float = 0.0
    comm_s: float = 0.0
    idle_s: float = 0.0           # waiting for the scheduler
    wait_s: float = 0.0           # waiting for the previous stage
    window: deque = field(default_factory=deque)   # (end, busy, idle, span)

    @property
    def busy_s(self) -> float:
        return self.compute_s + self.comm_s


class PipelineStats:
    def __init__(self, num_stages: int, window_s: float = 30.0):
        self.stages = [StageTotals() for _ in range(num_stages)]
        self.window_s = window_s
        self.step_times: deque[float] = deque(maxlen=256)

    def record(self, timings: list[StepTiming], step_time_s: float) -> None:
        """One micro-batch's timings: one per stage (TP rank 0 speaks for its stage)."""
        self.step_times.append(step_time_s)
        for t in timings:
            st = self.stages[t.stage]
            st.steps += 1
            st.compute_s += t.prep_s + t.compute_s
            st.comm_s += t.comm_s
            st.idle_s += t.idle_s
            st.wait_s += t.wait_s + t.token_wait_s
            busy, idle = t.busy_s, t.bubble_s
            st.window.append((t.end, busy, idle, busy + idle))
        self._trim(time.time())

    def _trim(self, now: float) -> None:
        for st in self.stages:
            while st.window and st.window[0][0] < now - self.window_s:
                st.window.popleft()

    def bubble_ratio(self, stage: int) -> float:
        w = self.stages[stage].window
        span = sum(x[3] for x in w)
        return sum(x[2] for x in w) / span if span > 0 else 0.0

    def snapshot(self) -> list[dict]:
        self._trim(time.time())
        return [{"stage": s, "steps": st.steps, "busy_s": st.busy_s, "compute_s": st.compute_s,
                 "comm_s": st.comm_s, "idle_s": st.idle_s + st.wait_s, "wait_prev_stage_s": st.wait_s,
                 "bubble_ratio": self.bubble_ratio(s)} for s, st in enumerate(self.stages)]

    def mean_step_time_s(self) -> float:
        return sum(self.step_times) / len(self.step_times) if self.step_times else 0.0
