"""The kernel timings of gpu_decode.py: the copy ceiling, each Triton kernel against its torch
reference, and decode attention on each backend.

Bandwidth = the fewest bytes an op must move / its time (median of CUDA-event timings of calls
captured in a CUDA graph; see `timer`).  --dry-run passes tiny shapes and runs on the CPU
(Triton's interpreter).
"""
from __future__ import annotations

import itertools
import statistics
import time

import torch

from kernels import activation, gemv, paged_attention, rmsnorm, rotary
from raypp.model import ops
from raypp.model.attention import AttentionMetadata
from raypp.model.rope import inv_frequencies, rope_cos_sin


def timer(fn, device: str, warmup: int, reps: int, calls: int = 10) -> float:
    """Median seconds of one fn().  On a GPU, `calls` calls are captured in one CUDA graph and
    its replays timed with events: launching a Triton kernel from Python takes longer than
    the smaller kernels run, so timing single launches would time the host.  calls=0 times
    fn itself with events (fn is a graph replay already)."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    torch.cuda.synchronize()
    run, per = fn, 1
    if calls:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run, per = graph.replay, calls
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / per)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int, reps: int) -> float:
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    # Timed launch by launch: 2 GiB dwarf the launch, and inside a CUDA graph the copy becomes a
    # memcpy node that moved ~2.7 TB/s on an H200 against ~4.2 TB/s launched directly.
    return 2 * nbytes / timer(lambda: dst.copy_(src), device, 3, reps, calls=0)


def kernel_cases(device: str, dtype: torch.dtype, dry: bool) -> list[tuple]:
    """(name, shape, kernel thunk, reference thunk, bytes the op must move)."""
    def randn(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    size = dtype.itemsize
    t, d, inter = (8, 64, 96) if dry else (16384, 8192, 14336)
    x, res, w = randn(t, d), randn(t, d), randn(d)
    gate, up = randn(t, inter), randn(t, inter)
    heads, kv_heads, hd = (4, 2, 16) if dry else (32, 8, 128)
    q, k, v = randn(t, heads, hd), randn(t, kv_heads, hd), randn(t, kv_heads, hd)
    cache = randn(2, t, kv_heads, hd)
    slots = torch.randperm(t, device=device)
    cos, sin = rope_cos_sin(torch.arange(t, device=device), inv_frequencies(hd, 1e4, None).to(device), dtype)
    cases = [
        ("rms_norm", f"{t}x{d}", lambda: rmsnorm.rms_norm(x, w, 1e-5), lambda: rmsnorm.rms_norm_ref(x, w, 1e-5),
         2 * t * d * size),
        ("add_rms_norm", f"{t}x{d}", lambda: rmsnorm.add_rms_norm(x, res, w, 1e-5),
         lambda: rmsnorm.add_rms_norm_ref(x, res, w, 1e-5), 4 * t * d * size),
        ("silu_and_mul", f"{t}x{inter}", lambda: activation.silu_and_mul(gate, up),
         lambda: activation.silu_and_mul_ref(gate, up), 3 * t * inter * size),
        ("rope_and_cache", f"{t}x({heads}+{kv_heads})x{hd}",
         lambda: rotary.rope_and_cache(q, k, v, cos, sin, cache[0], cache[1], slots),
         lambda: rotary.rope_and_cache_ref(q, k, v, cos, sin, cache[0], cache[1], slots),
         (2 * q.numel() + 4 * k.numel() + t * hd) * size),  # q, k, v in and out; half of cos and of sin
    ]
    # Batch-1 decode products (fused q/k/v, fused gate/up, down) of the 1b preset: GEMV vs cuBLAS.
    # The weights fit in the L2, so each call takes the next of enough copies to exceed it.
    for n_out, k_in in ([(24, 64)] if dry else [(3072, 2048), (16384, 2048), (2048, 8192)]):
        copies = 1 if dry else (256 << 20) // (n_out * k_in * size) + 1
        ws, xv = [randn(n_out, k_in) for _ in range(copies)], randn(1, k_in)
        cycle_k, cycle_r = itertools.cycle(ws), itertools.cycle(ws)
        cases.append(("gemv", f"1x{k_in} @ {k_in}x{n_out}", lambda c=cycle_k, x=xv: gemv.gemv(x, next(c)),
                      lambda c=cycle_r, x=xv: gemv.gemv_ref(x, next(c)), (n_out * k_in + k_in + n_out) * size))
    # Decode attention: many sequences (the grid fills the GPU), one long one (it does not:
    # the context is split), and batch-1 decode's short context with and without splitting.
    for batch, ctx, splits in ([(2, 40, None)] if dry else [(64, 4096, None), (1, 32768, None), (1, 256, None),
                                                            (1, 256, 1)]):
        q_heads, kv_heads, head_dim, bs = (4, 2, 16, 16) if dry else (32, 8, 128, 16)
        blocks = (ctx + bs - 1) // bs
        tables = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        kc, vc = randn(batch * blocks * bs, kv_heads, head_dim), randn(batch * blocks * bs, kv_heads, head_dim)
        qd = randn(batch, q_heads, head_dim)
        args = (qd, kc, vc, tables, lens, ctx, bs, head_dim ** -0.5)
        kv_bytes = 2 * batch * ctx * kv_heads * head_dim * size
        cases.append(("paged_decode_attention", f"B={batch} ctx={ctx} {q_heads}/{kv_heads}x{head_dim}"
                      + (f" splits={splits}" if splits else ""),
                      lambda a=args, sp=splits: paged_attention.paged_decode_attention(*a, splits=sp),
                      lambda a=args: paged_attention.paged_decode_attention_ref(*a),
                      kv_bytes + 2 * qd.numel() * size))
    return cases


def bench_attention_backends(device: str, dtype: torch.dtype, dry: bool, ceiling: float) -> list[dict]:
    """Decode attention at the 1b preset's heads (32/8 of 64) through ops.decode_attention, as
    the model calls it: raypp's Triton kernel and, where flashinfer-python is installed,
    FlashInfer's (planned once per step outside the timing, as every layer after the first
    reuses the plan)."""
    rows = []
    for batch, ctx in ([(2, 40)] if dry else [(1, 192), (1, 32768), (64, 4096)]):
        q_heads, kv_heads, hd, bs = (4, 2, 16, 16) if dry else (32, 8, 64, 16)
        blocks = (ctx + bs - 1) // bs
        tables = torch.randperm(batch * blocks).view(batch, blocks).tolist()
        meta = AttentionMetadata.build([1] * batch, [ctx] * batch, tables, bs).to(device)
        kc = torch.randn(batch * blocks * bs, kv_heads, hd, device=device).to(dtype)
        vc, q = torch.randn_like(kc), torch.randn(batch, q_heads, hd, device=device).to(dtype)
        nbytes = (2 * batch * ctx * kv_heads * hd + 2 * q.numel()) * dtype.itemsize
        row = dict(shape=f"B={batch} ctx={ctx} {q_heads}/{kv_heads}x{hd}", bytes=nbytes)
        for name in ("triton", "flashinfer") if ops.HAS_FLASHINFER else ("triton",):
            def run(name=name):
                with ops.use(name):
                    return ops.decode_attention(q, kc, vc, meta, hd ** -0.5)
            try:
                t = timer(run, device, 1 if dry else 5, 2 if dry else 30)
            except Exception as e:  # one backend failing must not cost the other's numbers
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
                continue
            row.update({f"{name}_us": t * 1e6, f"{name}_frac_of_copy": nbytes / t / ceiling})
        rows.append(row)
    return rows


def bench_kernels(device: str, dtype: torch.dtype, dry: bool, ceiling: float) -> list[dict]:
    rows = []
    for name, shape, kernel, ref, nbytes in kernel_cases(device, dtype, dry):
        warm, reps = (1, 2) if dry else (5, 30)
        tk, tr = timer(kernel, device, warm, reps), timer(ref, device, warm, reps)
        rows.append(dict(kernel=name, shape=shape, bytes=nbytes, triton_us=tk * 1e6, torch_us=tr * 1e6,
                         triton_gbps=nbytes / tk / 1e9, torch_gbps=nbytes / tr / 1e9,
                         triton_frac_of_copy=nbytes / tk / ceiling, speedup=tr / tk))
    return rows
