"""A request's life in the engine: arrival, queue, first token, each next token, finish.

Totals (prompt tokens, finishes by reason) feed `EngineStats.requests`;
each latency is kept until a metrics publisher takes it for a histogram.  Times are
`time.perf_counter()` seconds.

Queue time ends when the scheduler first takes the request out of its waiting
queue (`Sequence.admitted_at`); the engine collects it at the next completed step
(`on_step`).
"""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

from raypp.runtime.outputs import RequestOutput
from raypp.runtime.sequence import Sequence, Status
from raypp.runtime.stats import RequestStats

# Bounded: an engine without a metrics publisher (in-process, benchmarks) keeps only the latest.
_PENDING = 65536


@dataclass(frozen=True)
class Latencies:
    """Latencies observed since the last `take`, for histograms."""
    queue_s: list[float]
    ttft_s: list[float]
    itl_s: list[float]
    e2e_s: list[float]


class RequestTracker:
    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.finished: Counter[str] = Counter()
        self._queued: dict[str, tuple[Sequence, float]] = {}
        self._queue_s: deque[float] = deque(maxlen=_PENDING)
        self._ttft_s: deque[float] = deque(maxlen=_PENDING)
        self._itl_s: deque[float] = deque(maxlen=_PENDING)
        self._e2e_s: deque[float] = deque(maxlen=_PENDING)

    def start(self, seq: Sequence) -> "RequestClock":
        now = time.perf_counter()
        self.prompt_tokens += len(seq.prompt_ids)
        self._queued[seq.request_id] = (seq, now)
        return RequestClock(self, seq.request_id, now)

    def on_step(self) -> None:
        """After every completed step: requests the scheduler has taken end their queue time."""
        if not self._queued:
            return
        for rid, (seq, arrival) in list(self._queued.items()):
            if seq.status is not Status.WAITING:
                del self._queued[rid]
                if seq.admitted_at is not None:
                    self._queue_s.append(seq.admitted_at - arrival)

    def totals(self) -> RequestStats:
        return RequestStats(self.prompt_tokens, tuple(sorted(self.finished.items())))

    def take(self) -> Latencies:
        out = Latencies(list(self._queue_s), list(self._ttft_s), list(self._itl_s), list(self._e2e_s))
        for d in (self._queue_s, self._ttft_s, self._itl_s, self._e2e_s):
            d.clear()
        return out


class RequestClock:
    """One request's timestamps; `output` is called with each RequestOutput it yields."""

    def __init__(self, tracker: RequestTracker, request_id: str, arrival: float):
        self.tracker, self.request_id, self.arrival = tracker, request_id, arrival
        self.last_token: float | None = None

    def output(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        tr = self.tracker
        n = len(out.new_token_ids)
        if n:
            if self.last_token is None:
                tr._ttft_s.append(now - self.arrival)
            else:
                # Tokens that arrive together share the gap, as vLLM counts them.
                tr._itl_s.extend([(now - self.last_token) / n] * n)
            self.last_token = now
        if out.finished and out.finish_reason is not None:
            tr.finished[out.finish_reason] += 1
            tr._e2e_s.append(now - self.arrival)

    def close(self) -> None:
        """The request left the engine (finished, aborted or failed)."""
        self.tracker._queued.pop(self.request_id, None)
