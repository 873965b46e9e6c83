"""Cost-balanced pipeline stage split (pure arithmetic).

A pipeline runs at the pace of its slowest stage, so layers are split into
contiguous stages minimising the largest stage cost.  Stage 0 also pays for the
embedding and the last stage for the final norm + lm_head; with a large
vocabulary the lm_head alone can cost more than a layer, which is why a naive
equal split of layers leaves the last stage slowest.
"""
from __future__ import annotations

from functools import lru_cache


def stage_costs(stage_layers: list[int], layer_cost: float, embed_cost: float, head_cost: float) -> list[float]:
    costs = [n * layer_cost for n in stage_layers]
    costs[0] += embed_cost
    costs[-1] += head_cost
    return costs


def balanced_split(num_layers: int, num_stages: int, layer_cost: float = 1.0,
                   embed_cost: float = 0.0, head_cost: float = 0.0) -> list[int]:
    """Layers per stage (each >= 1) minimising the slowest stage's cost.

    Exact dynamic programme over contiguous splits; ties go to the split that
    puts layers earlier, which keeps the answer deterministic.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(
            f"cannot split {num_layers} layers into {num_stages} stages: every stage needs a layer; "
            f"use pp <= {num_layers}")

    @lru_cache(maxsize=None)
    def best(start: int, stages_left: int) -> tuple[float, tuple[int, ...]]:
        remaining = num_layers - start
        first = stages_left == num_stages
        if stages_left == 1:
            cost = remaining * layer_cost + head_cost + (embed_cost if first else 0.0)
            return cost, (remaining,)
        options = []
        for n in range(1, remaining - stages_left + 2):
            cost_here = n * layer_cost + (embed_cost if first else 0.0)
            rest_cost, rest = best(start + n, stages_left - 1)
            options.append((max(cost_here, rest_cost), -n, (n,) + rest))
        cost, _, split = min(options)
        return cost, split

    return list(best(0, num_stages)[1])
