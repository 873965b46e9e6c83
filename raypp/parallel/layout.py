"""Which TP x PP layouts can run a model, and which layers each stage owns.

Every check runs before a worker starts: a layout that cannot work is rejected
with a message saying what would work, instead of a shape error on 16 GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass

from raypp.errors import LayoutError
from raypp.model.config import ModelConfig
from raypp.planner.balance import balanced_split

NOMINAL_STEP_TOKENS = 64  # tokens per decode step assumed when costing the embedding lookup


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    stage_layers: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def layers_of(self, stage: int) -> range:
        start = sum(self.stage_layers[:stage])
        return range(start, start + self.stage_layers[stage])


def _divisors(n: int, limit: int = 64) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def stage_cost_weights(cfg: ModelConfig) -> tuple[float, float, float]:
    """(layer, embedding, head) cost in weight elements touched per decode step.

    Decode is bound by reading weights, so a layer costs its parameter count,
    the lm_head (+ final norm) its vocab x hidden matrix, and the embedding only
    the rows it gathers.
    """
    d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    layer = d * cfg.num_heads * cfg.head_dim * 2 + 2 * d * kv + 3 * d * cfg.intermediate_size + 2 * d
    return float(layer), float(NOMINAL_STEP_TOKENS * d), float(cfg.vocab_size * d + d)


def make_layout(cfg: ModelConfig, tp: int, pp: int, stage_layers: list[int] | None = None) -> Layout:
    problems = []
    if cfg.num_heads % tp:
        problems.append(f"tp={tp} does not divide num_attention_heads={cfg.num_heads}")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        problems.append(f"tp={tp} and num_key_value_heads={cfg.num_kv_heads}: one must divide the other "
                        f"(KV heads are split, or replicated when tp > KV heads)")
    if cfg.intermediate_size % tp:
        problems.append(f"tp={tp} does not divide intermediate_size={cfg.intermediate_size}")
    if problems:
        ok = [t for t in _divisors(cfg.num_heads) if cfg.intermediate_size % t == 0
              and (cfg.num_kv_heads % t == 0 or t % cfg.num_kv_heads == 0)]
        raise LayoutError("; ".join(problems) + f". tp values that work for this model: {ok}")
    if pp > cfg.num_layers:
        raise LayoutError(f"pp={pp} is more stages than the model's {cfg.num_layers} layers; "
                          f"use pp <= {cfg.num_layers}")
    if stage_layers is None:
        layer, embed, head = stage_cost_weights(cfg)
        stage_layers = balanced_split(cfg.num_layers, pp, layer, embed, head)
    elif sum(stage_layers) != cfg.num_layers or len(stage_layers) != pp:
        raise LayoutError(f"stage_layers={list(stage_layers)} must have pp={pp} entries summing to the "
                          f"model's {cfg.num_layers} layers")
    return Layout(tp, pp, tuple(stage_layers))
