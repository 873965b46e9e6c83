"""Time of a forward pass per stage, TTFT, inter-token latency and pipeline throughput.

Roofline per kernel class (Williams et al., 2009), summed because the classes
run as separate kernels one after another:
  linear layers   max(weight bytes / (BW*eta_bw), FLOPs / (peak*eta_flops))
  attention       max(KV bytes / (BW*eta_bw), FLOPs / (peak16*eta_flops16))
  lm_head         the same roofline, on the last stage only
  TP all-reduce   2 per layer (Megatron-LM): startup + 2(n-1)/n * bytes / (link*eta_link); the
                  startup is one hop on a switch (NVSwitch: one-shot all-reduce) and n-1 hops
                  on a ring (PCIe, networks, gloo), so it grows with TP where there is no switch
  overhead        per layer per forward (launches, norms, RoPE; CUDA graphs in decode)
  step overhead   once per forward of a micro-batch (scheduling, input preparation, sampling),
                  on stage 0: with one micro-batch it adds to every token, with m >= p it
                  hides behind the other stages
  PP send         latency + hidden states / link, between consecutive stages
The eta's and overheads are fitted to published measurements (calibration.py).

Pipeline decode with m micro-batches over p stages (GPipe-style accounting,
Huang et al., 2019): one round gives every sequence one token and lasts
max(m * slowest stage, sum of stages) -- the first term is the slowest-stage
(imbalance) limit, the second the fill limit when m < p.  Bubble fraction =
1 - busy stage time / (p * round).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from raypp.planner.hardware import Device, Link
from raypp.layout import Layout
from raypp.planner.layout import Cluster, StageShape, Workload, send_link, tp_link


def _peak(dev: Device, dtype: str) -> tuple[float, float]:
    """(FLOP/s, efficiency) of the linear layers; fp8 without fp8 cores runs at the 16-bit rate."""
    eff = dev.efficiency
    if dtype == "fp8" and "fp8" in dev.flops:
        return dev.flops["fp8"], eff.flops8
    key = "fp32" if dtype == "fp32" else "bf16"
    return dev.flops.get(key) or dev.flops["bf16"], eff.flops16


def _peak16(dev: Device, dtype: str) -> float:
    key = "fp32" if dtype == "fp32" else "bf16"
    return (dev.flops.get(key) or dev.flops["bf16"]) * dev.efficiency.flops16


def all_reduce_time(n: int, nbytes: float, link: Link, eff: float) -> float:
    """Ring all-reduce (Patarasuk & Yuan, 2009): 2(n-1)/n of the data crosses each link.

    `link.latency` is the startup of one collective between two ranks.  Behind a switch
    (NVSwitch) small messages go one-shot -- every rank reads every peer at once, as
    TensorRT-LLM's and vLLM's custom all-reduce do -- so the startup does not grow with
    n; on a ring (PCIe through the host, networks, gloo) it is paid once per hop."""
    if n <= 1:
        return 0.0
    hops = 1 if link.kind == "nvlink" else n - 1
    return link.latency * hops + 2 * (n - 1) / n * nbytes / (link.bandwidth * eff)


def send_time(nbytes: float, link: Link, eff: float) -> float:
    return link.latency + nbytes / (link.bandwidth * eff)


@dataclass(frozen=True)
class StageTime:
    compute: float     # linear + attention + head + overhead
    all_reduce: float
    send: float        # to the next stage (0 on the last)

    @property
    def total(self) -> float:
        return self.compute + self.all_reduce + self.send


def stage_forward(shape: StageShape, stage: int, layout: Layout, cluster: Cluster, wl: Workload,
                  seqs: int, new_tokens: int, context: float, prefill: bool) -> StageTime:
    """One forward of `seqs` sequences, each with `new_tokens` new tokens after
    `context` cached ones (prefill: context 0, attention over the causal triangle)."""
    dev = cluster.device
    eff = dev.efficiency
    bw = dev.bandwidth * eff.bw
    peak, f_eff = _peak(dev, wl.dtype)
    tokens = seqs * new_tokens
    t_lin = max((shape.stream_bytes - shape.head_bytes) / bw, tokens * shape.linear_flops_per_token / (peak * f_eff))
    t_head = max(shape.head_bytes / bw, seqs * shape.head_flops_per_token / (peak * f_eff)) if shape.has_head else 0.0
    # attention: tokens attend to `context` cached + (causal) half of their own chunk
    attended = context + (new_tokens + 1) / 2
    kv_read = seqs * (context + new_tokens) * shape.kv_bytes_per_token
    t_attn = max(kv_read / bw, tokens * attended * shape.attn_flops_per_token_ctx / _peak16(dev, wl.dtype))
    overhead = shape.layers * (eff.layer_overhead_prefill if prefill else eff.layer_overhead_decode)
    if stage == 0 and not prefill:
        # A serving loop schedules, prepares inputs and samples once per decode step, whatever
        # the depth; prefill's per-forward costs are inside the fitted per-layer prefill overhead.
        overhead += eff.step_overhead
    act = tokens * shape.hidden * wl.act_bytes
    t_ar = 2 * shape.layers * all_reduce_time(layout.tp, act, tp_link(layout, cluster), eff.link)
    last = stage == layout.pp - 1
    # the last stage returns sampled token ids only
    t_send = 0.0 if last else send_time(act, send_link(layout, stage, cluster), eff.link)
    return StageTime(t_lin + t_head + t_attn + overhead, t_ar, t_send)


@dataclass(frozen=True)
class Prediction:
    ttft: float            # s, prompt of input_len through every stage, + half a round under load
    itl: float             # s, mean gap between a sequence's tokens: a round + the others' prefill stalls
    round: float           # s, one decode round: every running sequence gets one token
    stall: float           # s, decode time one prompt's prefill takes from the replica
    throughput: float      # output tokens/s of one replica, prefill work amortized
    bubble: float          # fraction of stage time idle in steady decode
    concurrency: int       # sequences the replica actually runs (KV cache may cap it)
    micro_batches: int
    decode_stages: list[StageTime]
    prefill_stages: list[StageTime]


def prefill(shapes, layout, cluster, wl, seqs: int = 1) -> list[StageTime]:
    return [stage_forward(sh, s, layout, cluster, wl, seqs, wl.input_len, 0.0, True) for s, sh in enumerate(shapes)]


def decode_round(shapes, layout, cluster, wl, concurrency: int, m: int, context: float):
    """(round time, bubble fraction, per-stage times of one micro-batch)."""
    b = math.ceil(concurrency / m)
    st = [stage_forward(sh, s, layout, cluster, wl, b, 1, context, False) for s, sh in enumerate(shapes)]
    times = [t.total for t in st]
    round_t = max(m * max(times), sum(times))
    bubble = 1.0 - m * sum(times) / (layout.pp * round_t)
    return round_t, bubble, st


def predict(shapes, layout, cluster, wl, concurrency: int) -> Prediction:
    """Steady state of one replica running `concurrency` sequences with continuous batching.

    A slot's life is output_len rounds plus the stall its own prefill causes;
    over that life all `concurrency` slots are refilled once, so
    throughput = c * output_len / (output_len * round + c * slowest-stage prefill per prompt).
    A sequence's own prefill is its TTFT; the other c - 1 prefills of its life stall
    its decode, so the ITL a client measures ((end - first token) / tokens) is
    round + (c - 1) * stall / output_len: under load, prefill as much as decode sets it.
    """
    c = max(1, concurrency)
    m = layout.micro_batches(c, wl.micro_batches)
    round_t, bubble, st = decode_round(shapes, layout, cluster, wl, c, m, wl.input_len + wl.output_len / 2)
    pre = prefill(shapes, layout, cluster, wl)
    # Arriving prompts are prefilled together up to the token budget of one forward
    # (vLLM's max_num_batched_tokens), which spreads weight reads and per-layer overhead.
    k = max(1, min(c, wl.prefill_chunk // max(wl.input_len, 1)))
    batch_pre = [t.total for t in (pre if k == 1 else prefill(shapes, layout, cluster, wl, seqs=k))]
    # A full pipeline overlaps a prefill with other micro-batches' work, so it costs the slowest
    # stage; with fewer micro-batches than stages the pipeline idles and the prefill costs its fill.
    stall = max(max(batch_pre), sum(batch_pre) / min(m, layout.pp)) / k
    life = wl.output_len * round_t + c * stall
    ttft = sum(t.total for t in pre) + (round_t / 2 if c > 1 else 0.0)
    itl = round_t + (c - 1) * stall / wl.output_len
    return Prediction(ttft, itl, round_t, stall, c * wl.output_len / life, bubble, c, m, st, pre)


def static_batch_throughput(shapes, layout, cluster, wl, batch: int) -> float:
    """Output tokens/s of one static batch (all prompts together, then output_len - 1
    decode steps): what TensorRT-LLM's gptSessionBenchmark measures."""
    t_pre = sum(t.total for t in prefill(shapes, layout, cluster, wl, seqs=batch))
    round_t, _, _ = decode_round(shapes, layout, cluster, wl, batch, 1, wl.input_len + wl.output_len / 2)
    return batch * wl.output_len / (t_pre + (wl.output_len - 1) * round_t)
