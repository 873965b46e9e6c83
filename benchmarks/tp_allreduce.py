#!/usr/bin/env python3
"""TP all-reduce on one host: gloo (loopback TCP) against raypp's shared-memory all-reduce.

    python benchmarks/tp_allreduce.py [--world 2] [--iters 300] [--out benchmarks/results/tp_allreduce.json]

Each rank is a process with one torch thread (as a CPU worker is); sizes are a decode step's
activations (batch x hidden fp32 for the `small` model's hidden 1024) up to a prefill chunk's.
Median microseconds per call, both paths timed in the same processes, interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raypp.parallel.shm_allreduce import ShmAllReduce  # noqa: E402

ROWS = [1, 16, 32, 256]
HIDDEN = 1024


def worker(rank: int, world: int, port: int, iters: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    shm = ShmAllReduce.for_group(group, rank, world, timeout_s=60)
    out = {}
    for rows in ROWS:
        t = torch.randn(rows, HIDDEN)
        times = {"gloo": [], "shm": []}
        for i in range(iters):
            for name, fn in (("gloo", lambda x: dist.all_reduce(x, group=group)), ("shm", shm.all_reduce)):
                dist.barrier(group=group)
                start = time.perf_counter()
                fn(t)
                times[name].append(time.perf_counter() - start)
        out[rows] = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    results.put((rank, out))
    shm.close()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tp_allreduce.json"))
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    before = os.getloadavg()
    procs = [ctx.Process(target=worker, args=(r, args.world, port, args.iters, results)) for r in range(args.world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    rank0 = got[0]
    table = {f"{rows}x{HIDDEN} fp32": {"gloo_us": v["gloo"], "shm_us": v["shm"], "speedup": v["gloo"] / v["shm"]}
             for rows, v in rank0.items()}
    out = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]), "world": args.world,
           "loadavg_before": before, "loadavg_after": os.getloadavg(), "median_us_rank0": table}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
