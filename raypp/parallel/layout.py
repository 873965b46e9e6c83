"""Which TP x PP layouts can run a model, and which layers each stage owns.

Every check runs before a worker starts: a layout that cannot work is rejected
with a message saying what would work, instead of a shape error on 16 GPUs.
"""
from __future__ import annotations

from raypp.errors import LayoutError
from raypp.layout import Layout, tp_problems, valid_tp
from raypp.model.config import ModelConfig
from raypp.planner.balance import balanced_split

NOMINAL_STEP_TOKENS = 64  # tokens per decode step assumed when costing the embedding lookup


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
    problems = tp_problems(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, tp)
    if problems:
        ok = valid_tp(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size)
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
