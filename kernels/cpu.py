"""raypp's CPU kernels (kernels/cpu.cpp, with cpu_attention.h, cpu_panels.h, cpu_allreduce.h and
cpu_math.h), loaded into torch as torch.ops.raypp_cpu.*.

| here                      | reference                                   |
|---------------------------|---------------------------------------------|
| paged_decode_attention    | paged_attention.paged_decode_attention_ref  |
| paged_attention (varlen)  | decode ref + paged_prefill_attention_ref    |
| rms_norm, add_rms_norm    | rmsnorm.rms_norm_ref, add_rms_norm_ref      |
| silu_and_mul              | activation.silu_and_mul_ref                 |
| rope_and_cache            | rotary.rope_and_cache_ref                   |
| panel_linear (+ swiglu)   | F.linear, activation.silu_and_mul_ref       |

A C++ extension rather than torch.compile: it reads the paged cache in place without a
compiler stack in the serving process, builds in seconds with nothing but g++ and torch's
headers, and its speed does not hinge on recompiles as batch shapes change every step
(docs/benchmarks.md, "CPU kernels", has the numbers).

The library is built the first time a process asks (`available()`), for this CPU
(-march=native), and cached under $RAYPP_CACHE_DIR (default ~/.cache/raypp) by a key of the
source, the flags, torch's version and the CPU, so later processes only load it.  Processes
that start together (the workers of one deployment) build it once: the others wait on a file
lock.  Without a compiler ($CXX, default g++), or if the build fails, `available()` is False
after one warning and raypp runs the torch references.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu.cpp")
HEADERS = [Path(__file__).with_name(name) for name in ("cpu_math.h", "cpu_attention.h", "cpu_panels.h", "cpu_allreduce.h")]
_loaded: bool | None = None


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))


def _cache_dir() -> Path:
    root = os.environ.get("RAYPP_CACHE_DIR") or Path.home() / ".cache" / "raypp"
    path = Path(root) / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:  # a read-only home: the build still works, cached per machine boot
        path = Path(tempfile.gettempdir()) / f"raypp-kernels-{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
        return path


def build(cxx: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """The built library's path (built now unless cached), or None after a warning."""
    cxx = cxx or os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        warnings.warn(f"raypp: no C++ compiler ({cxx!r} not found): the CPU kernels are off, "
                      "torch references run instead (slower)", RuntimeWarning, stacklevel=2)
        return None
    torch_dir = Path(torch.__file__).parent
    inc = torch_dir / "include"
    # -fno-trapping-math lets GCC vectorise the exp loops (it changes no result); GCC 12 does not
    # know this host's Zen 5 and tunes generically for 256-bit vectors, where 512 measured 10-15%
    # faster attention (no effect on CPUs without AVX-512); -fopenmp is
    # what at::parallel_for's inline OpenMP path needs, and libgomp is the one torch has loaded.
    flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-trapping-math", "-fno-math-errno",
             "-fopenmp", "-fPIC", "-shared", "-std=c++20", "-DNDEBUG",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-I{inc}", f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}"]
    link = [f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    sources = [SOURCE.read_text(), *(h.read_text() for h in HEADERS)]
    key = hashlib.sha256("\0".join([*sources, cxx, *flags, torch.__version__, _cpu_id()]).encode())
    cache = cache_dir or _cache_dir()
    lib = cache / f"raypp_cpu_{key.hexdigest()[:16]}.so"
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not lib.exists():
            tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
            proc = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(tmp), *link], capture_output=True, text=True)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                warnings.warn(f"raypp: building the CPU kernels failed, torch references run instead:\n"
                              f"{proc.stderr[-2000:]}", RuntimeWarning, stacklevel=2)
                return None
            os.replace(tmp, lib)  # atomic: a reader never sees half a library
    return lib


def available() -> bool:
    """Whether torch.ops.raypp_cpu is loaded; builds or loads it on the first call."""
    global _loaded
    if _loaded is None:
        path = build()
        try:
            if path is not None:
                torch.ops.load_library(str(path))
        except OSError as e:  # e.g. a cached library that this process's libraries cannot satisfy
            warnings.warn(f"raypp: loading the CPU kernels failed, torch references run instead: {e}",
                          RuntimeWarning, stacklevel=2)
            path = None
        _loaded = path is not None
    return _loaded


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_starts, block_size: int, scale: float):
    """A flat batch of sequences' new tokens (decodes and prefill chunks alike) over the paged
    cache.  q [T, Hq, D]; k/v_cache [slots, Hkv, D]; block_tables [S, max_blocks], seq_lens [S]
    (context including the new tokens) and query_starts [S + 1] (q's rows of each sequence), int32."""
    return torch.ops.raypp_cpu.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_starts,
                                               block_size, scale)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, max_len: int, block_size: int,
                           scale: float):
    """The reference's contract; max_len is not needed here."""
    return torch.ops.raypp_cpu.paged_attention(q, k_cache, v_cache, block_tables, context_lens, None,
                                               block_size, scale)


def rms_norm(x, weight, eps: float):
    return torch.ops.raypp_cpu.rms_norm(x, None, weight, eps)[0]


def add_rms_norm(x, residual, weight, eps: float):
    """(rms_norm(residual + x), residual + x)."""
    out, h = torch.ops.raypp_cpu.rms_norm(x, residual, weight, eps)
    return out, h


def silu_and_mul(gate, up):
    return torch.ops.raypp_cpu.silu_and_mul(gate, up)


def rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots):
    """Rotates q and k, writes k and v into the caches at `slots` (int64); returns the rotated q."""
    return torch.ops.raypp_cpu.rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots)


def pack_panels(weight, paired=None):
    """fp32 weight [N, K] packed for `panel_linear`; `paired` (an up weight with a gate) packs both."""
    return torch.ops.raypp_cpu.pack_panels(weight, paired)


def panel_linear(x, panels, n: int, bias=None, swiglu: bool = False):
    """x [M, K] @ W.T (+ bias) for W [n, K] packed by `pack_panels`; with a paired pack and
    `swiglu`, silu(x @ gate.T) * (x @ up.T)."""
    return torch.ops.raypp_cpu.panel_linear(x, panels, n, bias, swiglu)
