"""The TP x PP layout of one model replica, and which TP degrees a model admits.

Plain arithmetic, no torch: the runtime (`raypp/parallel/layout.py` builds and
checks one for a checkpoint), the planner (which prices many) and the config
checks share this one type and these rules.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    stage_layers: tuple[int, ...]    # layers per stage (empty while the planner has not split them yet)
    replicas: int = 1                # data-parallel copies on the rest of a cluster (the planner's choice)

    @property
    def world_size(self) -> int:
        """Workers (GPUs) of one replica."""
        return self.tp * self.pp

    @property
    def name(self) -> str:
        return f"TP{self.tp}xPP{self.pp}" + (f" x{self.replicas}" if self.replicas > 1 else "")

    def rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def layers_of(self, stage: int) -> range:
        start = sum(self.stage_layers[:stage])
        return range(start, start + self.stage_layers[stage])

    def stage_node(self, stage: int, gpus_per_node: int) -> int:
        """The node a stage lands on when stages are packed onto nodes in order."""
        return stage * self.tp // gpus_per_node

    def micro_batches(self, concurrency: int, requested: int | None) -> int:
        """Micro-batches in flight: the request, else pp; never more than there are sequences."""
        return max(1, min(requested or self.pp, concurrency))


def tp_problems(heads: int, kv_heads: int, intermediate: int, tp: int) -> list[str]:
    """Why `tp` cannot shard a model of these shapes (empty when it can).  Query heads and the MLP
    are split evenly; KV heads are split, or replicated when there are fewer than TP ranks."""
    out = []
    if heads % tp:
        out.append(f"tp={tp} does not divide num_attention_heads={heads}")
    if kv_heads % tp and tp % kv_heads:
        out.append(f"tp={tp} and num_key_value_heads={kv_heads}: one must divide the other "
                   f"(KV heads are split, or replicated when tp > KV heads)")
    if intermediate % tp:
        out.append(f"tp={tp} does not divide intermediate_size={intermediate}")
    return out


def valid_tp(heads: int, kv_heads: int, intermediate: int, limit: int = 64) -> list[int]:
    return [t for t in range(1, min(heads, limit) + 1) if not tp_problems(heads, kv_heads, intermediate, t)]
