"""SiLU-and-mul, the SwiGLU gate: silu(gate) * up in one pass instead of three."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import jit, tl, triton


def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, n, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0)
    # Round silu(g) to the storage dtype before the product, as the reference's two ops do.
    g32 = g.to(tl.float32)
    s = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
    tl.store(out_ptr + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate/up [..., n] with unit stride in the last dim: rows may be strided, as the two
    halves of one fused gate/up product are."""
    n = gate.shape[-1]
    gate, up = (x if x.stride(-1) == 1 else x.contiguous() for x in (gate, up))
    g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    block = min(4096, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(g2.shape[0], triton.cdiv(n, block))](
        g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0), BLOCK=block, num_warps=8)
    return out.view(gate.shape)
