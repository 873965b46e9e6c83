"""raypp's metrics through a real Prometheus: a live `serve run` of the tiny deployment
(at TP=1 x PP=2, one micro-batch) on a Ray head whose metrics agent Debian's `prometheus`
scrapes, under a short steady load.

One run (module fixture) serves every check: every metric in raypp.metrics is scraped,
every dashboard query answers, the stage counters are monotone and equal the engine's
own totals, busy + bubble tiles each stage's wall time, and PP=2 with one micro-batch
shows its bubble, stored by Prometheus as the engine's stats give it.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from raypp import metrics as M
from raypp.runtime.stats import EngineStats
from tests.monitoring_helpers import Prometheus, RayHead
from tests.serve_helpers import ServeRun, app_args, load_deployment

REPO = Path(__file__).resolve().parent.parent
LOAD_S = 40.0        # steady load; stats are compared between 25% and 90% of it
CLIENTS = 6
MAX_TOKENS = 24


@dataclass
class LiveRun:
    prom: Prometheus
    server: ServeRun
    load_start: float     # wall clock (time.time), what Prometheus timestamps use
    load_end: float
    early: tuple[float, EngineStats]   # (wall clock, /stats) while the load ran
    late: tuple[float, EngineStats]
    final: EngineStats                 # after the load, once the metrics were published
    errors: list[str]


def _stats(server: ServeRun) -> tuple[float, EngineStats]:
    t = time.time()
    return t, EngineStats.from_json(httpx.get(server.base_url + "/stats", timeout=30).json())


async def _load(base_url: str, until: float, errors: list[str]) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        async def one_client(k: int) -> None:
            i = 0
            while time.time() < until:
                body = {"model": "tiny", "prompt": f"Story {k}.{i}: once upon a time", "max_tokens": MAX_TOKENS,
                        "temperature": 0, "ignore_eos": True, "stream": i % 2 == 0}
                r = await client.post("/v1/completions", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                i += 1
        await asyncio.gather(*[one_client(k) for k in range(CLIENTS)])


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_ckpt):
    work = tmp_path_factory.mktemp("prometheus")
    config = load_deployment("tiny_cpu.yaml")
    args = app_args(config)
    args["model"] = {"path": str(tiny_ckpt), "served_name": "tiny"}
    # One micro-batch at PP=2: each stage idles while the other works, the bubble reads ~0.5.
    # A KV cache smaller than the load wants makes the scheduler preempt (the counter must show it).
    args["scheduler"].update(micro_batches=1, block_size=8, num_kv_blocks=24)
    # TP=1: on two shared cores a TP=2 all-reduce waits for its peer to be scheduled, and that
    # wait (counted as comm, i.e. busy) would blur the bubble this run measures.
    args["parallel"]["tp"] = 1
    head = RayHead(work)
    prom = None
    try:
        head.start()
        prom = Prometheus(work, [f"127.0.0.1:{head.metrics_port}"]).start()
        with ServeRun(config, work / "serve", address=head.address, ready_timeout_s=300) as server:
            errors: list[str] = []
            load_start = time.time()
            thread = threading.Thread(target=asyncio.run, args=(_load(server.base_url, load_start + LOAD_S, errors),))
            thread.start()
            time.sleep(LOAD_S * 0.25)
            early = _stats(server)
            time.sleep(LOAD_S * 0.65)
            late = _stats(server)
            thread.join(timeout=180)
            assert not thread.is_alive(), "the load did not finish"
            load_end = time.time()
            # Publisher (1 s) + Ray's report interval (1 s) + scrape (1 s): wait until Prometheus
            # has the engine's final totals.
            final = _stats(server)[1]
            busy = f"sum by (stage) ({M.STAGE_BUSY.exported})"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                got = {int(r["metric"]["stage"]): float(r["value"][1]) for r in prom.query(busy)}
                if len(got) == len(final.stages) and all(
                        got[s.stage] == pytest.approx(s.busy_s, rel=1e-6) for s in final.stages):
                    break
                time.sleep(1.0)
            yield LiveRun(prom, server, load_start, load_end, early, late, final, errors)
    finally:
        if prom is not None:
            prom.stop()
        head.stop()


def test_load_ran_without_errors_and_preempted(live):
    assert not live.errors, live.errors[:5]
    assert live.final.tokens_generated > 0 and live.final.preemptions > 0


def test_every_metric_is_scraped_with_its_labels(live):
    for metric in M.ALL:
        series = live.prom.query(metric.sample)
        assert series, f"{metric.sample} is not in Prometheus"
        for s in series:
            labels = s["metric"]
            assert labels["model"] == "tiny" and labels["replica"], labels
            assert set(metric.labels) <= set(labels), (metric.name, labels)
        if metric.labels == M.STAGE_LABELS:
            assert {s["metric"]["stage"] for s in series} == {"0", "1"}, metric.name


def _substitute(expr: str) -> str:
    # What Grafana does with the template variables (all values) and the rate interval.
    return expr.replace("$model", "tiny").replace("$replica", ".*").replace("$__rate_interval", "30s")


def test_every_dashboard_query_returns_data(live):
    dashboard = json.loads((REPO / "dashboards" / "raypp.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    at = live.load_end
    for expr in exprs:
        assert live.prom.query(_substitute(expr), at=at), f"no data at the end of the load: {expr}"
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"])
            assert live.prom.label_values(m.group(2), _substitute(m.group(1))), var["query"]


def test_stage_counters_are_monotone_and_equal_the_engine_totals(live):
    for metric, total in ((M.STAGE_BUSY, "busy_s"), (M.STAGE_BUBBLE, "bubble_s"), (M.STAGE_STEPS, "steps")):
        series = live.prom.query_range(f"sum by (stage) ({metric.exported})", live.load_start, time.time())
        assert len(series) == 2
        for s in series:
            values = [float(v) for _, v in s["values"]]
            assert len(values) > LOAD_S / 2, "too few samples to judge monotonicity"
            assert all(b >= a for a, b in zip(values, values[1:])), (metric.name, values)
            stage = live.final.stages[int(s["metric"]["stage"])]
            assert values[-1] == pytest.approx(getattr(stage, total), rel=1e-6), metric.name


def test_busy_plus_bubble_is_each_stages_wall_time(live):
    (t0, a), (t1, b) = live.early, live.late
    for sa, sb in zip(a.stages, b.stages):
        accounted = (sb.busy_s + sb.bubble_s) - (sa.busy_s + sa.bubble_s)
        assert accounted == pytest.approx(t1 - t0, rel=0.10), (sb.stage, accounted, t1 - t0)


def test_one_micro_batch_at_pp2_shows_its_bubble_and_prometheus_stores_it(live):
    """At one micro-batch the faster stage idles for the slower one.  Not a fixed 0.5: under a
    live load, requests admitted while a step is in flight form a second group whose steps fill
    part of the gaps (the scheduler never holds them back), and on two busy cores the last stage
    (head and sampling, and the one the HTTP side preempts) is the slower one."""
    (_, a), (_, b) = live.early, live.late
    deltas = [{k: getattr(sb, k) - getattr(sa, k) for k in ("steps", "busy_s", "compute_s", "comm_s", "idle_s",
                                                           "wait_prev_stage_s", "wait_tokens_s", "bubble_s")}
              for sa, sb in zip(a.stages, b.stages)]
    shown = [{k: round(v, 3) for k, v in d.items()} for d in deltas]
    ratios = [d["bubble_s"] / (d["busy_s"] + d["bubble_s"]) for d in deltas]
    assert max(ratios) > 0.2, shown
    # The gauge Prometheus stores (30 s window) says the same near the end of the load.
    stored = live.prom.query(f"max by (stage) ({M.STAGE_BUBBLE_RATIO.exported})", at=live.load_end - 2)
    assert len(stored) == 2
    for r in stored:
        assert float(r["value"][1]) == pytest.approx(ratios[int(r["metric"]["stage"])], abs=0.15), (r, shown)