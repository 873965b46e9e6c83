"""Writes dashboards/raypp.json, raypp's Grafana dashboard, with grafana-foundation-sdk.

    python dashboards/generate.py          # rewrites dashboards/raypp.json

Every query names its metric through `raypp.metrics`, so a renamed metric cannot
leave a panel behind.  Templated on the Prometheus data source, `model` and
`replica`; Ray adds its own labels (WorkerId, NodeAddress, ...), so every query
aggregates to the labels it shows.  tests/test_metrics_prometheus.py runs every
query against a real Prometheus scraping a live server.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef, VariableRefresh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from raypp import metrics as M  # noqa: E402

OUT = Path(__file__).resolve().parent / "raypp.json"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'model=~"$model", replica=~"$replica"'
RATE = "$__rate_interval"


def _sel(metric: M.Metric, suffix: str = "") -> str:
    return f"{metric.exported}{suffix}{{{SEL}}}"


def _rate(metric: M.Metric, by: str, suffix: str = "") -> str:
    return f"sum by ({by}) (rate({_sel(metric, suffix)}[{RATE}]))"


def _quantiles(metric: M.Metric) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, {_rate(metric, 'le', '_bucket')})", f"p{round(q * 100)}")
            for q in (0.5, 0.9, 0.99)]


def panel(title: str, unit: str, targets: list[tuple[str, str]], *, description: str = "", stacked: bool = False,
          max_val: float | None = None) -> timeseries.Panel:
    p = (timeseries.Panel().title(title).description(description).unit(unit).datasource(DS).height(8).span(12)
         .min(0).fill_opacity(30 if stacked else 10)
         .legend(common_b.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                 .placement(common.LegendPlacement.BOTTOM).show_legend(True)))
    if stacked:
        p = p.stacking(common_b.StackingConfig().mode(common.StackingMode.NORMAL))
    if max_val is not None:
        p = p.max(max_val)
    for ref, (expr, legend) in zip("ABCDEFGH", targets):
        p = p.with_target(prometheus.Dataquery().ref_id(ref).expr(expr).legend_format(legend).datasource(DS))
    return p


def variable(name: str, query: str) -> dash.QueryVariable:
    return (dash.QueryVariable(name).label(name).query(query).datasource(DS).multi(True).include_all(True)
            .all_value(".*").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))


def build() -> dict:
    d = (dash.Dashboard("raypp").uid("raypp").tags(["raypp", "llm", "ray"]).refresh("10s").time("now-30m", "now")
         .tooltip(DashboardCursorSync.CROSSHAIR)
         .description("raypp serving: throughput, latency, queue, KV cache, and per-stage pipeline bubble.")
         .with_variable(dash.DatasourceVariable("datasource").label("data source").type("prometheus"))
         .with_variable(variable("model", f"label_values({M.NUM_REQUESTS_RUNNING.exported}, model)"))
         .with_variable(variable("replica",
                                 f'label_values({M.NUM_REQUESTS_RUNNING.exported}{{model=~"$model"}}, replica)'))
         .with_row(dash.Row("Requests"))
         .with_panel(panel("Token throughput", "tokens/s", [
             (_rate(M.GENERATION_TOKENS, "replica"), "generated {{replica}}"),
             (_rate(M.PROMPT_TOKENS, "replica"), "prompt {{replica}}")]))
         .with_panel(panel("Requests finished", "reqps", [
             (_rate(M.REQUEST_SUCCESS, "finished_reason"), "{{finished_reason}}")]))
         .with_panel(panel("Time to first token", "s", _quantiles(M.TIME_TO_FIRST_TOKEN)))
         .with_panel(panel("Inter-token latency", "s", _quantiles(M.INTER_TOKEN_LATENCY)))
         .with_panel(panel("End-to-end request latency", "s", _quantiles(M.E2E_REQUEST_LATENCY)))
         .with_panel(panel("Queue time", "s", _quantiles(M.REQUEST_QUEUE_TIME),
                           description="Arrival to first scheduled, at one step's resolution."))
         .with_panel(panel("Queue depth", "short", [
             (f"sum by (replica) ({_sel(M.NUM_REQUESTS_RUNNING)})", "running {{replica}}"),
             (f"sum by (replica) ({_sel(M.NUM_REQUESTS_WAITING)})", "waiting {{replica}}")]))
         .with_panel(panel("KV-cache usage", "percentunit", [
             (f"max by (replica) ({_sel(M.KV_CACHE_USAGE)})", "{{replica}}")], max_val=1))
         .with_panel(panel("Preemptions", "short", [
             (_rate(M.NUM_PREEMPTIONS, "replica"), "{{replica}}")],
             description="Sequences evicted when the KV cache is full (recomputed later). Sustained: "
                         "raise kv_memory_gb or lower max_num_seqs."))
         .with_row(dash.Row("Pipeline"))
         .with_panel(panel("Stage time: busy vs bubble", "percentunit", [
             (_rate(M.STAGE_BUSY, "stage"), "stage {{stage}} busy"),
             (_rate(M.STAGE_BUBBLE, "stage"), "stage {{stage}} bubble")], stacked=True,
             description="Seconds per second of each stage: busy (compute + comm) and bubble (idle or waiting "
                         "for another stage). Summed over replicas: a stage of R replicas totals R."))
         .with_panel(panel("Bubble ratio per stage", "percentunit", [
             (f"max by (replica, stage) ({_sel(M.STAGE_BUBBLE_RATIO)})", "{{replica}} stage {{stage}}")],
             max_val=1, description="bubble / (busy + bubble) over the last 30 s. PP=2 with one micro-batch "
                                    "reads 0.5; see docs/operations.md for what to change."))
         .with_panel(panel("Step time", "s", _quantiles(M.STEP_TIME),
                           description="One micro-batch through every stage and back."))
         .with_panel(panel("Micro-batches in flight", "short", [
             (f"sum by (replica) ({_sel(M.MICRO_BATCHES_IN_FLIGHT)})", "{{replica}}")]))
         .with_panel(panel("Driver time", "percentunit", [
             (_rate(M.DRIVER_BUSY, "replica"), "{{replica}}")],
             description="Seconds per second the replica's driver spends forming steps and applying tokens. "
                         "Off the pipeline's critical path, but CPU the workers lose on small hosts."))
         .with_panel(panel("Pipeline rebuilds", "short", [
             (f"max by (replica) ({_sel(M.PIPELINE_REBUILDS)})", "{{replica}}")],
             description="Rebuilds after a worker died or stalled; each paused the replica's streams. "
                         "At parallel.max_rebuilds the replica reports unhealthy and Serve replaces it.")))
    return json.loads(json.dumps(d.build(), cls=JSONEncoder))


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
