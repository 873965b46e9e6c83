"""Rotary position embedding on [tokens, heads, head_dim] (Hugging Face's half-split
layout), fused with the KV-cache write that follows it.

cos/sin are [tokens, head_dim] with both halves equal (rope.rope_cos_sin), so the kernel
reads only their first halves.  One program per token rotates all of its q and k heads
(the cos/sin row is loaded once) and stores k and v straight into their cache slots.
"""
from __future__ import annotations

import torch

from kernels import jit, tl, triton


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope_and_cache_ref(q, k, v, cos, sin, k_cache, v_cache, slots):
    """Rotates q and k, writes k and v into the cache at `slots`; returns the rotated q."""
    k_cache.index_copy_(0, slots, rotary_ref(k, cos, sin))
    v_cache.index_copy_(0, slots, v)
    return rotary_ref(q, cos, sin)


@jit
def _rope_and_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                           q_heads, kv_heads, half, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                           stride_vh, stride_ct, stride_qot, stride_qoh, stride_kct, stride_kch, stride_vct,
                           stride_vch, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One launch instead of four (rotate q, rotate k, write k, write v): at batch 1 a decode
    # step is mostly launches, and these are four of a layer's fifteen.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < half
    c = tl.load(cos_ptr + t * stride_ct + d, mask=dmask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_ct + d, mask=dmask, other=0.0).to(tl.float32)

    qmask = (h < q_heads) & dmask
    q_row = q_ptr + t * stride_qt + h * stride_qh
    q1 = tl.load(q_row + d, mask=qmask, other=0.0)
    a, b = q1.to(tl.float32), tl.load(q_row + half + d, mask=qmask, other=0.0).to(tl.float32)
    qo_row = q_out_ptr + t * stride_qot + h * stride_qoh
    tl.store(qo_row + d, (a * c - b * s).to(q1.dtype), mask=qmask)
    tl.store(qo_row + half + d, (b * c + a * s).to(q1.dtype), mask=qmask)

    kmask = (h < kv_heads) & dmask
    k_row = k_ptr + t * stride_kt + h * stride_kh
    k1 = tl.load(k_row + d, mask=kmask, other=0.0)
    a, b = k1.to(tl.float32), tl.load(k_row + half + d, mask=kmask, other=0.0).to(tl.float32)
    kc_row = k_cache_ptr + slot * stride_kct + h * stride_kch
    tl.store(kc_row + d, (a * c - b * s).to(k_cache_ptr.dtype.element_ty), mask=kmask)
    tl.store(kc_row + half + d, (b * c + a * s).to(k_cache_ptr.dtype.element_ty), mask=kmask)
    v_row = v_ptr + t * stride_vt + h * stride_vh
    vc_row = v_cache_ptr + slot * stride_vct + h * stride_vch
    tl.store(vc_row + d, tl.load(v_row + d, mask=kmask), mask=kmask)
    tl.store(vc_row + half + d, tl.load(v_row + half + d, mask=kmask), mask=kmask)


def rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots):
    """q [T, Hq, D], k/v [T, Hkv, D] (last dims contiguous); k/v_cache [slots, Hkv, D]; slots [T]."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cos, sin = cos.contiguous(), sin.contiguous()
    t, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    q_out = torch.empty((t, q_heads, dim), dtype=q.dtype, device=q.device)
    half = dim // 2
    _rope_and_cache_kernel[(t,)](
        q, k, v, cos, sin, q_out, k_cache, v_cache, slots, q_heads, kv_heads, half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        BLOCK_H=triton.next_power_of_2(q_heads), BLOCK_D=triton.next_power_of_2(half), num_warps=4)
    return q_out
