"""One Ray placement group per pipeline stage: `tp` bundles, STRICT_PACK (one node).

A stage's TP workers all-reduce twice per layer, so they must share a node (and
its NVLink); stages only exchange one activation tensor per step, so they may
sit on different nodes, and with several nodes each stage is steered to a node
no earlier stage took.  Placement waits at most `placement_timeout_s`; if the
cluster cannot host the layout the error names what each stage asked for and
what every node has free, and nothing is left reserved.
"""
from __future__ import annotations

import time

from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from raypp.config import ParallelSection
from raypp.errors import PlacementError


def worker_bundle(parallel: ParallelSection) -> dict[str, float]:
    bundle = {"CPU": parallel.cpus_per_worker}
    if parallel.device == "cuda":
        bundle["GPU"] = 1.0
    bundle.update(parallel.placement_resources)
    return bundle


def _free_per_node() -> dict[str, dict[str, float]]:
    from ray._private.state import available_resources_per_node
    return available_resources_per_node()


def _fits(free: dict[str, float], bundle: dict[str, float], count: int) -> bool:
    return all(free.get(k, 0.0) >= v * count for k, v in bundle.items())


def describe_shortfall(tp: int, pp: int, bundle: dict[str, float]) -> str:
    nodes = "; ".join(
        f"node {nid[:8]}: " + ", ".join(f"{k}={free.get(k, 0.0):g}" for k in sorted(bundle))
        for nid, free in sorted(_free_per_node().items())) or "no alive nodes"
    need = ", ".join(f"{k}={v * tp:g}" for k, v in bundle.items())
    return (f"cannot place {pp} stage(s) of {tp} workers: each stage needs one node with {need} free "
            f"({tp} bundles of {bundle}, STRICT_PACK). Free now: {nodes}. "
            f"Add nodes, lower tp/pp, or fix parallel.device / placement_resources")


def create_stage_groups(tp: int, pp: int, parallel: ParallelSection, name: str = "raypp") -> list[PlacementGroup]:
    bundle = worker_bundle(parallel)
    deadline = time.monotonic() + parallel.placement_timeout_s
    groups: list[PlacementGroup] = []
    used_nodes: set[str] = set()
    try:
        for stage in range(pp):
            free = _free_per_node()
            target = next((nid for nid, f in free.items() if nid not in used_nodes and _fits(f, bundle, tp)), None)
            pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK",
                                 name=f"{name}-stage{stage}", _soft_target_node_id=target)
            groups.append(pg)
            if not pg.wait(max(0.0, deadline - time.monotonic())):
                remove_groups(groups)  # first, so the message shows what the cluster really has free
                groups.clear()
                raise PlacementError(f"placement timed out after {parallel.placement_timeout_s:g}s at stage {stage}: "
                                     + describe_shortfall(tp, pp, bundle))
            used_nodes.add(stage_node(pg))
    except BaseException:
        remove_groups(groups)
        raise
    return groups


def stage_node(pg: PlacementGroup) -> str:
    from ray.util import placement_group_table
    return placement_group_table(pg)["bundles_to_node_id"][0]


def remove_groups(groups: list[PlacementGroup]) -> None:
    for pg in groups:
        try:
            remove_placement_group(pg)
        except Exception:  # already gone with a dead cluster: nothing left to free
            pass
