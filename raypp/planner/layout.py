"""A candidate layout on a cluster, and what each of its GPUs holds and computes.

TP shards every matmul of a stage over `tp` devices (Megatron-LM column/row
split: 2 all-reduces per layer); PP gives each stage a contiguous block of
layers; stage 0 also holds the (vocab-parallel) embedding, the last stage the
final norm + lm_head.  Stages are packed onto nodes in order, so a PP hop is
NVLink/PCIe when both stages share a node and the network otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from raypp.layout import Layout
from raypp.planner.hardware import Device, Link
from raypp.planner.models import ModelSpec

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True)
class Cluster:
    device: Device
    gpus_per_node: int
    nodes: int
    intra: Link
    network: Link

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Workload:
    dtype: str = "bf16"            # weights of the linear layers
    kv_dtype: str = "bf16"
    concurrency: int = 1           # sequences decoding at once, whole cluster
    input_len: int = 1000
    output_len: int = 200
    micro_batches: int | None = None   # None: pp (raypp's default), capped by the concurrency
    gpu_memory_utilization: float = 0.90   # vLLM's default share of HBM the engine may take
    prefill_chunk: int = 8192      # most prompt tokens in one forward (vLLM's default chunk)

    @property
    def context(self) -> int:
        return self.input_len + self.output_len

    @property
    def act_bytes(self) -> int:
        # Activations and all-reduces stay 16-bit with fp8 weights (FP8 GEMMs output bf16).
        return 4 if self.dtype == "fp32" else 2

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def embed_bytes(self) -> int:
        # FP8 checkpoints (ModelOpt, vLLM) quantize only the linear layers of the blocks.
        return max(self.weight_bytes, 2)


def tp_link(layout: Layout, cluster: Cluster) -> Link:
    """The link a stage's TP all-reduces run over: inside a node, or the network when TP spans nodes."""
    return cluster.intra if layout.tp <= cluster.gpus_per_node else cluster.network


def send_link(layout: Layout, stage: int, cluster: Cluster) -> Link:
    """Link from stage -> stage+1 (the same TP rank of the next stage)."""
    n = cluster.gpus_per_node
    same = layout.stage_node(stage, n) == layout.stage_node(stage + 1, n)
    return cluster.intra if same and layout.tp <= n else cluster.network


def return_link(layout: Layout, cluster: Cluster) -> Link:
    """Link from the last stage back to stage 0 (sampled ids)."""
    same = layout.stage_node(layout.pp - 1, cluster.gpus_per_node) == layout.stage_node(0, cluster.gpus_per_node)
    return cluster.intra if same and layout.tp <= cluster.gpus_per_node else cluster.network


@dataclass(frozen=True)
class StageShape:
    """Per-GPU quantities of one stage (one TP rank)."""
    layers: int
    hidden: int
    weight_bytes: float        # everything the GPU holds
    stream_bytes: float        # weights read by every forward (all but the embedding table)
    head_bytes: float          # lm_head part of stream_bytes (read once per step, not per token)
    kv_bytes_per_token: float
    linear_flops_per_token: float
    head_flops_per_token: float
    attn_flops_per_token_ctx: float   # x context length
    has_embed: bool
    has_head: bool


def stage_shapes(model: ModelSpec, layout: Layout, wl: Workload) -> list[StageShape]:
    tp, h = layout.tp, model.hidden
    kv_heads_gpu = math.ceil(model.kv_heads / tp)   # replicated when tp > kv_heads
    linear = model.layer_params - 2 * h             # norms are not matmuls
    shapes = []
    for s, n in enumerate(layout.stage_layers):
        first, last = s == 0, s == layout.pp - 1
        layer_bytes = n * (linear * wl.weight_bytes + 2 * h * 2) / tp
        embed = model.embed_params * wl.embed_bytes / tp if first else 0.0
        # A tied lm_head shares the embedding only when one stage holds both.
        head = (model.head_params * wl.embed_bytes / tp) if last else 0.0
        held_head = 0.0 if (last and first and model.tied) else head
        shapes.append(StageShape(
            layers=n, hidden=h, weight_bytes=layer_bytes + embed + held_head, stream_bytes=layer_bytes + head,
            head_bytes=head, kv_bytes_per_token=2 * n * kv_heads_gpu * model.hd * DTYPE_BYTES[wl.kv_dtype],
            linear_flops_per_token=2 * n * linear / tp,
            head_flops_per_token=(2 * model.vocab * h / tp) if last else 0.0,
            attn_flops_per_token_ctx=4 * n * (model.heads / tp) * model.hd,
            has_embed=first, has_head=last))
    return shapes
