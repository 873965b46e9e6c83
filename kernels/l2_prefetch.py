"""Warming the L2 cache with the start of the next kernel's weights (Hopper/Ampere, compiled
Triton only).

A batch-1 decode step is a chain of short kernels that each stream one weight matrix once.
Each one ramps up (its programs' first tiles wait a full HBM round trip before any
arithmetic) and drains (its last programs leave the memory system half idle), and attention
between the q/k/v and o products reads only ~0.5 MB: across a kernel boundary HBM idles for
a few microseconds.  `prefetch` lets a kernel issue, for its share of the programs, L2
prefetches of the first columns of every row of the *next* product's weight, so HBM keeps
streaming across the boundary and the next kernel's first tiles hit L2.  Weights are never
written during a step, so this may run before the kernel's gdc_wait, like its own first tile.

`prefetch.global.L2::evict_last` is a hint with no result: it moves no data into registers,
so a program neither waits for it nor holds its SM slot longer.  The streaming loads of a
kernel that prefetches use evict_first, so its own once-read weights leave L2 before the
prefetched lines do.  The interpreter has no inline PTX: on CPU tensors PREFETCH stays 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import jit, tl

LINE_BYTES = 128  # an L2 line; one prefetch instruction each


@dataclass(frozen=True)
class Prefix:
    """The first `cols` elements of each of `rows` rows (`stride` elements apart) of `weight`."""
    weight: torch.Tensor
    rows: int
    stride: int
    cols: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * self.weight.element_size()


def prefix(weight: torch.Tensor | None, budget_bytes: int) -> Prefix | None:
    """The column prefix of a [N, K] weight that fits `budget_bytes`, in whole L2 lines per
    row; None when nothing fits or there is no next weight.  A column prefix, not the first
    rows: a product's programs each own rows and walk them from column 0, so its first
    microseconds read the first columns of every row."""
    if weight is None or budget_bytes <= 0:
        return None
    n, k = weight.shape
    line = LINE_BYTES // weight.element_size()
    cols = min(k, budget_bytes // (n * weight.element_size()) // line * line)
    return Prefix(weight, n, weight.stride(0), cols) if cols > 0 else None


@jit
def prefetch(ptr, rows, stride, cols, part, parts, LINE: tl.constexpr, BLOCK: tl.constexpr):
    """Program `part` of `parts` prefetches its share of the lines of rows x [0, cols) at ptr
    (LINE elements a line) into L2, BLOCK lines per instruction batch."""
    per_row = tl.cdiv(cols, LINE)
    total = rows * per_row
    share = tl.cdiv(total, parts)
    start = part * share
    end = tl.minimum(total, start + share)
    for i0 in range(start, end, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        p = ptr + (i // per_row).to(tl.int64) * stride + (i % per_row) * LINE
        p = tl.where(i < end, p, ptr)  # past the share: the first line again, harmless
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [p],
                                  dtype=tl.int32, is_pure=False, pack=1)


def kernel_args(pf: Prefix | None, dummy: torch.Tensor) -> dict:
    """The keyword arguments a kernel taking (pf_ptr, pf_rows, pf_stride, pf_cols, PREFETCH,
    PF_LINE, EVICT) gets for `pf` (None: no prefetch, and its loads keep the default policy)."""
    if pf is None:
        return dict(pf_ptr=dummy, pf_rows=0, pf_stride=0, pf_cols=0, PREFETCH=0, PF_LINE=1, EVICT="")
    return dict(pf_ptr=pf.weight, pf_rows=pf.rows, pf_stride=pf.stride, pf_cols=pf.cols, PREFETCH=1,
                PF_LINE=LINE_BYTES // pf.weight.element_size(), EVICT="evict_first")
