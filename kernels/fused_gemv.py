"""Batch-1 decode products fused with the small ops around them, one launch each.

A captured batch-1 decode step of the 1b preset spent ~230 of its ~980 us in 100 small
kernels between the products (RMSNorm, RoPE + cache write, SiLU-and-mul; see
docs/benchmarks.md).  Each of those reads a vector of a few KB that the next product reads
again, so they fold into the products:

- NORM (prologue): y = W @ rms_norm(x): every program recomputes the row's sum of squares
  (x is 2-16 KB and comes from L2), so no normed copy is written or launched.
- PLAIN: y = W @ x (+ bias), optionally stored in fp32 (the logits).
- RESIDUAL: h += W @ x in place (o_proj, down_proj): each program owns its output rows.
- SILU: act = silu(W_gate @ x) * (W_up @ x) for a fused gate/up weight: a program computes
  rows j of the gate half and j of the up half.
- ROPE: the fused q/k/v product, rotated and written out: a program computes dims d and
  d + D/2 of one head (the pair RoPE mixes); q heads go to `out`, k heads rotated and v heads
  as they are into their cache slot.

Each program owns 2 x HALF rows, streamed in BLOCK_K tiles with the next tile's load issued
before the current one is multiplied.  With `pdl` (programmatic dependent launch, Hopper) a
kernel may start while the previous one drains: it loads its first weight tile (weights are
never written during a step), then waits (gdc_wait) before touching anything the previous
kernel writes.  pdl=1 lets the next kernel launch once this one's wait is over, pdl=2 as soon
as this one's programs start: each kernel waits for the one before, which finished only after
its own wait, so writes stay ordered either way.  Every result is rounded where the unfused kernels round it, so the outputs
equal the unfused path's up to the products' summation order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import activation, jit, rmsnorm, rotary, tl, triton

PLAIN, RESIDUAL, SILU, ROPE = 0, 1, 2, 3
# (mode, n, k) -> (HALF, BLOCK_K, num_warps, num_stages), set from measurements
# (benchmarks/gpu_decode.py --tune); other shapes take _default_config's choice.
TUNED: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}


def fused_gemv_ref(x, weight, mode=PLAIN, norm=None, bias=None, out=None, pair_offset=0, rope=None,
                   out_dtype=None):
    """The unfused ops, in the model's order and roundings; the same contract as fused_gemv."""
    if norm is not None:
        x = rmsnorm.rms_norm_ref(x, norm[0], norm[1])
    y = F.linear(x, weight, bias)
    if mode == PLAIN:
        return y if out_dtype is None else y.to(out_dtype)
    if mode == RESIDUAL:
        out.copy_(out + y)
        return out
    if mode == SILU:
        return activation.silu_and_mul_ref(y[..., :pair_offset], y[..., pair_offset:2 * pair_offset])
    cos, sin, k_cache, v_cache, slots, q_heads, kv_heads, head_dim = rope
    q, k, v = y.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    t = x.shape[0]
    q = rotary.rope_and_cache_ref(q.reshape(t, q_heads, head_dim), k.reshape(t, kv_heads, head_dim),
                                  v.reshape(t, kv_heads, head_dim), cos, sin, k_cache, v_cache, slots)
    return q.reshape(t, -1)


@jit
def _fused_gemv_kernel(x_ptr, w_ptr, b_ptr, nw_ptr, y_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, slot_ptr,
                       n, k, stride_w, eps, pair_offset, q_heads, kv_heads, stride_cache,
                       MODE: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HALF: tl.constexpr,
                       ROPE_HALF: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, HALF)
    if MODE == 3:  # ROPE: dims d and d + ROPE_HALF of one head
        head = pid // (ROPE_HALF // HALF)
        d = (pid % (ROPE_HALF // HALF)) * HALF + r
        rows_a = head * (2 * ROPE_HALF) + d
        rows_b = rows_a + ROPE_HALF
        mask_a, mask_b = rows_a < n, rows_b < n
    elif MODE == 2:  # SILU: row j of the gate half and of the up half
        rows_a = pid * HALF + r
        rows_b = rows_a + pair_offset
        mask_a = rows_a < pair_offset
        mask_b = mask_a
    else:
        rows_a = pid * (2 * HALF) + r
        rows_b = rows_a + HALF
        mask_a, mask_b = rows_a < n, rows_b < n
    cols = tl.arange(0, BLOCK_K)
    if USE_PDL == 2:  # let the next kernel launch now: it too only prefetches weights until it waits
        tl.extra.cuda.gdc_launch_dependents()
    wa_ptrs = w_ptr + rows_a.to(tl.int64)[:, None] * stride_w + cols[None, :]
    wb_ptrs = w_ptr + rows_b.to(tl.int64)[:, None] * stride_w + cols[None, :]
    wa = tl.load(wa_ptrs, mask=mask_a[:, None] & (cols < k)[None, :], other=0.0)
    wb = tl.load(wb_ptrs, mask=mask_b[:, None] & (cols < k)[None, :], other=0.0)
    if USE_PDL > 0:
        # Everything above reads weights only; from here on the previous kernel's output.
        tl.extra.cuda.gdc_wait()
    if USE_PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    if NORM:
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, k, BLOCK_K):
            xs = tl.load(x_ptr + k0 + cols, mask=k0 + cols < k, other=0.0).to(tl.float32)
            ss += xs * xs
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / k + eps)
    acc_a = tl.zeros([HALF, BLOCK_K], tl.float32)
    acc_b = tl.zeros([HALF, BLOCK_K], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        c = k0 + cols
        xt = tl.load(x_ptr + c, mask=c < k, other=0.0)
        if NORM:  # rmsnorm.py's roundings: normed row to x's dtype, then times the weight
            nw = tl.load(nw_ptr + c, mask=c < k, other=0.0).to(tl.float32)
            xt = ((xt.to(tl.float32) * rstd).to(xt.dtype).to(tl.float32) * nw).to(xt.dtype)
        xf = xt.to(tl.float32)[None, :]
        acc_a += wa.to(tl.float32) * xf
        acc_b += wb.to(tl.float32) * xf
        cn = c + BLOCK_K
        wa = tl.load(wa_ptrs + (k0 + BLOCK_K), mask=mask_a[:, None] & (cn < k)[None, :], other=0.0)
        wb = tl.load(wb_ptrs + (k0 + BLOCK_K), mask=mask_b[:, None] & (cn < k)[None, :], other=0.0)
    ya = tl.sum(acc_a, axis=1)
    yb = tl.sum(acc_b, axis=1)
    if HAS_BIAS:
        ya += tl.load(b_ptr + rows_a, mask=mask_a, other=0.0).to(tl.float32)
        yb += tl.load(b_ptr + rows_b, mask=mask_b, other=0.0).to(tl.float32)
    xdt = x_ptr.dtype.element_ty
    # The product's output as the unfused path stores it, in x's dtype.
    ya = ya.to(xdt).to(tl.float32)
    yb = yb.to(xdt).to(tl.float32)
    if MODE == 0:
        tl.store(y_ptr + rows_a, ya.to(y_ptr.dtype.element_ty), mask=mask_a)
        tl.store(y_ptr + rows_b, yb.to(y_ptr.dtype.element_ty), mask=mask_b)
    elif MODE == 1:
        ha = tl.load(y_ptr + rows_a, mask=mask_a, other=0.0).to(tl.float32)
        hb = tl.load(y_ptr + rows_b, mask=mask_b, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows_a, (ha + ya).to(xdt), mask=mask_a)
        tl.store(y_ptr + rows_b, (hb + yb).to(xdt), mask=mask_b)
    elif MODE == 2:
        s = (ya / (1.0 + tl.exp(-ya))).to(xdt).to(tl.float32)
        tl.store(y_ptr + rows_a, (s * yb).to(xdt), mask=mask_a)
    else:
        slot = tl.load(slot_ptr).to(tl.int64)
        cs = tl.load(cos_ptr + d).to(tl.float32)
        sn = tl.load(sin_ptr + d).to(tl.float32)
        ra = ya * cs - yb * sn
        rb = yb * cs + ya * sn
        if head < q_heads:
            tl.store(y_ptr + rows_a, ra.to(xdt))
            tl.store(y_ptr + rows_b, rb.to(xdt))
        elif head < q_heads + kv_heads:
            kc = kc_ptr + slot * stride_cache + (head - q_heads) * (2 * ROPE_HALF) + d
            tl.store(kc, ra.to(kc_ptr.dtype.element_ty))
            tl.store(kc + ROPE_HALF, rb.to(kc_ptr.dtype.element_ty))
        else:
            vc = vc_ptr + slot * stride_cache + (head - q_heads - kv_heads) * (2 * ROPE_HALF) + d
            tl.store(vc, ya.to(vc_ptr.dtype.element_ty))
            tl.store(vc + ROPE_HALF, yb.to(vc_ptr.dtype.element_ty))


def _default_config(mode: int, units: int, k: int, device: torch.device, rope_half: int = 0):
    """units: output rows per row set (n / 2, or pair_offset for SILU).  HALF gives about two
    programs per multiprocessor; a program's tile holds 4096 weights in flight."""
    if device.type != "cuda":  # the interpreter pays per program: few, large ones
        half = 16
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        half = max(2, min(16, triton.next_power_of_2(units // (2 * sms) + 1) // 2))
    if mode == ROPE:  # a program stays inside one head: HALF divides D / 2
        while rope_half % half:
            half //= 2
    block_k = min(triton.next_power_of_2(k), max(16, 2048 // half))
    return half, block_k, 4, 1


def config(mode: int, n: int, k: int, device: torch.device, pair_offset: int = 0, rope_half: int = 0):
    tuned = TUNED.get((mode, n, k)) if device.type == "cuda" else None
    return tuned or _default_config(mode, pair_offset if mode == SILU else n // 2, k, device, rope_half)


def fused_gemv(x, weight, mode=PLAIN, norm=None, bias=None, out=None, pair_offset=0, rope=None,
               out_dtype=None, pdl=False, cfg=None):
    """x [1, K] contiguous; weight [N, K] (unit stride in K).  norm: (weight, eps) of an
    RMSNorm applied to x first.  mode PLAIN returns y [1, N] (in out_dtype if given);
    RESIDUAL adds y into `out` [1, N] in place and returns it; SILU returns
    silu(y[:, :pair_offset]) * y[:, pair_offset:2 * pair_offset]; ROPE takes rope = (cos, sin,
    k_cache, v_cache, slots, q_heads, kv_heads, head_dim) (caches [slots, Hkv, D], heads
    contiguous), writes k and v, returns q rotated [1, q_heads * head_dim]."""
    n, k = weight.shape
    assert x.shape == (1, k) and x.is_contiguous() and weight.stride(1) == 1
    dummy = weight
    kc = vc = cos = sin = slots = dummy
    q_heads = kv_heads = stride_cache = rope_half = 0
    if mode == PLAIN:
        out = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
    elif mode == RESIDUAL:
        assert out.shape == (1, n) and out.is_contiguous() and out.dtype == x.dtype
    elif mode == SILU:
        assert 2 * pair_offset <= n
        out = torch.empty(1, pair_offset, dtype=x.dtype, device=x.device)
    else:
        cos, sin, kc, vc, slots, q_heads, kv_heads, head_dim = rope
        assert kc.stride(1) == head_dim and kc.stride(2) == 1 and vc.stride() == kc.stride()
        assert cos.is_contiguous() and sin.is_contiguous() and head_dim % 2 == 0
        out = torch.empty(1, q_heads * head_dim, dtype=x.dtype, device=x.device)
        assert n == (q_heads + 2 * kv_heads) * head_dim
        stride_cache, rope_half = kc.stride(0), head_dim // 2
    half, block_k, warps, stages = cfg or config(mode, n, k, x.device, pair_offset, rope_half)
    grid = (triton.cdiv(pair_offset, half) if mode == SILU else n // (2 * half) if mode == ROPE
            else triton.cdiv(n, 2 * half),)
    launch = dict(num_warps=warps, num_stages=stages)
    if pdl:  # only where compiled: the interpreter takes no such option
        launch["launch_pdl"] = True
    _fused_gemv_kernel[grid](
        x, weight, bias if bias is not None else dummy, norm[0] if norm is not None else dummy, out, kc, vc,
        cos, sin, slots, n, k, weight.stride(0), norm[1] if norm is not None else 0.0, pair_offset,
        q_heads, kv_heads, stride_cache, MODE=mode, NORM=norm is not None, HAS_BIAS=bias is not None,
        HALF=half, ROPE_HALF=max(rope_half, 1), BLOCK_K=block_k, USE_PDL=int(pdl), **launch)
    return out
