"""Linear layers on the CPU, with each weight packed once at load time: raypp's panel kernel
(kernels/cpu_panels.h) for decode-sized products, oneDNN for larger ones.

`F.linear` on the CPU goes to a BLAS sgemm that copies the weight into its own blocked
layout on every call; on this host's AMD EPYC its large products reach about half the FLOP
rate oneDNN's do (111 vs 241 GFLOP/s on one core, fp32).  oneDNN (shipped inside torch) computes
from a weight packed once into the layout its kernels read.  Measured by
benchmarks/cpu_kernels.py on the `small` preset's gate_proj (2816 x 1024 fp32, one thread):
1.6x faster at one row, 2.1x at 16-32 rows (a decode micro-batch), 2.2x at 4096 (a
prefill); results within fp32 rounding of `F.linear` (another summation order).

Products of up to PANEL_ROWS rows (decode steps) of fp32 weights go to raypp's panel kernel
instead, which streams each weight once and prefetches while it multiplies (0.77-0.84x
oneDNN's time at 1-32 rows: benchmarks/cpu_kernels.py); a SwiGLU MLP's gate and up share one pack
there, and its store writes silu(gate) * up.

The packed copies live next to the weight (as attributes of the tensor), so the model, its
sharding and checkpoints keep seeing a plain weight; with the panels, fp32 linear weights
take three copies in memory (plain, oneDNN's, panels), bf16 two.  `F.linear` is the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpu

_ATTR = "_raypp_onednn_packed"
_PANELS = "_raypp_panels"  # panels of the weight alone
_SWIGLU = "_raypp_swiglu_panels"  # on a gate weight: gate and up paired in one pack
# Up to this many rows a product reads the panels.  Every product of the peers' 160M checkpoint
# back to back, two threads: 0.77-0.9x oneDNN's time at 1-64 rows, level at 128, up to 1.17x
# slower at 1024 (oneDNN's large-product kernels reuse what is in cache better).
PANEL_ROWS = 64
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
                ok = bool(torch.equal(_onednn_linear(x, _pack(w), None), F.linear(x, w)))
                _onednn_swiglu(x, _pack(w), _pack(w))
            except (RuntimeError, AttributeError):  # an op missing from this torch build
                ok = False
        _available[dtype] = ok
    return _available[dtype]


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)


def _panels_usable(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.float32 and cpu.available() and torch.ops.raypp_cpu.panels_fast()


def pack(weight: torch.Tensor) -> None:
    """Attach the packed copies of `weight` ([out, in], CPU) to it; `packed_of` finds oneDNN's."""
    setattr(weight, _ATTR, _pack(weight))
    if _panels_usable(weight):
        setattr(weight, _PANELS, cpu.pack_panels(weight))


def pack_swiglu(gate: torch.Tensor, up: torch.Tensor) -> None:
    """Pack an MLP's gate and up for `swiglu`: each for oneDNN, and both in one panel pack."""
    for w in (gate, up):
        setattr(w, _ATTR, _pack(w))
    if _panels_usable(gate) and gate.shape == up.shape:
        setattr(gate, _SWIGLU, cpu.pack_panels(gate, up))


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for a packed weight (`pack`)."""
    panels = getattr(weight, _PANELS, None)
    if panels is not None and x.shape[0] <= PANEL_ROWS:
        return cpu.panel_linear(x, panels, weight.shape[0], bias)
    return _onednn_linear(x, packed_of(weight), bias)


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(_padded(x), packed, bias, "none", [], "")[:x.shape[0]]


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for weights packed by `pack_swiglu`."""
    panels = getattr(gate, _SWIGLU, None)
    if panels is not None and x.shape[0] <= PANEL_ROWS:
        return cpu.panel_linear(x, panels, gate.shape[0], None, swiglu=True)
    return _onednn_swiglu(x, packed_of(gate), packed_of(up))


def _onednn_swiglu(x: torch.Tensor, packed_gate: torch.Tensor, packed_up: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T): the SiLU and the product run as oneDNN post-ops on each
    output tile while it is in cache, instead of a pass over two [rows, intermediate] products
    (measured on the peers' 160M checkpoint, 4096 prefill rows, two threads: 129 vs 148 ms a
    layer; decode rows gain nothing and lose nothing)."""
    padded = _padded(x)
    gate = torch.ops.mkldnn._linear_pointwise(padded, packed_gate, None, "swish", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(padded, gate, packed_up, None, "mul")[:x.shape[0]]
