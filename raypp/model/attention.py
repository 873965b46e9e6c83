"""Paged attention over a flat batch that mixes prefill chunks and decode tokens.

vLLM's vocabulary: the KV cache of a layer is a pool of fixed-size blocks; a
sequence's *block table* lists its blocks in order, and the *slot mapping* says
where each new token's K/V is written (slot = block * block_size + offset).
The cache is stored flat, [num_blocks * block_size, kv_heads, head_dim], so a
write is one indexed assignment and a read is one gather.

All index tensors are built once per step (`AttentionMetadata.build`) and shared
by every layer.  Decode tokens (one query each) run as one padded, masked batch;
prefill chunks run one sequence at a time with a causal mask that accounts for
the context already in the cache (chunked prefill).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    decode_slots: torch.Tensor     # [B, L] cache slots of each decode's context (padded)
    decode_mask: torch.Tensor      # [B, 1, 1, L] True where a slot is part of the context
    prefills: list[Prefill]

    @property
    def num_tokens(self) -> int:
        return self.positions.numel()

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              block_size: int, all_logits: bool = False) -> "AttentionMetadata":
        """query_lens[i] new tokens of sequence i, whose context becomes seq_lens[i] long."""
        positions, slot_mapping, logits_rows, prefills = [], [], [], []
        decode_rows, decode_ctx = [], []
        row = 0
        for q, n, table in zip(query_lens, seq_lens, block_tables):
            blocks = torch.tensor(table[: (n + block_size - 1) // block_size], dtype=torch.long)
            ctx_slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
            pos = torch.arange(n - q, n)
            positions.append(pos)
            slot_mapping.append(ctx_slots[n - q:])
            logits_rows.extend(range(row, row + q) if all_logits else [row + q - 1])
            if q == 1:
                decode_rows.append(row)
                decode_ctx.append(ctx_slots)
            else:
                mask = None if q == n else torch.arange(n)[None, :] <= pos[:, None]
                prefills.append(Prefill(slice(row, row + q), ctx_slots, mask))
            row += q
        longest = max((s.numel() for s in decode_ctx), default=0)
        decode_slots = torch.zeros(len(decode_ctx), longest, dtype=torch.long)
        decode_mask = torch.zeros(len(decode_ctx), 1, 1, longest, dtype=torch.bool)
        for i, s in enumerate(decode_ctx):
            decode_slots[i, : s.numel()] = s
            decode_mask[i, ..., : s.numel()] = True
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
        return cls(cat(positions), cat(slot_mapping), torch.tensor(logits_rows, dtype=torch.long),
                   torch.tensor(decode_rows, dtype=torch.long), decode_slots, decode_mask, prefills)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens; cache [2, slots, Hkv, D]. Returns [T, Hq, D]."""
    k_cache, v_cache = cache[0], cache[1]  # views; indexing `cache[0, slots]` would copy the whole pool
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    if meta.decode_rows.numel():
        b, length = meta.decode_slots.shape
        slots = meta.decode_slots.flatten()
        qd = q[meta.decode_rows].unsqueeze(2)                                           # [B, Hq, 1, D]
        kd = k_cache.index_select(0, slots).view(b, length, *k.shape[1:]).transpose(1, 2)  # [B, Hkv, L, D]
        vd = v_cache.index_select(0, slots).view(b, length, *v.shape[1:]).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        out[meta.decode_rows] = o.squeeze(2)
    for p in meta.prefills:
        qp = q[p.rows].transpose(0, 1)                                # [Hq, q, D]
        kp = k_cache.index_select(0, p.slots).transpose(0, 1)         # [Hkv, n, D]
        vp = v_cache.index_select(0, p.slots).transpose(0, 1)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None,
                                           scale=scale, enable_gqa=True)
        out[p.rows] = o.transpose(0, 1)
    return out
