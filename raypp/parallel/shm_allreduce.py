"""All-reduce through shared memory for the TP ranks of one host (CPU workers).

gloo's all-reduce goes through loopback TCP: about 1 ms per call here, and a TP
layer pair calls it twice per token.  Ranks on one host can instead meet in a
shared-memory segment: each writes its partial sum into its own slot, raises its
round counter, waits until every rank's counter reached the round, and adds the
slots in rank order (so every rank gets the same bits).  Two slot sets alternate
between rounds: a rank writes round k+1 only after everyone has written round k,
that is after everyone finished reading round k-1 -- one wait per call suffices.

The rounds run in one C++ call each (kernels/cpu_allreduce.h): in Python they cost ~80 us a call.
Waits are bounded: a rank that never arrives raises after `timeout_s`.  Tensors larger than a
slot, groups that span hosts, and hosts without raypp's CPU kernels (no compiler) use
torch.distributed (gloo).
"""
from __future__ import annotations

import socket
import uuid
from multiprocessing import shared_memory

import numpy as np
import torch
import torch.distributed as dist

from kernels import cpu

SLOT_BYTES = 4 << 20       # decode and short prefill chunks; bigger tensors take gloo
_FLAG_STRIDE = 8           # int64s between counters: one cache line each (as cpu_allreduce.h)


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
        self.segment = torch.frombuffer(self.shm.buf, dtype=torch.uint8)

    @classmethod
    def for_group(cls, group, rank: int, size: int, timeout_s: float) -> "ShmAllReduce | None":
        """A shared-memory all-reduce when every rank of `group` is on this host and every rank
        has raypp's CPU kernels, else None (gloo)."""
        hosts = [None] * size
        dist.all_gather_object(hosts, (_host_id(), cpu.available()), group=group)
        return cls(group, rank, size, timeout_s) if len(set(hosts)) == 1 and hosts[0][1] else None

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sums `t` over the group in place."""
        nbytes = t.numel() * t.element_size()
        if nbytes > self.slot_bytes or not t.is_contiguous() or t.device.type != "cpu":
            dist.all_reduce(t, group=self.group)
            return
        self.round += 1
        if not torch.ops.raypp_cpu.shm_all_reduce(t, self.segment, self.rank, self.size, self.round,
                                                  self.slot_bytes, self.timeout_s):
            late = [r for r in range(self.size) if self.flags[r] < self.round]
            raise TimeoutError(f"TP ranks {late} did not reach all-reduce round {self.round} "
                               f"within {self.timeout_s:g}s")

    def close(self) -> None:
        self.flags = self.segment = None  # views of the segment: it closes only without them
        self.shm.close()
