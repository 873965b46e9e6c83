"""The four classic mistakes of TP x PP serving, each flagged with its numbers.

1. TP across PCIe or across nodes: 2 all-reduces per layer on a slow link.
2. PP with too few sequences in flight to fill the pipeline (batch 1 on 4 stages).
3. A bubble that costs more than `max_bubble` of stage time at the given load.
4. Unbalanced stages (the lm_head and embedding count), and the split that fixes it.
"""
from __future__ import annotations

from dataclasses import dataclass

from raypp.layout import Layout
from raypp.planner.layout import Cluster, tp_link
from raypp.planner.perf import Prediction


@dataclass(frozen=True)
class Flag:
    code: str      # tp-over-pcie | tp-across-nodes | pp-underfilled | bubble | unbalanced | note
    message: str


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def tp_link_flags(layout: Layout, cluster: Cluster, pred: Prediction) -> list[Flag]:
    if layout.tp == 1:
        return []
    link = tp_link(layout, cluster)
    ar = sum(t.all_reduce for t in pred.decode_stages)
    step = sum(t.total for t in pred.decode_stages)
    share = f"{ar / step:.0%} of a decode step ({_ms(ar)} of {_ms(step)})"
    if layout.tp > cluster.gpus_per_node:
        return [Flag("tp-across-nodes", f"TP{layout.tp} spans {layout.tp // cluster.gpus_per_node} nodes of "
                     f"{cluster.gpus_per_node} GPUs: its all-reduces cross {link.name} "
                     f"({link.bandwidth / 1e9:.0f} GB/s) and take {share}; keep TP <= "
                     f"{cluster.gpus_per_node} and use PP across nodes")]
    if link.kind == "pcie":
        return [Flag("tp-over-pcie", f"TP{layout.tp} all-reduces run over {link.name} "
                     f"({link.bandwidth / 1e9:.0f} GB/s, no NVLink) and take {share}; "
                     f"prefer fewer TP ranks with PP, or NVLink-connected GPUs")]
    return []


def pipeline_flags(layout: Layout, pred: Prediction, max_bubble: float,
                   filled: Prediction | None = None) -> list[Flag]:
    """`filled`: the same load with >= pp micro-batches, to say what filling the pipeline buys."""
    if layout.pp == 1:
        return []
    out = []
    if pred.concurrency < layout.pp:
        out.append(Flag("pp-underfilled", f"PP{layout.pp} with only {pred.concurrency} sequence(s) in flight per "
                        f"replica: at most {pred.micro_batches} micro-batch(es) for {layout.pp} stages, so each "
                        f"stage idles {pred.bubble:.0%} of the time; PP pays off with concurrency >= "
                        f"{layout.pp} (or use TP for latency)"))
    if pred.bubble > max_bubble:
        idle = pred.bubble * pred.round
        cause = (f"{pred.micro_batches} micro-batch(es) for {layout.pp} stages" if pred.micro_batches < layout.pp
                 else "the slowest stage and the stage-to-stage sends set the pace")
        if filled is not None:
            # Memory-bound decode re-reads the weights per micro-batch, so filling the
            # pipeline buys less than the bubble suggests; say how much it does buy.
            fix = (f"{filled.micro_batches} micro-batches would give bubble {filled.bubble:.0%}, ITL "
                   f"{_ms(filled.round)} per round, {filled.throughput / pred.throughput - 1:+.0%} throughput")
        else:
            fix = f"needs >= {layout.pp} sequences in flight to fill"
        out.append(Flag("bubble", f"pipeline bubble {pred.bubble:.0%} > {max_bubble:.0%} at this load "
                        f"({_ms(idle)} idle per stage in each {_ms(pred.round)} round; {cause}); {fix}"))
    return out


def balance_flag(stage_layers: list[int], costs: list[float], balanced: list[int], balanced_costs: list[float],
                 tolerance: float) -> list[Flag]:
    """`costs`: per-stage decode time (layers + embedding on stage 0 + lm_head on the last)."""
    if len(costs) < 2:
        return []
    mean = sum(costs) / len(costs)
    excess = max(costs) / mean - 1.0
    if excess <= tolerance:
        return []
    b_excess = max(balanced_costs) / (sum(balanced_costs) / len(balanced_costs)) - 1.0
    ms = ", ".join(f"{c * 1e3:.2f}" for c in costs)
    if list(stage_layers) != list(balanced) and max(balanced_costs) < max(costs):
        fix = (f"the balanced split {balanced} (embedding and lm_head counted) makes the slowest stage "
               f"{b_excess:.0%} above the mean, {1 - max(balanced_costs) / max(costs):.0%} faster")
    else:
        fix = (f"no contiguous split of {sum(stage_layers)} layers does better; choose a PP degree whose "
               f"stages get equal work")
    return [Flag("unbalanced", f"stages {list(stage_layers)} are unbalanced: slowest stage {excess:.0%} above "
                 f"the mean (per-stage ms: {ms}); {fix}")]
