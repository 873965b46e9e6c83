"""Time of a forward pass per stage, TTFT, inter-token latency and pipeline throughput.

Roofline per kernel class (Williams et al., 2009), summed because the classes
run as separate kernels one after another.  A kernel's time is the longer of its
memory and FLOP times plus the share of the shorter it does not overlap
(`Efficiency.overlap`: 1 on GPUs, the plain roofline; 0 on raypp's CPU, where a
decode step costs its weight reading *plus* its FLOPs):
  linear layers   roofline(passes * weight bytes / (BW*eta_bw), FLOPs / (peak*eta_flops)); passes
                  is 1, or 1 + `pack_passes` for more than one row (CPU sgemm packs weights)
  attention       roofline(KV bytes / (BW*eta_bw), FLOPs / (peak16*eta_flops16))
  lm_head         the same roofline, on the last stage only
  TP all-reduce   2 per layer (Megatron-LM): startup + 2(n-1)/n * bytes / (link*eta_link); the
                  startup is one hop on a switch (NVSwitch: one-shot all-reduce) and n-1 hops
                  on a ring (PCIe, networks, gloo), so it grows with TP where there is no switch
  overhead        per layer per forward (launches, norms, RoPE; CUDA graphs in decode)
  step overhead   once per forward of a micro-batch (scheduling, input preparation, sampling),
                  on stage 0: with one micro-batch it adds to every token, with m >= p it
                  hides behind the other stages
  call            once per forward on every stage: the runtime's cost of starting a step
                  outside any kernel (raypp: a Ray actor call per stage), idle time to the stage
  PP send         latency + hidden states / link, between consecutive stages
  hop latency     PP only, once per micro-batch cycle: p x the runtime's per-hop cost (waking the
                  receiver; p - 1 activation hops and the return of the sampled ids to stage 0)
                  + the ids' link time.  Latency, not stage occupancy
  host bus        workers of one host that stream at once share its memory bus: each gets
                  host_streams / n of one's bandwidth (CPU; GPUs have their own HBM)
  host cores      more workers computing at once than the host has cores: time-sliced, each
                  forward (kernels and all-reduces) takes n / host_cores as long (CPU)
The eta's and overheads are fitted to published measurements (calibration.py) or to a
live deployment (live_fit.py).

Pipeline decode with m micro-batches over p stages (GPipe-style accounting,
Huang et al., 2019): one round gives every sequence one token and lasts
max(m * slowest stage, sum of stages + hop latency) -- the first term is the
slowest-stage (imbalance) limit, the second the cycle of one micro-batch, whose
next step cannot start before its sampled ids are back on stage 0; with m = p and
balanced stages the two are equal but for the hops, so every hop's latency shows
in the round.  Each micro-batch reads the stage's weights again.  Bubble fraction =
1 - busy stage time / (p * round).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from raypp.planner.hardware import Device, Efficiency, Link
from raypp.layout import Layout
from raypp.planner.layout import Cluster, StageShape, Workload, return_link, send_link, tp_link


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


def roofline(mem_s: float, flop_s: float, overlap: float) -> float:
    """One kernel that streams for `mem_s` and computes for `flop_s`: the longer, plus the share of the
    shorter not hidden behind it."""
    return max(mem_s, flop_s) + (1.0 - overlap) * min(mem_s, flop_s)


def _passes(eff: Efficiency, rows: int) -> float:
    """Passes over a linear layer's weights for a product with `rows` rows (`Efficiency.pack_passes`)."""
    return 1.0 + (eff.pack_passes if rows > 1 else 0.0)


# Sampled token ids travel as int64.
_ID_BYTES = 8


def hop_latency(layout: Layout, cluster: Cluster, seqs: int) -> float:
    """What one micro-batch's cycle through the pipeline adds to its stages' times (PP only): the
    runtime's per-hop cost on each of the p - 1 activation hops and on the hop that returns the
    sampled ids from the last stage to stage 0, plus that return's link time.  Latency, not
    occupancy: a sender is free once its message is posted, so it is in the cycle, not in any stage."""
    if layout.pp == 1:
        return 0.0
    eff = cluster.device.efficiency
    return layout.pp * eff.hop_overhead + send_time(seqs * _ID_BYTES, return_link(layout, cluster), eff.link)


@dataclass(frozen=True)
class StageTime:
    compute: float     # linear + attention + head + overhead
    all_reduce: float
    send: float        # to the next stage (0 on the last)
    call: float        # the runtime's fixed cost of starting the forward (no kernel runs: the stage idles)

    @property
    def busy(self) -> float:
        return self.compute + self.all_reduce + self.send

    @property
    def total(self) -> float:
        return self.busy + self.call


def stage_forward(shape: StageShape, stage: int, layout: Layout, cluster: Cluster, wl: Workload,
                  seqs: int, new_tokens: int, context: float, prefill: bool, active_stages: int = 1) -> StageTime:
    """One forward of `seqs` sequences, each with `new_tokens` new tokens after
    `context` cached ones (prefill: context 0, attention over the causal triangle), while
    `active_stages` stages of the replica run at once (they may share a host's memory bus)."""
    dev = cluster.device
    eff = dev.efficiency
    running = min(active_stages * layout.tp, cluster.gpus_per_node)     # workers of one host computing at once
    streaming = min(running, eff.host_cores) if eff.host_cores > 0 else running
    share = min(1.0, eff.host_streams / streaming) if eff.host_streams > 0 else 1.0
    # more workers than cores: each gets its core a share of the time (compute and all-reduce wait alike)
    sliced = max(1.0, running / eff.host_cores) if eff.host_cores > 0 else 1.0
    bw = dev.bandwidth * eff.bw * share
    peak, f_eff = _peak(dev, wl.dtype)
    tokens = seqs * new_tokens
    t_lin = roofline(_passes(eff, tokens) * (shape.stream_bytes - shape.head_bytes) / bw,
                     tokens * shape.linear_flops_per_token / (peak * f_eff), eff.overlap)
    t_head = roofline(_passes(eff, seqs) * shape.head_bytes / bw, seqs * shape.head_flops_per_token / (peak * f_eff),
                      eff.overlap) if shape.has_head else 0.0
    # attention: tokens attend to `context` cached + (causal) half of their own chunk
    attended = context + (new_tokens + 1) / 2
    kv_read = seqs * (context + new_tokens) * shape.kv_bytes_per_token
    t_attn = roofline(kv_read / bw, tokens * attended * shape.attn_flops_per_token_ctx / _peak16(dev, wl.dtype),
                      eff.overlap)
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
    return StageTime(sliced * (t_lin + t_head + t_attn + overhead), sliced * t_ar, t_send, eff.call_overhead)


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
    hop_latency: float     # s, what a decode micro-batch's cycle adds to its stages' times (PP)


def prefill(shapes, layout, cluster, wl, seqs: int = 1, active_stages: int = 1) -> list[StageTime]:
    return [stage_forward(sh, s, layout, cluster, wl, seqs, wl.input_len, 0.0, True, active_stages)
            for s, sh in enumerate(shapes)]


def decode_round(shapes, layout, cluster, wl, concurrency: int, m: int, context: float):
    """(round time, bubble fraction, per-stage times of one micro-batch)."""
    b = math.ceil(concurrency / m)
    active = min(m, layout.pp)      # stages busy at once: with m >= p every stage streams its weights together
    st = [stage_forward(sh, s, layout, cluster, wl, b, 1, context, False, active) for s, sh in enumerate(shapes)]
    times = [t.total for t in st]
    round_t = max(m * max(times), sum(times) + hop_latency(layout, cluster, b))
    # the per-call cost is idle stage time, as the runtime's stats count it
    bubble = 1.0 - m * sum(t.busy for t in st) / (layout.pp * round_t)
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
    batch_pre = [t.total for t in prefill(shapes, layout, cluster, wl, k, min(m, layout.pp))]
    # A full pipeline overlaps a prefill with other micro-batches' work, so it costs the slowest
    # stage; with fewer micro-batches than stages the pipeline idles and the prefill costs its fill.
    stall = max(max(batch_pre), (sum(batch_pre) + hop_latency(layout, cluster, k)) / min(m, layout.pp)) / k
    life = wl.output_len * round_t + c * stall
    ttft = sum(t.total for t in pre) + hop_latency(layout, cluster, 1) + (round_t / 2 if c > 1 else 0.0)
    itl = round_t + (c - 1) * stall / wl.output_len
    return Prediction(ttft, itl, round_t, stall, c * wl.output_len / life, bubble, c, m, st, pre,
                      hop_latency(layout, cluster, math.ceil(c / m)))


def static_batch_throughput(shapes, layout, cluster, wl, batch: int, per_forward: int | None = None) -> float:
    """Output tokens/s of one static batch: the prompts prefilled `per_forward` at a time (default: all
    in one forward, as TensorRT-LLM's gptSessionBenchmark does), those forwards pipelined over the
    stages, then output_len - 1 decode rounds.  It is also what a closed-loop benchmark runs when
    every request has the same length: `concurrency` requests start together and end together."""
    k = min(batch, per_forward or batch)
    pre = [t.total for t in prefill(shapes, layout, cluster, wl, k, min(math.ceil(batch / k), layout.pp))]
    t_pre = sum(pre) + hop_latency(layout, cluster, k) + (math.ceil(batch / k) - 1) * max(pre)
    m = layout.micro_batches(batch, wl.micro_batches)
    round_t, _, _ = decode_round(shapes, layout, cluster, wl, batch, m, wl.input_len + wl.output_len / 2)
    return batch * wl.output_len / (t_pre + (wl.output_len - 1) * round_t)
