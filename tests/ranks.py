"""Run one function as every rank of a torch.distributed world, each in its own spawned process."""
from __future__ import annotations

import socket

import torch.multiprocessing as mp


def run_ranks(target, world: int, args: tuple, results_expected: int, timeout_s: float = 240) -> list:
    """Calls `target(rank, world, port, *args, results)` in `world` processes (a free loopback `port`
    for the rendezvous, a queue for `results`); returns the first `results_expected` items put on it
    and asserts every process exited cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=timeout_s) for _ in range(results_expected)]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return got
