"""The `cpu-epyc-2core` factors as `live_fit.fit` makes them from raypp's own recorded runs.

benchmarks/planner_vs_measured.py records, for one calibration layout of the `small` checkpoint
(one core per worker), the per-stage totals of each load phase.  Fitting them, starting from what
cpu_probe.py and the runtime's benchmarks measured (`hardware.CPU_PROBED`), gives the factors the
catalog ships (`hardware._CPU_EFF`); tests/test_planner_perf.py refits the record and compares.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from raypp.layout import Layout
from raypp.planner.balance import balanced_split
from raypp.planner.hardware import CPU_PROBED, DEVICES, LINKS, Efficiency
from raypp.planner.layout import Cluster
from raypp.planner.live_fit import Phase, fit
from raypp.planner.models import PRESETS

RECORD = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "planner_vs_measured.json"
CPU = DEVICES["cpu-epyc-2core"]


def small_layout(spec: str) -> Layout:
    """"TPxPP" -> the layout raypp runs for `small`: 8 layers and a 4k vocabulary split equally."""
    tp, pp = (int(x) for x in spec.lower().split("x"))
    return Layout(tp, pp, tuple(balanced_split(PRESETS["small"].layers, pp)))


def fit_small(layout: Layout, phases: list[Phase]) -> Efficiency:
    """The factors of `small`'s phases on one core per worker.  The fit starts from what was measured
    before any deployment (`CPU_PROBED`), not from the shipped factors, which are its own result."""
    dev = replace(CPU, efficiency=CPU_PROBED)
    cluster = Cluster(dev, layout.world_size, 1, LINKS[dev.intra_link], LINKS[dev.network])
    return fit(PRESETS["small"], layout, cluster, phases, "fp32")


def fit_record(path: Path = RECORD) -> Efficiency:
    """The fit of the calibration phases recorded by benchmarks/planner_vs_measured.py."""
    data = json.loads(Path(path).read_text())
    return fit_small(small_layout(data["calibration_layout"]), [Phase(**ph) for ph in data["calibration_phases"]])


if __name__ == "__main__":
    print(fit_record())
