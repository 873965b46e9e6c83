"""The shared-memory all-reduce of TP ranks on one host: sums equal to gloo's, the same bits on
every rank, gloo for what does not fit, a bounded wait for a rank that never arrives, and
nothing left in /dev/shm."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from raypp.parallel.shm_allreduce import ShmAllReduce
from tests.ranks import run_ranks

SHAPES = [(1, 64), (16, 1024), (3, 5, 7)]


def _worker(rank, world, port, mode, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    shm = ShmAllReduce.for_group(group, rank, world, timeout_s=3.0)
    assert shm is not None
    out = {}
    if mode == "sums":
        for dtype in (torch.float32, torch.bfloat16):
            for k, shape in enumerate(SHAPES):
                for rnd in range(3):   # several rounds: both slot sets, reused
                    g = torch.Generator().manual_seed(100 * rank + 10 * k + rnd)
                    t = torch.randn(shape, generator=g).to(dtype)
                    ref = t.clone()
                    dist.all_reduce(ref, group=group)
                    shm.all_reduce(t)
                    out[(str(dtype), k, rnd)] = (t.float().numpy(), ref.float().numpy())
        big = torch.full((2, shm.slot_bytes // 4), float(rank + 1))   # twice a slot: gloo
        shm.all_reduce(big)
        out["big"] = float(big[0, 0])
        out["leftover"] = [f for f in os.listdir("/dev/shm") if f.startswith("raypp-tp-")]
    elif mode == "late":
        t = torch.ones(4)
        if rank == 0:
            start = time.monotonic()
            try:
                shm.all_reduce(t)
                out["error"] = None
            except TimeoutError as e:
                out["error"], out["waited"] = str(e), time.monotonic() - start
        dist.barrier(group=group)   # rank 1 never joined the shared-memory round
    results.put((rank, out))
    shm.close()
    dist.destroy_process_group()


def run(world, mode):
    return dict(run_ranks(_worker, world, (mode,), world, timeout_s=120))


@pytest.mark.parametrize("world", [2, 3])
def test_sums_match_gloo_and_are_identical_on_every_rank(world):
    got = run(world, "sums")
    keys = [k for k in got[0] if isinstance(k, tuple)]
    for key in keys:
        for rank in range(world):
            mine, ref = got[rank][key]
            tol = 1e-5 if "float32" in key[0] else 2e-2
            assert abs(mine - ref).max() <= tol * max(1.0, abs(ref).max()), key
            assert (mine == got[0][key][0]).all()   # the same bits everywhere
    assert all(got[r]["big"] == sum(range(1, world + 1)) for r in range(world))
    assert all(not got[r]["leftover"] for r in range(world))


def test_a_rank_that_never_arrives_raises_within_the_timeout():
    got = run(2, "late")
    assert "TP ranks [1] did not reach" in got[0]["error"]
    assert got[0]["waited"] < 10
