"""dashboards/raypp.json is what dashboards/generate.py writes, and asks only for raypp's metrics.

(That every query returns data from a live server is tests/test_metrics_prometheus.py.)
"""
import importlib.util
import json
import re
from pathlib import Path

from raypp import metrics as M

REPO = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("dashboard_generate", REPO / "dashboards" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_dashboard_is_the_generated_one():
    committed = json.loads((REPO / "dashboards" / "raypp.json").read_text())
    assert committed == _generator().build(), "run `python dashboards/generate.py` and commit dashboards/raypp.json"


def test_every_query_names_only_defined_metrics_and_the_operator_panels_exist():
    d = json.loads((REPO / "dashboards" / "raypp.json").read_text())
    exported = {m.exported for m in M.ALL}
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bray_raypp_\w+", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert base in exported, f"{name} in {expr!r} is not defined in raypp/metrics.py"
            used.add(base)
        assert 'model=~"$model"' in expr and 'replica=~"$replica"' in expr, expr
    # Everything an operator reads off the dashboard (the step counter is for alerts and ad-hoc queries).
    assert used == exported - {M.STAGE_STEPS.exported}
    titles = {p["title"] for p in d["panels"]}
    assert {"Token throughput", "Time to first token", "Inter-token latency", "End-to-end request latency",
            "Queue depth", "KV-cache usage", "Stage time: busy vs bubble", "Bubble ratio per stage", "Preemptions",
            "Step time"} <= titles
    stacked = next(p for p in d["panels"] if p["title"] == "Stage time: busy vs bubble")
    assert stacked["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "model", "replica"]
