"""All-reduce through shared memory for the TP ranks of one host (CPU workers).

gloo's all-reduce goes through loopback TCP: about 1 ms per call here, and a TP
layer pair calls it twice per token.  Ranks on one host can instead meet in a
shared-memory segment: each writes its partial sum into its own slot, raises its
round counter, waits until every rank's counter reached the round, and adds the
slots in rank order (so every rank gets the same bits).  Two slot sets alternate
between rounds: a rank writes round k+1 only after everyone has written round k,
that is after everyone finished reading round k-1 -- one wait per call suffices.

Waits are bounded: a rank that never arrives raises after `timeout_s`.  Tensors
larger than a slot, and groups that span hosts, use torch.distributed (gloo).
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from multiprocessing import shared_memory

import numpy as np
import torch
import torch.distributed as dist

SLOT_BYTES = 4 << 20       # decode and short prefill chunks; bigger tensors take gloo
_FLAG_STRIDE = 8           # int64s between counters: one cache line each
_SPINS_BEFORE_YIELD = 200


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class ShmAllReduce:
    def __init__(self, group, rank: int, size: int, timeout_s: float, slot_bytes: int = SLOT_BYTES):
        """Collective over `group` (ranks 0..size-1 of it): every rank constructs it at the same point."""
        self.group, self.rank, self.size = group, rank, size
        self.timeout_s, self.slot_bytes = timeout_s, slot_bytes
        self.round = 0
        header = size * _FLAG_STRIDE * 8
        box = [f"raypp-tp-{uuid.uuid4().hex[:12]}" if rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        if rank == 0:
            self.shm = shared_memory.SharedMemory(name=box[0], create=True, size=header + 2 * size * slot_bytes)
        dist.barrier(group=group)
        if rank != 0:
            self.shm = shared_memory.SharedMemory(name=box[0])
        dist.barrier(group=group)
        if rank == 0:
            self.shm.unlink()   # every rank has it mapped: the name can go, nothing is left in /dev/shm
        self.flags = np.ndarray((size * _FLAG_STRIDE,), dtype=np.int64, buffer=self.shm.buf)[::_FLAG_STRIDE]
        self._header = header

    @classmethod
    def for_group(cls, group, rank: int, size: int, timeout_s: float) -> "ShmAllReduce | None":
        """A shared-memory all-reduce when every rank of `group` is on this host, else None (gloo)."""
        hosts = [None] * size
        dist.all_gather_object(hosts, _host_id(), group=group)
        return cls(group, rank, size, timeout_s) if len(set(hosts)) == 1 else None

    def _slot(self, parity: int, rank: int, nbytes: int) -> memoryview:
        start = self._header + (parity * self.size + rank) * self.slot_bytes
        return self.shm.buf[start: start + nbytes]

    def _wait_all(self, k: int) -> None:
        spins, deadline = 0, None
        while self.flags.min() < k:
            spins += 1
            if spins < _SPINS_BEFORE_YIELD:
                continue
            os.sched_yield()
            now = time.monotonic()
            deadline = deadline or now + self.timeout_s
            if now > deadline:
                late = [r for r in range(self.size) if self.flags[r] < k]
                raise TimeoutError(f"TP ranks {late} did not reach all-reduce round {k} within {self.timeout_s:g}s")

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sums `t` over the group in place."""
        nbytes = t.numel() * t.element_size()
        if nbytes > self.slot_bytes or not t.is_contiguous() or t.device.type != "cpu":
            dist.all_reduce(t, group=self.group)
            return
        self.round += 1
        parity = self.round % 2
        mine = torch.frombuffer(self._slot(parity, self.rank, nbytes), dtype=t.dtype).view_as(t)
        mine.copy_(t)
        self.flags[self.rank] = self.round
        self._wait_all(self.round)
        t.copy_(torch.frombuffer(self._slot(parity, 0, nbytes), dtype=t.dtype).view_as(t))
        for r in range(1, self.size):
            t.add_(torch.frombuffer(self._slot(parity, r, nbytes), dtype=t.dtype).view_as(t))

    def close(self) -> None:
        self.flags = None
        self.shm.close()
