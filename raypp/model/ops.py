"""The one place where the model picks how its hot ops run.

CUDA tensors go to the fused Triton kernels in `kernels/` (decode attention: FlashInfer when
`flashinfer-python` is installed, else Triton).  CPU tensors go to the C++ kernels of
`kernels/cpu.py` (paged attention read in place, fused RMSNorm + residual, SiLU-and-mul),
which the host's compiler builds on first use; without a compiler, they get the torch
references next to the kernels, which are also the ground truth in tests.  CPU products read
weights packed at load time: raypp's panel kernel for decode-sized ones, oneDNN for larger
(`kernels/cpu_linear.py`, `pack_linears`).
RAYPP_KERNELS=torch|cpu|triton|flashinfer, or `use()` in tests, overrides the choice
("triton" on CPU tensors runs Triton's interpreter; "cpu" touches only CPU tensors).
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager

import torch

import kernels
from kernels import activation, cpu, cpu_linear, gemv, paged_attention, rmsnorm, rotary

HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
_forced: str | None = os.environ.get("RAYPP_KERNELS") or None


@contextmanager
def use(backend: str | None):
    """Run the enclosed code with `backend` for every op (None: choose by device)."""
    global _forced
    if backend == "cpu" and not cpu.available():
        raise RuntimeError("the CPU kernels are not built here (see the warning); use 'torch'")
    before, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = before


def _cpu_path(device: torch.device) -> bool:
    """CPU tensors take raypp's CPU path unless another backend is forced."""
    return device.type == "cpu" and _forced in (None, "cpu")


def backend(device: torch.device, attention: bool = False) -> str:
    if _cpu_path(device):
        return "cpu" if cpu.available() else "torch"
    if _forced and _forced != "cpu":  # "cpu" leaves CUDA tensors their own kernels
        return "triton" if _forced == "flashinfer" and not attention else _forced
    if device.type != "cuda" or not kernels.HAS_TRITON:
        return "torch"
    return "flashinfer" if attention and HAS_FLASHINFER else "triton"


# One-row products (batch-1 decode) use kernels/gemv.py on CUDA; more rows go to cuBLAS,
# whose GEMM tiles then have work for each row.  False sends every product to cuBLAS.
use_gemv = True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if use_gemv and x.dim() == 2 and x.shape[0] == 1 and backend(x.device) == "triton":
        return gemv.gemv(x, weight, bias)
    # oneDNN ships inside torch: unlike the C++ kernels it needs no compiler.
    if cpu_linear.packed_of(weight) is not None and _cpu_path(x.device):
        return cpu_linear.linear(x, weight, bias)
    return gemv.gemv_ref(x, weight, bias)


def swiglu(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T), the MLP's input to its down projection."""
    packed = cpu_linear.packed_of(gate_weight) is not None and cpu_linear.packed_of(up_weight) is not None
    if packed and _cpu_path(x.device):
        return cpu_linear.swiglu(x, gate_weight, up_weight)
    return silu_and_mul(linear(x, gate_weight), linear(x, up_weight))


# A CPU MLP runs a long prefill in pieces of this many rows, so that its [rows, intermediate]
# activations stay in cache between the two products: on the peers' 160M checkpoint's MLP,
# 4096 rows at two threads, 157 ms in pieces of 256-1024 rows against 178 ms whole.
MLP_ROWS = 512


def mlp(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor):
    """down(silu(gate(x)) * up(x)), a SwiGLU MLP."""
    if not _cpu_path(x.device) or x.shape[0] <= MLP_ROWS:
        return linear(swiglu(x, gate_weight, up_weight), down_weight)
    return torch.cat([mlp(part, gate_weight, up_weight, down_weight) for part in x.split(MLP_ROWS)])


def pack_linears(weights: list[torch.Tensor], swiglu_pairs: list[tuple] = ()) -> None:
    """Packs CPU weights (once, after loading), unless the torch path is forced; each (gate, up)
    of `swiglu_pairs` is packed for `swiglu`."""
    for w in weights:
        if _cpu_path(w.device) and cpu_linear.available(w.dtype):
            cpu_linear.pack(w)
    for gate, up in swiglu_pairs:
        if _cpu_path(gate.device) and cpu_linear.available(gate.dtype):
            cpu_linear.pack_swiglu(gate, up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    name = backend(x.device)
    if name == "torch":
        return rmsnorm.rms_norm_ref(x, weight, eps)
    return cpu.rms_norm(x, weight, eps) if name == "cpu" else rmsnorm.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(residual + x), residual + x)."""
    name = backend(x.device)
    if name == "torch":
        return rmsnorm.add_rms_norm_ref(x, residual, weight, eps)
    return (cpu if name == "cpu" else rmsnorm).add_rms_norm(x, residual, weight, eps)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    name = backend(gate.device)
    if name == "torch":
        return activation.silu_and_mul_ref(gate, up)
    return (cpu if name == "cpu" else activation).silu_and_mul(gate, up)


def rope_and_cache(q, k, v, cos, sin, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rotates q and k, writes k and v into cache [2, slots, Hkv, D] at `slots`; returns q rotated."""
    k_cache, v_cache = cache[0], cache[1]  # views; indexing `cache[0, slots]` would copy the whole pool
    name = backend(q.device)
    if name == "torch":
        return rotary.rope_and_cache_ref(q, k, v, cos, sin, k_cache, v_cache, slots)
    return (cpu if name == "cpu" else rotary).rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float):
    """q [T, Hq, D] of a flat batch of decode tokens and prefill chunks, whose K/V are already
    in k/v_cache [slots, Hkv, D]; meta: AttentionMetadata.  Returns [T, Hq, D]."""
    if backend(q.device, attention=True) == "cpu":  # the whole batch in one call, K/V read in place
        return cpu.paged_attention(q, k_cache, v_cache, meta.tables, meta.seq_lens, meta.query_starts,
                                   meta.block_size, scale)
    if meta.decode_rows.numel() == q.shape[0]:  # a pure decode step: no gather, no scatter
        return decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if meta.decode_rows.numel():
        out[meta.decode_rows] = decode_attention(q[meta.decode_rows], k_cache, v_cache, meta, scale)
    for p in meta.prefills:
        out[p.rows] = paged_attention.paged_prefill_attention_ref(q[p.rows], k_cache, v_cache, p.slots, p.mask, scale)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float):
    """q [B, Hq, D] of the decode rows; k/v_cache [slots, Hkv, D]; meta: AttentionMetadata."""
    args = (q, k_cache, v_cache, meta.decode_tables, meta.decode_lens, meta.decode_max_len, meta.block_size, scale)
    name = backend(q.device, attention=True)
    if name == "torch":
        return paged_attention.paged_decode_attention_ref(*args)
    if name == "cpu":
        return cpu.paged_decode_attention(*args)
    if name == "flashinfer" and q.dtype != torch.float32:  # FlashInfer's decode takes 16-bit queries only
        return _flashinfer_decode(q, k_cache, v_cache, meta, scale)
    return paged_attention.paged_decode_attention(*args)


# One FlashInfer decode wrapper per device and shape, kept across steps: it allocates its
# buffers (128 MB of device workspace, pinned host staging) once.
_flashinfer_wrappers: dict[tuple, object] = {}


def _flashinfer_decode(q, k_cache, v_cache, meta, scale):
    # FlashInfer plans a batch on the host (page lists, work split) and every layer then runs on
    # that plan: the first layer of a step plans, and the step's metadata remembers it.
    import flashinfer

    key = (q.device, q.shape[1], k_cache.shape[1], q.shape[2], q.dtype)
    wrapper = _flashinfer_wrappers.get(key)
    if wrapper is None:
        workspace = torch.empty(128 << 20, dtype=torch.uint8, device=q.device)
        wrapper = _flashinfer_wrappers[key] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
    if meta.plans.get(key) is not wrapper:
        indptr, indices, last_page_len = meta.decode_pages
        wrapper.plan(indptr, indices, last_page_len, q.shape[1], k_cache.shape[1], q.shape[2], meta.block_size,
                     q_data_type=q.dtype, kv_data_type=k_cache.dtype, sm_scale=scale)
        meta.plans[key] = wrapper
    paged = (k_cache.view(-1, meta.block_size, *k_cache.shape[1:]), v_cache.view(-1, meta.block_size, *v_cache.shape[1:]))
    return wrapper.run(q.contiguous(), paged)
