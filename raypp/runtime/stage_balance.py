"""Which layer split the measured stage times call for.

A pipeline runs at the pace of its slowest stage.  The default split balances an
estimate (planner/balance.py); on real hardware a stage can still come out slower
(a large lm_head, a slower node, a busier core).  From the measured busy time per
step of each stage this module derives the cost of one layer (from the stages
that hold only layers) and of the last stage's head, and asks the same exact
balancing programme for the split that evens them out.
"""
from __future__ import annotations

from raypp.planner.balance import balanced_split

# A stage more than this far above the mean is worth a different split.
IMBALANCE_TOLERANCE = 0.10


def suggest_stage_layers(stage_layers: tuple[int, ...] | list[int], busy_per_step: list[float]) -> list[int] | None:
    """The `stage_layers` that would balance the measured stages, or None if they are balanced
    (slowest within 10% of the mean) or no better split exists."""
    pp = len(stage_layers)
    if pp < 2 or min(busy_per_step) <= 0:
        return None
    mean = sum(busy_per_step) / pp
    if max(busy_per_step) <= (1 + IMBALANCE_TOLERANCE) * mean:
        return None
    # Stage 0's embedding lookup is a gather, negligible next to a layer's matmuls.
    layer = sum(busy_per_step[:-1]) / sum(stage_layers[:-1])
    head = max(0.0, busy_per_step[-1] - stage_layers[-1] * layer)
    split = balanced_split(sum(stage_layers), pp, layer, 0.0, head)
    return split if split != list(stage_layers) else None
