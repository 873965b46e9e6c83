"""Rotary position embedding on [tokens, heads, head_dim], Hugging Face's half-split layout.

cos/sin are [tokens, head_dim] with both halves equal (rope.rope_cos_sin), so the kernel
reads only their first halves.  One program per token rotates all of its heads: the
cos/sin row is loaded once and reused across heads.
"""
from __future__ import annotations

import torch

from kernels import jit, tl, triton


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, half,
                   stride_xt, stride_xh, stride_ct, stride_ot, stride_oh,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < half
    mask = (h < heads) & dmask
    c = tl.load(cos_ptr + t * stride_ct + d, mask=dmask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_ct + d, mask=dmask, other=0.0).to(tl.float32)
    x_row = x_ptr + t * stride_xt + h * stride_xh
    x1 = tl.load(x_row + d, mask=mask, other=0.0)
    x2 = tl.load(x_row + half + d, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    o_row = out_ptr + t * stride_ot + h * stride_oh
    tl.store(o_row + d, (a * c - b * s).to(x1.dtype), mask=mask)
    tl.store(o_row + half + d, (b * c + a * s).to(x1.dtype), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] (last dim contiguous); cos/sin [T, D].  Returns a new [T, H, D] tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    t, heads, dim = x.shape
    out = torch.empty((t, heads, dim), dtype=x.dtype, device=x.device)
    half = dim // 2
    _rotary_kernel[(t,)](x, cos, sin, out, heads, half, x.stride(0), x.stride(1), cos.stride(0),
                         out.stride(0), out.stride(1), BLOCK_H=triton.next_power_of_2(heads),
                         BLOCK_D=triton.next_power_of_2(half), num_warps=4)
    return out
