"""Publishes one replica's engine stats as Ray metrics (`raypp.metrics` names) every second.

Counters are raised by the difference between two `EngineStats` snapshots, so a
counter equals the engine's own total (what `/stats` shows) at every publish;
histograms take the latencies observed since the previous publish.  A one-second
period keeps the cost negligible next to a decode step, and Ray's agent exports on
its own period anyway (`RAY_metrics_report_interval_ms`, 10 s by default).
"""
from __future__ import annotations

import asyncio
import logging

from ray.util import metrics as ray_metrics

from raypp import metrics as M
from raypp.runtime.engine import Engine
from raypp.runtime.stats import EngineStats

logger = logging.getLogger("ray.serve")

_RAY_TYPES = {M.Kind.COUNTER: ray_metrics.Counter, M.Kind.GAUGE: ray_metrics.Gauge,
              M.Kind.HISTOGRAM: ray_metrics.Histogram}


def _make(metric: M.Metric, model: str, replica: str):
    kwargs = {"boundaries": list(metric.buckets)} if metric.kind is M.Kind.HISTOGRAM else {}
    m = _RAY_TYPES[metric.kind](metric.name, description=metric.help, tag_keys=metric.labels, **kwargs)
    m.set_default_tags({"model": model, "replica": replica})
    return m


class MetricsPublisher:
    def __init__(self, engine: Engine, model: str, replica: str, period_s: float = 1.0):
        self.engine, self.period_s = engine, period_s
        self._m = {metric: _make(metric, model, replica) for metric in M.ALL}
        self._last: EngineStats | None = None

    def _inc(self, metric: M.Metric, now: float, before: float, tags: dict[str, str] | None = None) -> None:
        if now > before:
            self._m[metric].inc(now - before, tags=tags)

    def publish(self) -> None:
        s = self.engine.stats()
        last = self._last
        m = self._m
        m[M.NUM_REQUESTS_RUNNING].set(s.running)
        m[M.NUM_REQUESTS_WAITING].set(s.waiting)
        m[M.KV_CACHE_USAGE].set(s.kv_cache_usage)
        m[M.MICRO_BATCHES_IN_FLIGHT].set(s.micro_batches_in_flight)
        m[M.PIPELINE_REBUILDS].set(s.rebuilds)
        self._inc(M.DRIVER_BUSY, s.driver.busy_s, last.driver.busy_s if last else 0.0)
        self._inc(M.NUM_PREEMPTIONS, s.preemptions, last.preemptions if last else 0)
        self._inc(M.PROMPT_TOKENS, s.requests.prompt_tokens, last.requests.prompt_tokens if last else 0)
        self._inc(M.GENERATION_TOKENS, s.tokens_generated, last.tokens_generated if last else 0)
        before = dict(last.requests.finished) if last else {}
        for reason, count in s.requests.finished:
            self._inc(M.REQUEST_SUCCESS, count, before.get(reason, 0), {"finished_reason": reason})
        for st in s.stages:
            prev = last.stages[st.stage] if last else None
            tags = {"stage": str(st.stage), "tp_rank": str(st.tp_rank)}
            self._inc(M.STAGE_STEPS, st.steps, prev.steps if prev else 0, tags)
            self._inc(M.STAGE_BUSY, st.busy_s, prev.busy_s if prev else 0.0, tags)
            self._inc(M.STAGE_BUBBLE, st.bubble_s, prev.bubble_s if prev else 0.0, tags)
            if st.steps:
                m[M.STAGE_BUBBLE_RATIO].set(st.bubble_ratio, tags=tags)
        lat = self.engine.requests.take()
        for metric, values in ((M.REQUEST_QUEUE_TIME, lat.queue_s), (M.TIME_TO_FIRST_TOKEN, lat.ttft_s),
                               (M.INTER_TOKEN_LATENCY, lat.itl_s), (M.E2E_REQUEST_LATENCY, lat.e2e_s),
                               (M.STEP_TIME, self.engine.pipeline_stats.take_step_times())):
            for v in values:
                m[metric].observe(v)
        self._last = s

    async def run(self) -> None:
        while True:
            try:
                self.publish()
            except Exception:  # metrics must never take the replica down; say so and go on
                logger.exception("raypp: publishing metrics failed")
            await asyncio.sleep(self.period_s)
