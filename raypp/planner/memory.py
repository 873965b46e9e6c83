"""Memory per GPU for a layout: weights shard, activations, framework overhead, KV cache.

The engine takes `gpu_memory_utilization` of the device (vLLM's convention);
whatever weights, activation workspace and framework overhead leave is KV
cache.  Every stage must hold the KV of every sequence in flight (each keeps
its own layers' K/V), so capacity is the minimum over stages.
"""
from __future__ import annotations

from dataclasses import dataclass

from raypp.layout import Layout
from raypp.planner.layout import Cluster, StageShape, Workload
from raypp.planner.models import ModelSpec

GB = 1e9
# Non-tensor memory per GPU: CUDA context (~0.5 GB on Hopper), cuBLAS/cuDNN
# workspaces and the CUDA-graph pool; NCCL adds its buffers when there are
# peers.  Order of what vLLM reports as "non-torch memory" in its profiling
# log (0.5-2 GiB); an estimate, not a calibrated number.
GPU_OVERHEAD = 1.5 * GB
NCCL_OVERHEAD = 0.5 * GB
CPU_OVERHEAD = 0.5 * GB    # Python + torch + Ray worker process, measured RSS order here


def cpu_packed_copies(weight_bytes: int) -> int:
    """Copies a CPU worker keeps of its linear weights beside the plain ones
    (kernels/cpu_linear.py): oneDNN's packed layout, and for fp32 the decode panels."""
    return 2 if weight_bytes == 4 else 1


@dataclass(frozen=True)
class Memory:
    capacity: float            # bytes the engine may use per GPU
    weights: float             # the largest stage's shard (with a CPU worker's packed copies)
    activations: float
    overhead: float
    kv_cache: float            # bytes left for KV on the tightest stage (negative: does not fit)
    kv_tokens: int
    kv_seqs: int               # full contexts (input + output) the KV cache holds
    shortfall: float           # bytes per GPU missing for weights + one full context (0: fits)
    kv_per_seq: float          # KV bytes of one full context on the tightest stage

    def in_use(self, seqs: int) -> float:
        """Bytes per GPU with `seqs` full contexts cached (what the workload needs, not the reservation)."""
        return self.weights + self.activations + self.overhead + seqs * self.kv_per_seq

    @property
    def used(self) -> float:
        return self.weights + self.activations + self.overhead + max(self.kv_cache, 0.0)

    @property
    def fits(self) -> bool:
        return self.shortfall == 0.0


def activation_bytes(model: ModelSpec, layout: Layout, wl: Workload, per_replica_seqs: int) -> float:
    """Peak live tensors of one layer for a prefill chunk, plus fp32 logits for sampling."""
    tokens = min(max(wl.input_len, 512), wl.prefill_chunk)
    tp, h = layout.tp, model.hidden
    qkv = (model.heads + 2 * model.kv_heads) * model.hd / tp
    per_token = (4 * h + qkv + 3 * model.intermediate / tp) * wl.act_bytes
    logits = min(per_replica_seqs, tokens) * model.vocab / tp * 4
    return tokens * per_token + logits


def memory(model: ModelSpec, layout: Layout, shapes: list[StageShape], cluster: Cluster, wl: Workload,
           per_replica_seqs: int) -> Memory:
    dev = cluster.device
    capacity = dev.memory * wl.gpu_memory_utilization
    overhead = CPU_OVERHEAD if dev.kind == "cpu" else GPU_OVERHEAD + (NCCL_OVERHEAD if layout.world_size > 1 else 0.0)
    act = activation_bytes(model, layout, wl, per_replica_seqs)
    copies = cpu_packed_copies(wl.weight_bytes) if dev.kind == "cpu" else 0
    weights = [s.weight_bytes + copies * s.stream_bytes for s in shapes]
    free = [capacity - w - act - overhead for w in weights]
    tokens = min(int(max(f, 0.0) // s.kv_bytes_per_token) for f, s in zip(free, shapes))
    need = max(wl.context * s.kv_bytes_per_token - f for f, s in zip(free, shapes))
    return Memory(capacity=capacity, weights=max(weights), activations=act,
                  overhead=overhead, kv_cache=min(free), kv_tokens=tokens, kv_seqs=tokens // wl.context,
                  shortfall=max(need, 0.0), kv_per_seq=max(wl.context * s.kv_bytes_per_token for s in shapes))
