"""Fused GPU kernels for raypp's model, each Triton kernel next to its plain-torch reference.

The references are what raypp runs on the CPU (and the ground truth in tests); the Triton
kernels are what it runs on CUDA.  `raypp/model/ops.py` is the one place that chooses.
Triton is optional (`pip install -e '.[gpu]'`): without it this package still imports and
offers the references.

Triton decides between compiling and interpreting when it is imported.  A host without
CUDA can only run Triton kernels in the interpreter, so there it is switched on before
that import: the kernels then take CPU tensors (slowly; tests use small shapes).
"""
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
_interpret_at_import = "triton" not in sys.modules and os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without the gpu/dev extras: references only
    triton = tl = None

HAS_TRITON = triton is not None
# True when Triton runs kernels in its interpreter (on CPU tensors).
INTERPRETED = HAS_TRITON and _interpret_at_import
jit = triton.jit if HAS_TRITON else (lambda fn: fn)

__all__ = ["HAS_TRITON", "INTERPRETED", "jit", "tl", "triton"]
