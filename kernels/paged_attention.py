"""Decode attention (one query token per sequence) over raypp's paged KV cache, and the
reference for a prefill chunk over its cached prefix (kernels/cpu.cpp runs both on the CPU).

The cache of a layer is flat, [num_blocks * block_size, kv_heads, head_dim] for K and for
V; sequence b's context is the slots of the blocks in block_tables[b], in order, cut at
context_lens[b].  The kernel reads K/V in place through the table: nothing is gathered
into a contiguous copy first, which is what the reference does (and why it moves every
context byte twice).

One program per (sequence, kv head) serves all the query heads that share that kv head
(GQA), so each K/V byte is read once.  The context is walked BLOCK_N tokens at a time with
an online softmax (FlashAttention's running max and sum) in fp32.  When sequences x kv heads
are too few to fill the GPU (batch 1, long context), the context is split across programs
and a second pass combines the partial results (flash-decoding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import jit, tl, triton


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, max_len: int,
                               block_size: int, scale: float) -> torch.Tensor:
    """q [B, Hq, D]; k/v_cache [slots, Hkv, D]; block_tables [B, max_blocks]; context_lens [B].

    max_len (>= every context length) is a host int so that no device value is read back.
    """
    b = q.shape[0]
    blocks = block_tables[:, : (max_len + block_size - 1) // block_size].long()
    offsets = torch.arange(block_size, device=q.device)
    slots = (blocks[:, :, None] * block_size + offsets).flatten(1)[:, :max_len].flatten()
    mask = (torch.arange(max_len, device=q.device) < context_lens[:, None]).view(b, 1, 1, max_len)
    k = k_cache.index_select(0, slots).view(b, max_len, *k_cache.shape[1:]).transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache.index_select(0, slots).view(b, max_len, *v_cache.shape[1:]).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.squeeze(2)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                                mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One sequence's prefill chunk: q [q, Hq, D] are the last q of its len(slots) context
    tokens, whose cache slots are `slots`; mask [q, len(slots)] is causal over the cached
    prefix and the chunk (None when the chunk is the whole context).  Returns [q, Hq, D]."""
    k = k_cache.index_select(0, slots).transpose(0, 1)  # [Hkv, n, D]
    v = v_cache.index_select(0, slots).transpose(0, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, is_causal=mask is None,
                                       scale=scale, enable_gqa=True)
    return o.transpose(0, 1)


@jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, stats_ptr, tables_ptr, lens_ptr, scale, split_len,
                   stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_ob, stride_oh, stride_tb,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLITS: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if USE_PDL == 2:  # (kernels/fused_gemv.py: the next kernel may launch now)
        tl.extra.cuda.gdc_launch_dependents()
    if USE_PDL > 0:  # launched while the previous kernel drains: wait for its q and cache writes
        tl.extra.cuda.gdc_wait()
    if USE_PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    length = tl.load(lens_ptr + b)
    # tl.dot needs at least 16 rows, so the GROUP query heads are padded to BLOCK_G.
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gd_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gd_mask, other=0.0)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(split * split_len, tl.minimum(length, (split + 1) * split_len), BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < length
        block = tl.load(tables_ptr + b * stride_tb + n // BLOCK_SIZE, mask=n_mask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
        nd_mask = n_mask[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :], mask=nd_mask, other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N], fp32
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    if SPLITS == 1:
        out = acc / denom[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(q.dtype), mask=gd_mask)
    else:
        # Partial results [B, Hq, SPLITS, D] and (max, sum) [B, Hq, SPLITS, 2], fp32, for _combine_kernel.
        # A split past the end of a short sequence leaves max = -inf, sum = 0: it weighs nothing.
        row = (b * (tl.num_programs(1) * GROUP) + heads) * SPLITS + split
        tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=gd_mask)
        tl.store(stats_ptr + row * 2, m, mask=g < GROUP)
        tl.store(stats_ptr + row * 2 + 1, denom, mask=g < GROUP)


@jit
def _combine_kernel(part_ptr, stats_ptr, out_ptr, q_heads, stride_ob, stride_oh,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, USE_PDL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    if USE_PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    if USE_PDL > 0:
        tl.extra.cuda.gdc_wait()
    if USE_PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    row = (b * q_heads + h) * SPLITS + sp
    m = tl.load(stats_ptr + row * 2)
    denom = tl.load(stats_ptr + row * 2 + 1)
    w = tl.exp(m - tl.max(m, axis=0))
    acc = tl.load(part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=d[None, :] < HEAD_DIM, other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(denom * w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def num_splits(batch: int, kv_heads: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Context splits per (sequence, kv head), a power of two: enough programs to fill the GPU
    when the batch alone does not (flash-decoding), at most one per BLOCK_N tile.  A program
    walks its tiles one dependent load after another, so even a short context gains: batch 1,
    256 tokens, 32/8 heads of 128 took 5.6 us split and 7.9 us whole on an H200."""
    if device.type != "cuda":
        return 1
    programs = batch * kv_heads
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(max_len, block_n)
    return min(triton.next_power_of_2(triton.cdiv(2 * sms, programs)), 1 << (tiles.bit_length() - 1), 64)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, max_len: int,
                           block_size: int, scale: float, splits: int | None = None,
                           pdl: int = 0) -> torch.Tensor:
    """Same contract as the reference; block_tables and context_lens are int32.  `splits`
    (a power of two) overrides num_splits; it depends only on host ints, so a CUDA graph
    captured for one max_len replays the same launch.  pdl (0, 1 or 2): launch as a programmatic
    dependent of the previous kernel (Hopper; the fused batch-1 decode, see fused_gemv.py)."""
    batch, q_heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = q_heads // kv_heads
    out = torch.empty_like(q)
    block_d = triton.next_power_of_2(dim)
    # 64 context tokens per iteration keeps a [64, D] K and V tile in flight per program.
    block_n = 64 if block_d <= 128 else 32
    splits = splits or num_splits(batch, kv_heads, max_len, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n
    part = stats = out  # unused when there is one split
    launch = {"launch_pdl": True} if pdl else {}  # the interpreter takes no such option
    if splits > 1:
        part = torch.empty(batch, q_heads, splits, dim, dtype=torch.float32, device=q.device)
        stats = torch.empty(batch, q_heads, splits, 2, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, out, part, stats, block_tables, context_lens, scale, split_len,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLITS=splits,
        # fp32 caches get exact fp32 products, not Triton's default tf32; 16-bit ones ignore this.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", USE_PDL=int(pdl), num_warps=4, num_stages=2,
        **launch)
    if splits > 1:
        _combine_kernel[(batch, q_heads)](part, stats, out, q_heads, out.stride(0), out.stride(1),
                                          HEAD_DIM=dim, BLOCK_D=block_d, SPLITS=splits, USE_PDL=int(pdl), **launch)
    return out
