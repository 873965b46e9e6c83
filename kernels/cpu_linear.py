"""Linear layers on the CPU through oneDNN, with each weight packed once at load time.

`F.linear` on the CPU goes to a BLAS sgemm that copies the weight into its own blocked
layout on every call; on this host's AMD EPYC its large products reach about half the FLOP
rate oneDNN's do (111 vs 241 GFLOP/s on one core, fp32).  oneDNN (shipped inside torch) computes
from a weight packed once into the layout its kernels read.  Measured by
benchmarks/cpu_kernels.py on the `small` preset's gate_proj (2816 x 1024 fp32, one thread):
1.6x faster at one row, 2.1x at 16-32 rows (a decode micro-batch), 2.2x at 4096 (a
prefill); results within fp32 rounding of `F.linear` (another summation order).

The packed copy lives next to the weight (as an attribute of the tensor), so the model,
its sharding and checkpoints keep seeing a plain weight; it costs a second copy of the
linear weights in memory.  `F.linear` is the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ATTR = "_raypp_onednn_packed"
# The row count oneDNN is told to expect when it picks the packed layout; measured at 1,
# 32 and 4096 rows, one layout served every row count equally well.
_ROWS_HINT = 32
_available: dict[torch.dtype, bool] = {}


def available(dtype: torch.dtype) -> bool:
    """Whether this torch build packs and runs `dtype` weights through oneDNN (checked once)."""
    if dtype not in _available:
        ok = torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16)
        if ok:
            try:
                w = torch.ones(8, 8, dtype=dtype)
                x = torch.ones(2, 8, dtype=dtype)
                ok = bool(torch.equal(linear(x, _pack(w), None), F.linear(x, w)))
                swiglu(x, _pack(w), _pack(w))
            except (RuntimeError, AttributeError):  # an op missing from this torch build
                ok = False
        _available[dtype] = ok
    return _available[dtype]


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)


def pack(weight: torch.Tensor) -> None:
    """Attach the packed copy of `weight` ([out, in], CPU) to it; `packed_of` finds it."""
    setattr(weight, _ATTR, _pack(weight))


def packed_of(weight: torch.Tensor) -> torch.Tensor | None:
    return getattr(weight, _ATTR, None)


def padded_rows(rows: int) -> int:
    """The row count a product of `rows` rows runs at: a power of two up to 64, then four sizes
    per doubling (at most 25% padding).  oneDNN builds and caches a kernel per input shape,
    ~0.7 MB and 0.3-0.8 ms each (measured), and a serving step's token count takes every value
    up to the token budget: unpadded, a worker's memory grew ~700 MB until the cache was full."""
    if rows <= 64:
        return 1 << (rows - 1).bit_length()
    step = 1 << (rows.bit_length() - 3)
    return -(-rows // step) * step


def _padded(x: torch.Tensor) -> torch.Tensor:
    padded = padded_rows(x.shape[0])
    return x if padded == x.shape[0] else F.pad(x, (0, 0, 0, padded - x.shape[0]))


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(_padded(x), packed, bias, "none", [], "")[:x.shape[0]]


def swiglu(x: torch.Tensor, packed_gate: torch.Tensor, packed_up: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T): the SiLU and the product run as oneDNN post-ops on each
    output tile while it is in cache, instead of a pass over two [rows, intermediate] products
    (measured on the peers' 160M checkpoint, 4096 prefill rows, two threads: 129 vs 148 ms a
    layer; decode rows gain nothing and lose nothing)."""
    padded = _padded(x)
    gate = torch.ops.mkldnn._linear_pointwise(padded, packed_gate, None, "swish", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(padded, gate, packed_up, None, "mul")[:x.shape[0]]
