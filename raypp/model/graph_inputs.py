"""The per-step inputs of a decode graph (cuda_graph.py): one host copy a step.

A replay reads its inputs at the addresses of capture: token ids (a stage that embeds),
positions, new-token slots, context lengths and block tables.  They live in one device
buffer, typed views of its bytes, and each step fills one pinned host buffer of the same
layout and copies it in with one non-blocking copy.  Four freshly pinned tensors and four
copies a step cost host time while the GPU waits: on an H100 the worker's graph step took
1.03-1.06x the time at batch 1 to 64 (docs/benchmarks.md).

The host buffer is reused, so a step first waits for the previous step's copy to have read
it (an event; long done in steady state, since the caller waited for that step's ids).
"""
from __future__ import annotations

import torch


class GraphInputs:
    def __init__(self, batch: int, max_blocks: int, block_size: int, scratch_block: int, token_ids: bool,
                 device: torch.device):
        rows64 = 3 if token_ids else 2  # [token ids,] positions, slots: int64; lengths, tables: int32
        nbytes = 8 * rows64 * batch + 4 * batch * (1 + max_blocks)
        pinned = device.type == "cuda"
        self.device_bytes = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.host_bytes = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.copied = torch.cuda.Event() if pinned else None
        self.batch, self.block_size, self.scratch_block, self.token_ids = batch, block_size, scratch_block, token_ids
        (self.ids, self.positions, self.slots, self.lens, self.tables) = self._views(self.device_bytes, rows64)
        host = self._views(self.host_bytes, rows64)
        self._host = [None if t is None else t.numpy() for t in host]
        # Until a step fills them, every row is padding.
        if self.token_ids:
            self._host[0][:] = 0
        self._pad(0, max_blocks)
        self.device_bytes.copy_(self.host_bytes)

    def _pad(self, first: int, width: int) -> None:
        """Rows from `first` on become one-token contexts in the scratch block (their token ids
        stay: finite, and their outputs are dropped); `width` table columns are set."""
        _, h_pos, h_slots, h_lens, h_tables = self._host
        h_pos[first:], h_slots[first:], h_lens[first:] = 0, self.scratch_block * self.block_size, 1
        h_tables[first:, :width] = self.scratch_block

    def _views(self, buf: torch.Tensor, rows64: int):
        batch = self.batch
        wide = buf[: 8 * rows64 * batch].view(torch.int64).view(rows64, batch)
        narrow = buf[8 * rows64 * batch:].view(torch.int32)
        ids = wide[0] if self.token_ids else None
        return ids, wide[-2], wide[-1], narrow[:batch], narrow[batch:].view(batch, -1)

    def stage(self, ids: list[int] | None, seq_lens: list[int], block_tables: list[list[int]]) -> None:
        """Fills the inputs of len(seq_lens) sequences (ids: their token ids, or None when the
        caller copies x itself); the rows past them are padding (`_pad`)."""
        if self.copied is not None:
            self.copied.synchronize()
        n, bs = len(seq_lens), self.block_size
        h_ids, h_pos, h_slots, h_lens, h_tables = self._host
        positions = [s - 1 for s in seq_lens]
        if ids is not None:
            h_ids[:n] = ids
        h_pos[:n], h_lens[:n] = positions, seq_lens
        h_slots[:n] = [t[p // bs] * bs + p % bs for t, p in zip(block_tables, positions)]
        width = (max(seq_lens) + bs - 1) // bs  # the kernels read no column past a row's length
        filler = [self.scratch_block] * width
        h_tables[:n, :width] = [(t[:width] + filler)[:width] for t in block_tables]
        self._pad(n, width)
        self.device_bytes.copy_(self.host_bytes, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
