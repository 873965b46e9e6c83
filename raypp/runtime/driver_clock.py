"""Where the driver's own time goes: the per-step cost that no worker sees.

`busy_s` is the driver's time forming steps, sending them and applying their
tokens; `return_latency_s` is how long a step's result takes from the end of the
last stage to the driver (Ray's return path and the driver's event loop).  With
tokens returning from the last stage to stage 0 directly, neither is on the
pipeline's critical path any more; they still take CPU from the workers on a
machine with few cores.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class DriverStats:
    steps: int = 0
    busy_s: float = 0.0
    return_latency_s: float = 0.0

    def per_step_ms(self) -> tuple[float, float]:
        """(busy, return latency) in ms per step."""
        n = max(self.steps, 1)
        return self.busy_s / n * 1e3, self.return_latency_s / n * 1e3


class DriverClock:
    def __init__(self):
        self.steps = 0
        self.busy_s = 0.0
        self.return_latency_s = 0.0

    @contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.busy_s += time.perf_counter() - start

    def returned(self, last_stage_end: float) -> None:
        """A step came back; `last_stage_end` is the wall clock (time.time) its last stage finished."""
        self.steps += 1
        self.return_latency_s += max(0.0, time.time() - last_stage_end)

    def snapshot(self) -> DriverStats:
        return DriverStats(self.steps, self.busy_s, self.return_latency_s)
