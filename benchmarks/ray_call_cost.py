#!/usr/bin/env python3
"""The fixed cost of sending one step to the workers: plain Ray actor calls vs a Ray Compiled Graph.

    python benchmarks/ray_call_cost.py [--actors 2] [--steps 300] [--out benchmarks/results/ray_call_cost.json]

Each round sends one decode `StepInput` of 16 sequences (as the engine does at PP=2 with 32
requests in two micro-batches) to every actor and waits for all their small replies; the
actors do nothing else, so the round trip is Ray's own cost.  Measured: wall time and the
driver's CPU time per round, for `ray.put` + one `.remote()` per actor, for the step passed
by value in each call (inlined in the task: raypp's executor), and for the same actors behind
`ray.dag` compiled with shared-memory channels.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raypp.model.sampling_params import SamplingParams  # noqa: E402
from raypp.runtime.step import StepInput  # noqa: E402


def decode_step(n: int = 16) -> StepInput:
    g = SamplingParams(max_tokens=64, temperature=0)
    return StepInput(list(range(n)), [1] * n, [160] * n, [list(range(i * 10, i * 10 + 10)) for i in range(n)],
                     list(range(n)), [g] * n, [0] * n, [3] * n, step_id=7)


class Echo:
    def execute(self, step: StepInput) -> int:
        return step.step_id


def timed(fn, steps: int) -> dict:
    for _ in range(20):
        fn()
    wall, cpu = [], []
    for _ in range(steps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"wall_us_p50": statistics.median(wall) * 1e6, "wall_us_mean": statistics.fmean(wall) * 1e6,
            "driver_cpu_us_mean": statistics.fmean(cpu) * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_call_cost.json"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.dag import InputNode, MultiOutputNode

    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)
    step = decode_step()
    out = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
           "loadavg_before": os.getloadavg(), "actors": args.actors, "ray": ray.__version__}
    try:
        actors = [ray.remote(num_cpus=0.5)(Echo).remote() for _ in range(args.actors)]

        def plain():
            ref = ray.put(step)
            ray.get([a.execute.remote(ref) for a in actors])
        out["plain_actor_calls"] = timed(plain, args.steps)
        out["plain_actor_calls_by_value"] = timed(lambda: ray.get([a.execute.remote(step) for a in actors]),
                                                  args.steps)
        with InputNode() as inp:
            dag = MultiOutputNode([a.execute.bind(inp) for a in actors])
        try:
            compiled = dag.experimental_compile()
            out["compiled_graph"] = timed(lambda: ray.get(compiled.execute(step)), args.steps)
            compiled.teardown()
        except Exception as e:  # recorded, not hidden: the comparison then has one side
            out["compiled_graph"] = {"error": repr(e)[:500]}
    finally:
        ray.shutdown()
    out["loadavg_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
