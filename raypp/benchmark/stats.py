"""Percentiles of latencies, and what each pipeline stage did between two stats snapshots."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from raypp.runtime.stats import StageStats


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no samples."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, xs: list[float], scale: float = 1e3) -> "Summary":
        """mean and percentiles of xs x scale (default: seconds in, ms out)."""
        if not xs:
            return cls(0, None, None, None, None)
        return cls(len(xs), statistics.fmean(xs) * scale, *(percentile(xs, q) * scale for q in (50, 90, 99)))

    def to_json(self) -> dict:
        return {"n": 0} if not self.n else {"n": self.n, "mean": self.mean, "p50": self.p50, "p90": self.p90,
                                            "p99": self.p99}


def summarize(xs: list[float], scale: float = 1e3) -> dict:
    """mean/p50/p90/p99 (x scale, default ms) as the results' JSON record."""
    return Summary.of(xs, scale).to_json()


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
