"""Fit a device's efficiency factors to what a live raypp deployment measured.

Input: per-stage totals over a load phase (the deltas of the engine's typed stats
between two snapshots) at one or more concurrencies.  The model predicts each
stage's busy time per step from `perf.stage_forward`; the fit picks the factors
that minimise the worst |log(predicted / measured)| over every stage and phase:

  compute per step   weight/KV bytes / (BW * eta_bw) + layers * per-layer overhead
                     (+ the per-step cost on stage 0), decode and prefill steps mixed
                     in the proportions the phase ran them
  comm per step      TP all-reduces + the send to the next stage, fitted as eta_link
  throughput         tokens / wall clock of each phase: raises the per-step cost by what
                     happens outside the stages (driver, inter-process hops)

Pure arithmetic: the HTTP side lives in raypp/calibrate.py.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, fields, replace

from raypp.planner.hardware import Device, Efficiency
from raypp.layout import Layout
from raypp.planner.layout import Cluster, Workload, stage_shapes
from raypp.planner.models import ModelSpec
from raypp.planner.perf import predict, stage_forward


@dataclass(frozen=True)
class Phase:
    """One load phase: `concurrency` requests kept in flight, and what each stage did."""
    concurrency: int
    micro_batches: int
    input_len: int
    output_len: int
    prefills: int                  # prompts prefilled during the phase
    steps: list[int]               # per stage: forwards run
    compute_s: list[float]         # per stage: prep + compute
    comm_s: list[float]            # per stage: TP all-reduces + sends
    bubble_ratio: list[float]      # per stage: bubble / (busy + bubble)
    tokens: int                    # output tokens generated
    wall_s: float


@dataclass(frozen=True)
class Row:
    phase: int
    stage: int
    what: str                      # "compute" | "comm"
    measured: float                # s per step
    predicted: float

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1.0


def _per_step(model: ModelSpec, layout: Layout, cluster: Cluster, ph: Phase, dtype: str):
    """Predicted (compute, comm) per stage per step: decode and prefill steps in the phase's mix."""
    wl = Workload(dtype=dtype, kv_dtype=dtype, concurrency=ph.concurrency, input_len=ph.input_len,
                  output_len=ph.output_len)
    shapes = stage_shapes(model, layout, wl)
    b = max(1, math.ceil(ph.concurrency / ph.micro_batches))
    ctx = ph.input_len + ph.output_len / 2
    out = []
    for s, sh in enumerate(shapes):
        if ph.steps[s] == 0:          # nothing measured on this stage in this phase
            out.append((0.0, 0.0))
            continue
        dec = stage_forward(sh, s, layout, cluster, wl, b, 1, ctx, False)
        pre = stage_forward(sh, s, layout, cluster, wl, 1, ph.input_len, 0.0, True)
        n_pre = min(ph.prefills, ph.steps[s])
        n_dec = ph.steps[s] - n_pre
        comp = (n_dec * dec.compute + n_pre * pre.compute) / ph.steps[s]
        comm = (n_dec * (dec.all_reduce + dec.send) + n_pre * (pre.all_reduce + pre.send)) / ph.steps[s]
        out.append((comp, comm))
    return out


def rows(model: ModelSpec, layout: Layout, cluster: Cluster, phases: list[Phase], dtype: str) -> list[Row]:
    out = []
    for i, ph in enumerate(phases):
        for s, (comp, comm) in enumerate(_per_step(model, layout, cluster, ph, dtype)):
            if ph.steps[s] == 0:
                continue
            out.append(Row(i, s, "compute", ph.compute_s[s] / ph.steps[s], comp))
            if ph.comm_s[s] > 0 and comm > 0:
                out.append(Row(i, s, "comm", ph.comm_s[s] / ph.steps[s], comm))
    return out


def _worst(rs: list[Row], what: str) -> float:
    errs = [abs(math.log(r.predicted / r.measured)) for r in rs if r.what == what]
    return max(errs) if errs else 0.0


def _geom(lo: float, hi: float, n: int) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def _distance(eff: Efficiency, base: Efficiency) -> float:
    names = ("bw", "layer_overhead_decode", "layer_overhead_prefill", "step_overhead")
    return sum(abs(math.log((getattr(eff, n) + 1e-6) / (getattr(base, n) + 1e-6))) for n in names)


def fit(model: ModelSpec, layout: Layout, cluster: Cluster, phases: list[Phase], dtype: str) -> Efficiency:
    """Grid search; compute factors first (the comm terms do not depend on them), then eta_link.

    One layout cannot tell bandwidth from per-layer overhead (every stage has both in the
    same ratio), so among the factor sets within 1% of the best worst-error the one
    closest to the catalog's is kept: the measurements move what they determine, the
    rest stays as measured by cpu_probe or fitted to published numbers."""
    if not phases or not any(sum(ph.steps) for ph in phases):
        raise ValueError("no steps measured: run load against the deployment before fitting")
    base = cluster.device.efficiency

    def with_eff(eff: Efficiency) -> Cluster:
        return replace(cluster, device=replace(cluster.device, efficiency=eff))

    scored = []
    for bw, dec, pre, step in itertools.product(_geom(0.05, 2.0, 24), _geom(5e-6, 2e-3, 16),
                                                _geom(5e-6, 2e-3, 8), [0.0] + _geom(1e-5, 2e-2, 10)):
        eff = replace(base, bw=bw, layer_overhead_decode=dec, layer_overhead_prefill=pre, step_overhead=step)
        scored.append((_worst(rows(model, layout, with_eff(eff), phases, dtype), "compute"), eff))
    best_err = min(err for err, _ in scored)
    best = min((eff for err, eff in scored if err <= best_err + 0.01), key=lambda e: _distance(e, base))
    if layout.world_size > 1:
        link = min(_geom(0.05, 4.0, 40), key=lambda e: _worst(
            rows(model, layout, with_eff(replace(best, link=e)), phases, dtype), "comm"))
        best = replace(best, link=link)
    # The wall clock also holds what no stage's busy time does: the driver's scheduling and the
    # hops of inputs and sampled ids between processes.  The per-step cost is raised until the
    # phases' throughput matches, never below what stage 0's own time showed.
    timed = [ph for ph in phases if ph.wall_s > 0 and ph.tokens > 0]
    if timed:
        def thr_err(step: float) -> float:
            c = with_eff(replace(best, step_overhead=step))
            return max(abs(math.log(predicted_phase(model, layout, c, ph, dtype).throughput * ph.wall_s / ph.tokens))
                       for ph in timed)
        steps = [best.step_overhead] + [x for x in _geom(1e-5, 0.5, 80) if x > best.step_overhead]
        best = replace(best, step_overhead=min(steps, key=thr_err))
    return best


def predicted_phase(model: ModelSpec, layout: Layout, cluster: Cluster, ph: Phase, dtype: str):
    """The planner's prediction for the phase's load (bubble, throughput) with the cluster's factors."""
    wl = Workload(dtype=dtype, kv_dtype=dtype, concurrency=ph.concurrency, input_len=ph.input_len,
                  output_len=ph.output_len, micro_batches=ph.micro_batches)
    return predict(stage_shapes(model, layout, wl), layout, cluster, wl, ph.concurrency)


def hardware_yaml(dev: Device, eff: Efficiency, name: str, source: str) -> str:
    """A `--hardware` file: the base device's peaks under a new name, with the fitted factors."""
    tflops = ", ".join(f"{k}: {v / 1e12:.6g}" for k, v in dev.flops.items())
    effs = ", ".join(f"{f.name}: {getattr(eff, f.name):.6g}" for f in fields(Efficiency))
    return (f"# Written by `raypp calibrate`; use with `raypp plan --hardware FILE --gpu {name}`.\n"
            f"gpus:\n"
            f"  {name}:\n"
            f"    memory_gb: {dev.memory / 1e9:.6g}\n"
            f"    bandwidth_gbs: {dev.bandwidth / 1e9:.6g}\n"
            f"    tflops: {{{tflops}}}\n"
            f"    intra_link: {dev.intra_link}\n"
            f"    network: {dev.network}\n"
            f"    kind: {dev.kind}\n"
            f"    source: {json.dumps(source)}\n"
            f"    efficiency: {{{effs}}}\n")
