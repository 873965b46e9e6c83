"""Measure the numbers of a CPU profile: `python -m raypp.planner.cpu_probe [threads]`.

How the `cpu-epyc-2core` entry of hardware.py was measured (torch imported here lazily; the
planner itself never imports it).  Every product goes through the path raypp's model takes on
the CPU, `raypp.model.ops.linear` on weights packed once at load time (oneDNN,
kernels/cpu_linear.py), not plain torch matmul: a profile of another kernel predicts another
runtime.  Best of several runs each:
  FLOP/s        a 2048-row product with a 2048 x 2048 weight, fp32 and bf16 -> 2 n^3 / time
  bandwidth     the linear layers of the `small` preset (8 layers of q, k, v, o, gate, up, down
                and the lm_head, 390 MB) multiplied by one row each, back to back: the weight
                stream of a batch-1 decode step -> bytes / (time - its FLOPs at the rate above)
  packing       the same products with 2, 8 and 32 rows: the passes over the weights beyond the
                first that a multi-row product costs once its FLOPs are taken out -- a BLAS that
                packs weights per call pays ~1, weights packed at load time ~0
  host bus      the one-row stream run by two processes at once, each on its own core: their
                summed rate in units of one process's (`Efficiency.host_streams`)
  overhead      one eager Llama layer of the `tiny` shape at batch 1 through raypp's CPU ops,
                minus the time its weight bytes take at the measured bandwidth
  gloo          all-reduce between 2 processes of 1 KiB and 4 MiB
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields

_PACK_ROWS = (2, 8, 32)


@dataclass(frozen=True)
class CpuProbe:
    gemv_bytes_per_s: float        # one-row products over small's packed weights
    fp32_flops: float
    bf16_flops: float
    pack_passes: float             # median over _PACK_ROWS
    host_streams: float            # two processes' summed one-row rate / one process's
    layer_overhead_s: float
    packed: bool                   # False: ops.linear fell back to torch (no oneDNN here)


def _best(fn, n: int = 5) -> float:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def _packed_weight(out_features: int, in_features: int, dtype=None):
    """A weight as the model holds it after loading: packed for oneDNN when this host can."""
    import torch

    from raypp.model import ops
    w = torch.randn(out_features, in_features, dtype=dtype or torch.float32)
    ops.pack_linears([w])
    return w


def _decode_stack() -> list[tuple]:
    """The linear weights of `small` as its model holds them, in the order a decode step reads them,
    grouped as the model multiplies them: one weight per product, the MLP's gate and up in one
    (`ops.swiglu`, the SiLU and the product as oneDNN post-ops)."""
    from raypp.planner.models import PRESETS
    m = PRESETS["small"]
    layer = [[(m.heads * m.hd, m.hidden)], [(m.kv_heads * m.hd, m.hidden)], [(m.kv_heads * m.hd, m.hidden)],
             [(m.hidden, m.heads * m.hd)], [(m.intermediate, m.hidden), (m.intermediate, m.hidden)],
             [(m.hidden, m.intermediate)]]
    return ([_packed_product(product) for _ in range(m.layers) for product in layer]
            + [(_packed_weight(m.vocab, m.hidden),)])


def _packed_product(shapes: list[tuple]) -> tuple:
    """One product's weights, packed as the model packs them (a pair: an MLP's gate and up)."""
    import torch

    from raypp.model import ops
    if len(shapes) == 1:
        return (_packed_weight(*shapes[0]),)
    gate, up = (torch.randn(*shape) for shape in shapes)
    ops.pack_linears([], [(gate, up)])
    return gate, up


def _bytes(stack) -> int:
    return sum(w.numel() * 4 for ws in stack for w in ws)


def _inputs(stack, rows: int) -> dict:
    import torch
    return {n: torch.randn(rows, n) for n in {ws[0].shape[1] for ws in stack}}


def _stream(stack, xs: dict) -> None:
    """Every product of a decode step, back to back (`xs`: an input per input width)."""
    from raypp.model import ops
    for ws in stack:
        if len(ws) == 2:
            ops.swiglu(xs[ws[0].shape[1]], *ws)
        else:
            ops.linear(xs[ws[0].shape[1]], ws[0])


def _gemv_rate(seconds: float) -> float:
    """Bytes/s of back-to-back one-row passes over the decode stack for `seconds`."""
    ws = _decode_stack()
    nbytes, xs = _bytes(ws), _inputs(ws, 1)
    _stream(ws, xs)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _stream(ws, xs)
        n += 1
    return n * nbytes / (time.perf_counter() - t0)


def _bus_worker(start, out, key: int) -> None:
    import torch

    torch.set_num_threads(1)
    _gemv_rate(0.5)                # warm: pack, page in, build the kernel
    start.wait()
    out[key] = _gemv_rate(3.0)


def probe_host_streams(workers: int = 2) -> float:
    """Summed one-row rate of `workers` processes at once, in units of one process alone."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    rates = []
    with ctx.Manager() as m:
        for n in (1, workers):
            out, start = m.dict(), ctx.Barrier(n)
            ps = [ctx.Process(target=_bus_worker, args=(start, out, i)) for i in range(n)]
            for p in ps:
                p.start()
            for p in ps:
                p.join()
            rates.append(sum(out.values()))
    return rates[1] / rates[0]


def probe(threads: int = 1) -> CpuProbe:
    import torch

    from raypp.model import ops
    from kernels import cpu_linear

    torch.set_num_threads(threads)
    with torch.inference_mode():
        flops = {}
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = torch.randn(2048, 2048, dtype=dt), _packed_weight(2048, 2048, dt)
            ops.linear(a, b)
            flops[name] = 2 * 2048 ** 3 / _best(lambda: ops.linear(a, b), 3 if name == "fp32" else 1)
        ws = _decode_stack()
        nbytes, one = _bytes(ws), _inputs(ws, 1)
        _stream(ws, one)
        # T(r) = (1 + pack) x weights + r x FLOPs of one row: the CPU sums them (overlap 0), so the
        # bandwidth is the weights' bytes over the one-row time less its FLOPs
        t_row = 2 * nbytes / 4 / flops["fp32"]
        weights = _best(lambda: _stream(ws, one)) - t_row
        bw = nbytes / weights
        packs = sorted((_best(lambda xs=_inputs(ws, r): _stream(ws, xs)) - r * t_row) / weights - 1.0
                       for r in _PACK_ROWS)
        overhead = _layer_overhead(bw)
    return CpuProbe(bw, flops["fp32"], flops["bf16"], packs[len(packs) // 2], probe_host_streams(),
                    overhead, cpu_linear.packed_of(ws[0][0]) is not None)


def _layer_overhead(bw: float) -> float:
    """Seconds one decode layer of the `tiny` shape takes at batch 1 beyond reading its weights."""
    import torch

    from raypp.model import ops
    h, nh, nkv, hd, inter = 256, 16, 8, 16, 768
    ws = [_packed_weight(nh * hd, h), _packed_weight(nkv * hd, h), _packed_weight(nkv * hd, h),
          _packed_weight(h, nh * hd), _packed_weight(inter, h), _packed_weight(inter, h), _packed_weight(h, inter)]
    norm = torch.ones(h)
    k_cache, v_cache = torch.randn(1, nh, 64, hd), torch.randn(1, nh, 64, hd)

    def layer(x):
        y = ops.rms_norm(x, norm, 1e-6)
        q = ops.linear(y, ws[0]).view(1, 1, nh, hd).transpose(1, 2)
        _k, _v = ops.linear(y, ws[1]), ops.linear(y, ws[2])
        a = torch.nn.functional.scaled_dot_product_attention(q, k_cache, v_cache)
        x = x + ops.linear(a.transpose(1, 2).reshape(1, nh * hd), ws[3])
        y = ops.rms_norm(x, norm, 1e-6)
        return x + ops.linear(ops.swiglu(y, ws[4], ws[5]), ws[6])

    x = torch.randn(1, h)
    for _ in range(20):
        layer(x)
    return _best(lambda: layer(x), 50) - sum(t.numel() * 4 for t in ws) / bw


def _gloo_worker(rank: int, port: int, out) -> None:
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for n in (256, 1024 * 1024):
        x = torch.ones(n)
        for _ in range(5):
            dist.all_reduce(x)
        ts = sorted(_best(lambda: dist.all_reduce(x), 1) for _ in range(30))
        if rank == 0:
            out[n * 4] = ts[len(ts) // 2]
    dist.destroy_process_group()


def probe_gloo(port: int = 29533) -> dict[int, float]:
    """Median seconds of a 2-process gloo all-reduce, by message bytes."""
    import multiprocessing as mp

    with mp.Manager() as m:
        out = m.dict()
        ps = [mp.Process(target=_gloo_worker, args=(r, port, out)) for r in range(2)]
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        return dict(out)


if __name__ == "__main__":
    res = probe(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    for f in fields(res):
        value = getattr(res, f.name)
        print(f"{f.name}: {value:.4g}" if isinstance(value, float) else f"{f.name}: {value}")
    for nbytes, secs in probe_gloo().items():
        print(f"gloo all-reduce {nbytes} B: {secs * 1e6:.0f} us")
