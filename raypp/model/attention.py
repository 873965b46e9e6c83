"""Paged attention over a flat batch that mixes prefill chunks and decode tokens.

vLLM's vocabulary: the KV cache of a layer is a pool of fixed-size blocks; a
sequence's *block table* lists its blocks in order, and the *slot mapping* says
where each new token's K/V is written (slot = block * block_size + offset).
The cache is stored flat, [num_blocks * block_size, kv_heads, head_dim], so a
write is one indexed assignment and a read is one gather.

All index tensors are built once per step (`AttentionMetadata.build`, on the host),
moved to the model's device once (`to`, pinned and non-blocking) and shared by every
layer.  `ops.attention` runs the batch: on the CPU kernels, all of it in one call that
reads K/V in place through every sequence's block table; otherwise decode tokens (one
query each) as one batch through `ops.decode_attention` (a Triton or FlashInfer kernel on
CUDA, a padded, masked gather in the torch reference) and prefill chunks one sequence at a
time with a causal mask that accounts for the context already in the cache (chunked prefill).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from raypp.model import ops


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor -> device without blocking the host: pinned staging, async copy."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class Prefill:
    rows: slice            # this chunk's rows in the flat batch
    slots: torch.Tensor    # cache slots of the whole context so far, [seq_len]
    mask: torch.Tensor | None  # [q, seq_len] causal mask; None when the chunk is the whole sequence


@dataclass
class AttentionMetadata:
    positions: torch.Tensor        # [T] absolute position of every token
    slot_mapping: torch.Tensor     # [T] where each token's K/V goes
    logits_rows: torch.Tensor      # rows whose logits the last stage computes
    decode_rows: torch.Tensor      # [B] rows that are single-token decodes
    decode_tables: torch.Tensor    # [B, max blocks] int32 block table of each decode, padded with block 0
    decode_lens: torch.Tensor      # [B] int32 context length of each decode, the new token included
    decode_max_len: int            # the longest of decode_lens, known on the host
    # FlashInfer's CSR page lists (indptr, indices, last page length), int32; they stay on the
    # host in `to`, where FlashInfer plans (a device copy would cost a sync every step).
    decode_pages: tuple
    prefills: list[Prefill]
    block_size: int
    # The whole batch for the CPU kernels' one attention call (None in DecodeGraph's, made by hand):
    tables: torch.Tensor | None = None        # [S, max blocks] int32 block table of every sequence
    seq_lens: torch.Tensor | None = None      # [S] int32 context length of every sequence, new tokens included
    query_starts: torch.Tensor | None = None  # [S + 1] int32: sequence i's new tokens are rows [s[i], s[i + 1])
    plans: dict = field(default_factory=dict)  # per-step kernel plans (FlashInfer), shared by all layers

    @property
    def num_tokens(self) -> int:
        return self.positions.numel()

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              block_size: int, all_logits: bool = False) -> "AttentionMetadata":
        """query_lens[i] new tokens of sequence i, whose context becomes seq_lens[i] long."""
        positions, slot_mapping, logits_rows, prefills = [], [], [], []
        decode_rows, decode_blocks, decode_lens, all_blocks = [], [], [], []
        row = 0
        for q, n, table in zip(query_lens, seq_lens, block_tables):
            blocks = torch.tensor(table[: (n + block_size - 1) // block_size], dtype=torch.long)
            all_blocks.append(blocks)
            ctx_slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
            pos = torch.arange(n - q, n)
            positions.append(pos)
            slot_mapping.append(ctx_slots[n - q:])
            logits_rows.extend(range(row, row + q) if all_logits else [row + q - 1])
            if q == 1:
                decode_rows.append(row)
                decode_blocks.append(blocks)
                decode_lens.append(n)
            else:
                mask = None if q == n else torch.arange(n)[None, :] <= pos[:, None]
                prefills.append(Prefill(slice(row, row + q), ctx_slots, mask))
            row += q
        tables = _padded_tables(decode_blocks)
        lens = torch.tensor(decode_lens, dtype=torch.int32)
        pages = torch.tensor([b.numel() for b in decode_blocks], dtype=torch.int32)
        indptr = torch.cat((torch.zeros(1, dtype=torch.int32), pages.cumsum(0, dtype=torch.int32)))
        indices = torch.cat(decode_blocks).int() if decode_blocks else torch.zeros(0, dtype=torch.int32)
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
        return cls(cat(positions), cat(slot_mapping), torch.tensor(logits_rows, dtype=torch.long),
                   torch.tensor(decode_rows, dtype=torch.long), tables, lens, max(decode_lens, default=0),
                   (indptr, indices, lens - (pages - 1) * block_size), prefills, block_size,
                   tables=_padded_tables(all_blocks), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                   query_starts=torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32))

    def to(self, device: torch.device | str) -> "AttentionMetadata":
        """The same metadata with every tensor on `device` (itself when already there)."""
        if self.positions.device.type == torch.device(device).type:
            return self
        move = lambda t: to_device(t, device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        moved = {f.name: move(getattr(self, f.name)) for f in fields(self) if f.name not in ("prefills", "plans")}
        prefills = [Prefill(p.rows, move(p.slots), None if p.mask is None else move(p.mask)) for p in self.prefills]
        return replace(self, **moved, prefills=prefills, plans={})


def _padded_tables(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Block tables of different lengths as one int32 [len, widest] tensor, padded with block 0."""
    tables = torch.zeros(len(blocks), max((b.numel() for b in blocks), default=0), dtype=torch.int32)
    for i, b in enumerate(blocks):
        tables[i, : b.numel()] = b
    return tables


def paged_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, Hq, D] of the new tokens, whose K/V are already in cache [2, slots, Hkv, D]
    (ops.rope_and_cache).  Returns [T, Hq, D]."""
    return ops.attention(q, cache[0], cache[1], meta, scale)
