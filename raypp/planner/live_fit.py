"""Fit a device's efficiency factors to what a live raypp deployment measured.

Input: per-stage totals over a load phase (the deltas of the engine's typed stats
between two snapshots) at one or more concurrencies.  The model predicts each
stage's time per step from `perf.stage_forward`; the fit picks the factors that
minimise the worst |log(predicted / measured)| over every stage and phase:

  compute per step   roofline(passes * weight bytes + KV bytes / (BW * eta_bw), FLOPs / (peak * eta_flops))
                     (the catalog's overlap; the packing passes fitted)
                     + layers * per-layer overhead (+ the per-step cost on stage 0), decode and
                     prefill forwards mixed in the proportions the phase ran them
  call per step      the stage's idle time per step: the runtime's fixed cost of starting a
                     forward (raypp: a Ray actor call), read directly
  comm per step      TP all-reduces + the send to the next stage, fitted as eta_link where TP > 1
  wall clock         tokens / wall clock of each phase: the per-hop cost of the pipeline
                     (PP > 1) and what the driver adds to each step (the per-step cost), which
                     no stage's busy time holds

A phase of `requests` equal requests with `concurrency` in flight runs in waves: each
wave's prompts are prefilled together, then decode together (`static_batch_throughput`).

Pure arithmetic: the HTTP side lives in raypp/calibrate.py.
"""
from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass, fields, replace

from raypp.planner.hardware import Device, Efficiency
from raypp.layout import Layout
from raypp.planner.layout import Cluster, Workload, stage_shapes
from raypp.planner.models import ModelSpec
from raypp.planner.perf import decode_round, stage_forward, static_batch_throughput


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
    idle_s: list[float]            # per stage: nothing queued (the runtime starting the next call)
    prefill_chunk: int = 512       # the deployment's token budget per forward (raypp's default)


def merge(phases: list[Phase]) -> Phase:
    """Repeated runs of one load as one phase: their totals summed, their bubble ratios averaged."""
    first = phases[0]
    total = lambda name: [sum(x) for x in zip(*(getattr(ph, name) for ph in phases))]
    return replace(first, prefills=sum(ph.prefills for ph in phases), steps=total("steps"),
                   compute_s=total("compute_s"), comm_s=total("comm_s"), idle_s=total("idle_s"),
                   bubble_ratio=[x / len(phases) for x in total("bubble_ratio")],
                   tokens=sum(ph.tokens for ph in phases), wall_s=sum(ph.wall_s for ph in phases))


@dataclass(frozen=True)
class Row:
    phase: int
    stage: int
    what: str                      # "compute" | "call" | "comm"
    measured: float                # s per step
    predicted: float

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1.0


def _workload(ph: Phase, dtype: str) -> Workload:
    return Workload(dtype=dtype, kv_dtype=dtype, concurrency=ph.concurrency, input_len=ph.input_len,
                    output_len=ph.output_len, micro_batches=ph.micro_batches, prefill_chunk=ph.prefill_chunk)


def _prompts_per_forward(ph: Phase) -> int:
    return max(1, min(ph.concurrency, ph.prefill_chunk // max(ph.input_len, 1)))


def _per_step(model: ModelSpec, layout: Layout, cluster: Cluster, ph: Phase, dtype: str):
    """Predicted (compute, comm) per stage per step: decode and prefill steps in the phase's mix."""
    wl = _workload(ph, dtype)
    shapes = stage_shapes(model, layout, wl)
    b = max(1, math.ceil(ph.concurrency / ph.micro_batches))
    ctx = ph.input_len + ph.output_len / 2
    k = _prompts_per_forward(ph)
    out = []
    for s, sh in enumerate(shapes):
        if ph.steps[s] == 0:          # nothing measured on this stage in this phase
            out.append((0.0, 0.0))
            continue
        active = min(ph.micro_batches, layout.pp)
        dec = stage_forward(sh, s, layout, cluster, wl, b, 1, ctx, False, active)
        pre = stage_forward(sh, s, layout, cluster, wl, k, ph.input_len, 0.0, True, active)
        n_pre = min(math.ceil(ph.prefills / k), ph.steps[s])
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
            if ph.idle_s[s] > 0:
                out.append(Row(i, s, "call", ph.idle_s[s] / ph.steps[s], cluster.device.efficiency.call_overhead))
            if ph.comm_s[s] > 0 and comm > 0:
                out.append(Row(i, s, "comm", ph.comm_s[s] / ph.steps[s], comm))
    return out


def _worst(rs: list[Row], what: str) -> float:
    errs = [abs(math.log(r.predicted / r.measured)) for r in rs if r.what == what]
    return max(errs) if errs else 0.0


def _geom(lo: float, hi: float, n: int) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


_FITTED = ("bw", "flops16", "pack_passes", "layer_overhead_decode", "layer_overhead_prefill", "step_overhead",
           "call_overhead", "hop_overhead", "host_streams")


def _distance(eff: Efficiency, base: Efficiency) -> float:
    return sum(abs(math.log((getattr(eff, n) + 1e-6) / (getattr(base, n) + 1e-6))) for n in _FITTED)


def fit(model: ModelSpec, layout: Layout, cluster: Cluster, phases: list[Phase], dtype: str) -> Efficiency:
    """Compute factors first (the comm terms do not depend on them), then the host bus, the call
    cost, eta_link, and last what only the wall clock shows.

    One layout cannot tell every factor apart (bandwidth and per-layer overhead come in the
    same ratio on every stage), so among the factor sets within 1% of the best worst-error the
    one closest to the catalog's is kept: the measurements move what they determine, the rest
    stays as measured by cpu_probe or fitted to published numbers."""
    if not phases or not any(sum(ph.steps) for ph in phases):
        raise ValueError("no steps measured: run load against the deployment before fitting")
    f = _Fit(model, layout, cluster, phases, dtype)
    best = f.refine(f.compute_grid(f.base))
    # Workers that share a host's memory bus stream slower together than alone: phases that run
    # different numbers of stages at once (or TP ranks) tell by how much.  Searched with the other
    # factors fixed, then those refitted once.
    streams = {min(min(ph.micro_batches, layout.pp) * layout.tp, cluster.gpus_per_node) for ph in phases}
    if len(streams | {1}) > 1:
        candidates = sorted({best.host_streams, 0.0, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0})  # the catalog's among them
        best = f.closest([(f.compute_error(e), e) for e in (replace(best, host_streams=h) for h in candidates)])
        best = f.refine(f.compute_grid(best))
    # A stage idles between forwards while the runtime starts its next call: read, not searched.
    calls = [ph.idle_s[s] / ph.steps[s] for ph in phases for s in range(len(ph.steps))
             if ph.steps[s] > 0 and ph.idle_s[s] > 0]
    if calls:
        best = replace(best, call_overhead=statistics.median(calls))
    # A TP group's all-reduces show the link; a pipeline's sends alone are posted asynchronously, and
    # their measured time is the posting, not the transfer (its latency is in the per-hop cost).
    if layout.tp > 1:
        best = replace(best, link=min(_geom(0.05, 4.0, 40), key=lambda e: _worst(
            rows(model, layout, f.cluster_with(replace(best, link=e)), phases, dtype), "comm")))
    return f.wall_clock(best)


class _Fit:
    """The searches of `fit` over one deployment's phases."""

    def __init__(self, model: ModelSpec, layout: Layout, cluster: Cluster, phases: list[Phase], dtype: str):
        self.model, self.layout, self.cluster, self.phases, self.dtype = model, layout, cluster, phases, dtype
        self.base = cluster.device.efficiency
        # eta_bw is the rate of a one-row (matrix-vector) pass over the weights; forwards of several
        # rows add the packing passes.  Phases whose decode micro-batches all hold several sequences
        # show only multi-row forwards: they keep the catalog's one-row rate (cpu_probe's GEMV) and
        # fit the packing.
        self.one_row = any(math.ceil(ph.concurrency / ph.micro_batches) == 1 for ph in phases)

    def cluster_with(self, eff: Efficiency) -> Cluster:
        return replace(self.cluster, device=replace(self.cluster.device, efficiency=eff))

    def compute_error(self, eff: Efficiency) -> float:
        return _worst(rows(self.model, self.layout, self.cluster_with(eff), self.phases, self.dtype), "compute")

    def closest(self, scored: list[tuple[float, Efficiency]], tolerance: float = 0.01) -> Efficiency:
        best_err = min(err for err, _ in scored)
        return min((eff for err, eff in scored if err <= best_err + tolerance), key=lambda e: _distance(e, self.base))

    def compute_grid(self, start: Efficiency) -> Efficiency:
        # fractions of the peak: at most 1 (on the CPU the peaks are cpu_probe's rates on the model's own
        # products; above them the fit only trades bandwidth against per-step costs)
        bws = _geom(0.05, 1.0, 14) if self.one_row else [self.base.bw]
        packs = (0.0, 0.5, 1.0, 1.5, 2.0) if self.one_row else (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
        grid = itertools.product(bws, _geom(0.25, 1.0, 5), packs, _geom(5e-6, 2e-3, 8), _geom(5e-6, 2e-3, 6),
                                 [0.0] + _geom(1e-5, 2e-2, 7))
        effs = (replace(start, bw=bw, flops16=flops, pack_passes=pack, layer_overhead_decode=dec,
                        layer_overhead_prefill=pre, step_overhead=step) for bw, flops, pack, dec, pre, step in grid)
        return self.closest([(self.compute_error(e), e) for e in effs])

    def refine(self, eff: Efficiency) -> Efficiency:
        """The grid is coarse (factors of ~1.3-2 apart): step each fitted factor by smaller ratios
        while the worst compute error falls."""
        err = self.compute_error(eff)
        names = ("flops16", "layer_overhead_decode", "layer_overhead_prefill", "step_overhead")
        if self.one_row:
            names = ("bw",) + names
        for ratio in (1.25, 1.1, 1.03):
            improved = True
            while improved:
                improved = False
                for n, r in itertools.product(names, (ratio, 1 / ratio)):
                    cand = replace(eff, **{n: getattr(eff, n) * r})
                    if cand.bw > 1.0 or cand.flops16 > 1.0:
                        continue
                    if (e := self.compute_error(cand)) < err - 1e-4:
                        eff, err, improved = cand, e, True
        return eff

    def wall_clock(self, best: Efficiency) -> Efficiency:
        """The wall clock also holds what no stage's busy time does: the hops of activations and
        sampled ids between processes (PP) and the driver's own time per step.  The per-hop cost
        and the per-step cost are searched until the phases' throughput matches, the per-step
        cost never below what stage 0's own time showed."""
        timed = [ph for ph in self.phases if ph.wall_s > 0 and ph.tokens > 0]
        if not timed:
            return best

        def thr_err(eff: Efficiency) -> float:
            c = self.cluster_with(eff)
            return max(abs(math.log(predicted_phase(self.model, self.layout, c, ph, self.dtype).throughput
                                    * ph.wall_s / ph.tokens)) for ph in timed)
        # Fine steps (~12%) and a tight tie: the phases tell a per-hop cost (once per micro-batch
        # cycle) from a per-step cost on stage 0 (once per forward there) only by a few percent.
        hops = [best.hop_overhead] + (_geom(1e-5, 0.05, 70) if self.layout.pp > 1 else [])
        steps = [best.step_overhead] + [x for x in _geom(1e-5, 0.5, 90) if x > best.step_overhead]
        return self.closest([(thr_err(e), e) for e in (replace(best, hop_overhead=h, step_overhead=st)
                                                       for h in hops for st in steps)], tolerance=0.002)


@dataclass(frozen=True)
class PhasePrediction:
    throughput: float              # output tok/s of the phase's waves
    bubble: float                  # of a steady decode round


def predicted_phase(model: ModelSpec, layout: Layout, cluster: Cluster, ph: Phase, dtype: str) -> PhasePrediction:
    """The planner's prediction for the phase's load with the cluster's factors: equal requests with
    `concurrency` in flight start and end together, so the phase runs static batches."""
    wl = _workload(ph, dtype)
    shapes = stage_shapes(model, layout, wl)
    m = layout.micro_batches(ph.concurrency, ph.micro_batches)
    _, bubble, _ = decode_round(shapes, layout, cluster, wl, ph.concurrency, m, ph.input_len + ph.output_len / 2)
    return PhasePrediction(static_batch_throughput(shapes, layout, cluster, wl, ph.concurrency,
                                                   _prompts_per_forward(ph)), bubble)


def _yaml_number(v: float) -> str:
    """v to 6 significant digits as YAML reads a number back: YAML 1.1 (PyYAML) takes `5e-05`,
    which `:g` writes for a fitted cost under 0.1 ms, for a string; `5.0e-05` is a float."""
    text = f"{v:.6g}"
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def hardware_yaml(dev: Device, eff: Efficiency, name: str, source: str) -> str:
    """A `--hardware` file: the base device's peaks under a new name, with the fitted factors."""
    tflops = ", ".join(f"{k}: {_yaml_number(v / 1e12)}" for k, v in dev.flops.items())
    effs = ", ".join(f"{f.name}: {_yaml_number(getattr(eff, f.name))}" for f in fields(Efficiency))
    return (f"# Written by `raypp calibrate`; use with `raypp plan --hardware FILE --gpu {name}`.\n"
            f"gpus:\n"
            f"  {name}:\n"
            f"    memory_gb: {_yaml_number(dev.memory / 1e9)}\n"
            f"    bandwidth_gbs: {_yaml_number(dev.bandwidth / 1e9)}\n"
            f"    tflops: {{{tflops}}}\n"
            f"    intra_link: {dev.intra_link}\n"
            f"    network: {dev.network}\n"
            f"    kind: {dev.kind}\n"
            f"    source: {json.dumps(source)}\n"
            f"    efficiency: {{{effs}}}\n")
