"""Enumerate every TP x PP layout, predict each, flag mistakes, and pick one for a priority.

Candidates: TP divides the node's GPU count and the model's heads (so a TP
group never leaves a node unless pinned with --tp), PP from 1 to the layers
left; GPUs the layout leaves over run data-parallel replicas, which share the
concurrency.  Throughput is the cluster's; latencies are one replica's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from raypp.errors import UserError
from raypp.planner.balance import balanced_split, stage_costs
from raypp.planner.flags import Flag, balance_flag, pipeline_flags, tp_link_flags
from raypp.layout import Layout, tp_problems
from raypp.planner.layout import Cluster, Workload, stage_shapes
from raypp.planner.memory import Memory, memory
from raypp.planner.models import ModelSpec
from raypp.planner.perf import Prediction, predict, stage_forward

PRIORITIES = ("latency", "throughput", "balanced")


@dataclass
class Candidate:
    layout: Layout
    memory: Memory
    prediction: Prediction | None = None      # None when it does not fit
    throughput: float = 0.0                   # output tok/s, all replicas
    flags: list[Flag] = field(default_factory=list)
    meets_slo: bool = True
    score: float = 0.0

    @property
    def fits(self) -> bool:
        return self.memory.fits


@dataclass(frozen=True)
class Options:
    priority: str = "balanced"
    max_itl_ms: float | None = None
    max_ttft_ms: float | None = None
    max_bubble: float = 0.10
    imbalance_tolerance: float = 0.10         # whole layers alone leave ~1/(layers per stage) of imbalance
    tp: int | None = None                     # pin a degree (may break the rules: then it is flagged)
    pp: int | None = None
    stage_layers: tuple[int, ...] | None = None


def split_costs(model: ModelSpec, tp: int, cluster: Cluster, wl: Workload, batch: int) -> tuple[float, float, float]:
    """Decode-step time of (one layer, stage 0's own work, the lm_head + final norm) on one TP rank.

    Stage 0's own work is the embedding lookup and the per-step cost (scheduling, input
    preparation), so the balanced split gives stage 0 fewer layers when that cost is large."""
    two = Layout(tp, 2, (1, 1))
    first, last = stage_shapes(model, two, wl)
    ctx = wl.input_len + wl.output_len / 2
    t_first = stage_forward(first, 0, two, cluster, wl, batch, 1, ctx, False)
    t_last = stage_forward(last, 1, two, cluster, wl, batch, 1, ctx, False)
    eff = cluster.device.efficiency
    layer = t_first.compute + t_first.all_reduce - eff.step_overhead   # stage 0 of `two` pays it once
    embed = batch * model.hidden * wl.embed_bytes / (cluster.device.bandwidth * eff.bw) + eff.step_overhead
    return layer, embed, max(t_last.compute + t_last.all_reduce - layer, 0.0)


def layouts(model: ModelSpec, cluster: Cluster, opts: Options) -> list[Layout]:
    gpn = cluster.gpus_per_node
    if opts.tp is not None:
        if problems := tp_problems(model.heads, model.kv_heads, model.intermediate, opts.tp):
            raise UserError("; ".join(problems))
        tps = [opts.tp]
    else:
        tps = [t for t in range(1, gpn + 1) if gpn % t == 0 and not tp_problems(model.heads, model.kv_heads, model.intermediate, t)]
    out = []
    for tp in tps:
        pps = [opts.pp] if opts.pp is not None else range(1, min(model.layers, cluster.gpus // tp) + 1)
        for pp in pps:
            if pp > model.layers:
                raise UserError(f"pp={pp} exceeds the model's {model.layers} layers")
            if tp * pp > cluster.gpus:
                raise UserError(f"TP{tp} x PP{pp} needs {tp * pp} GPUs; the cluster has {cluster.gpus}")
            out.append(Layout(tp, pp, (), max(1, cluster.gpus // (tp * pp))))
    return out


def evaluate(model: ModelSpec, layout: Layout, cluster: Cluster, wl: Workload, opts: Options) -> Candidate:
    c_rep = math.ceil(wl.concurrency / layout.replicas)
    active = min(layout.replicas, math.ceil(wl.concurrency / c_rep))
    m = layout.micro_batches(c_rep, wl.micro_batches)
    layer, embed, head = split_costs(model, layout.tp, cluster, wl, math.ceil(c_rep / m))
    balanced = balanced_split(model.layers, layout.pp, layer, embed, head)
    split = list(opts.stage_layers) if opts.stage_layers else balanced
    if sum(split) != model.layers or len(split) != layout.pp or min(split) < 1:
        raise UserError(f"--stage-layers {split} must give each of the {layout.pp} stages >= 1 layer, "
                        f"summing to the model's {model.layers}")
    layout = replace(layout, stage_layers=tuple(split))
    shapes = stage_shapes(model, layout, wl)
    mem = memory(model, layout, shapes, cluster, wl, c_rep)
    cand = Candidate(layout, mem)
    if not mem.fits:
        return cand
    if mem.kv_seqs < c_rep:
        cand.flags.append(Flag("note", f"KV cache holds {mem.kv_seqs} contexts of {wl.context} tokens per "
                               f"replica, fewer than the {c_rep} asked: concurrency capped"))
        c_rep = mem.kv_seqs
    pred = predict(shapes, layout, cluster, wl, c_rep)
    cand.prediction = pred
    cand.throughput = active * pred.throughput
    filled = None
    if pred.micro_batches < layout.pp <= c_rep:
        filled = predict(shapes, layout, cluster, replace(wl, micro_batches=layout.pp), c_rep)
    cand.flags += tp_link_flags(layout, cluster, pred) + pipeline_flags(layout, pred, opts.max_bubble, filled)
    costs = stage_costs(split, layer, embed, head)
    cand.flags += balance_flag(split, costs, balanced, stage_costs(balanced, layer, embed, head),
                               opts.imbalance_tolerance)
    if wl.dtype == "fp8" and "fp8" not in cluster.device.flops:
        cand.flags.append(Flag("note", f"{cluster.device.name} has no FP8 tensor cores: FP8 weights save memory "
                               f"but matmuls run at the 16-bit rate"))
    itl_ms, ttft_ms = pred.itl * 1e3, pred.ttft * 1e3
    cand.meets_slo = ((opts.max_itl_ms is None or itl_ms <= opts.max_itl_ms)
                      and (opts.max_ttft_ms is None or ttft_ms <= opts.max_ttft_ms))
    return cand


def rank(cands: list[Candidate], priority: str) -> list[Candidate]:
    """Fitting candidates best first (SLO-meeting ones ahead), then the rest."""
    if priority not in PRIORITIES:
        raise UserError(f"--priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    ok = [c for c in cands if c.fits]
    if ok:
        best_thr = max(c.throughput for c in ok)
        best_itl = min(c.prediction.itl for c in ok)
        for c in ok:
            thr, itl = c.throughput / best_thr, best_itl / c.prediction.itl
            c.score = {"latency": itl, "throughput": thr, "balanced": math.sqrt(thr * itl)}[priority]
    ok.sort(key=lambda c: (not c.meets_slo, -round(c.score, 6), c.layout.world_size, c.layout.pp))
    return ok + sorted((c for c in cands if not c.fits), key=lambda c: c.memory.shortfall)


def plan(model: ModelSpec, cluster: Cluster, wl: Workload, opts: Options) -> list[Candidate]:
    ranked = rank([evaluate(model, lay, cluster, wl, opts) for lay in layouts(model, cluster, opts)], opts.priority)
    if ranked and ranked[0].fits and not ranked[0].meets_slo:
        ranked[0].flags.append(Flag("note", "no layout meets the SLO; this one is the best by priority"))
    return ranked
