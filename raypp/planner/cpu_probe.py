"""Measure the numbers of a CPU profile: `python -m raypp.planner.cpu_probe [threads]`.

How the `cpu-epyc-2core` entry of hardware.py was measured (torch imported
here lazily; the planner itself never imports it).  Best of 5 runs each:
  bandwidth  fp32 GEMV (1 x 8192) @ (8192 x 8192): 256 MiB of weights read
             once, the decode access pattern -> bytes / time
  FLOP/s     2048^3 matmul in fp32 and bf16 -> 2 n^3 / time
  overhead   one eager Llama layer of the `tiny` shape at batch 1, minus the
             time its weight bytes take at the measured bandwidth
  gloo       all-reduce between 2 processes of 1 KiB and 4 MiB (latency and
             bandwidth of the "link" between CPU workers)
"""
from __future__ import annotations

import sys
import time


def _best(fn, n: int = 5) -> float:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def probe(threads: int = 1) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    w, v = torch.randn(8192, 8192), torch.randn(1, 8192)
    res = {"gemv_bytes_per_s": w.numel() * 4 / _best(lambda: v @ w)}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
        res[f"{name}_flops"] = 2 * 2048 ** 3 / _best(lambda: a @ b, 3 if name == "fp32" else 1)
    h, nh, nkv, hd, inter = 256, 16, 8, 16, 768
    ws = [torch.randn(h, nh * hd), torch.randn(h, nkv * hd), torch.randn(h, nkv * hd), torch.randn(nh * hd, h),
          torch.randn(h, inter), torch.randn(h, inter), torch.randn(inter, h)]
    k_cache, v_cache = torch.randn(1, nh, 64, hd), torch.randn(1, nh, 64, hd)

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def layer(x):
        y = rms(x)
        q = (y @ ws[0]).view(1, 1, nh, hd).transpose(1, 2)
        _k, _v = y @ ws[1], y @ ws[2]
        a = torch.nn.functional.scaled_dot_product_attention(q, k_cache, v_cache)
        x = x + a.transpose(1, 2).reshape(1, 1, nh * hd) @ ws[3]
        y = rms(x)
        return x + (torch.nn.functional.silu(y @ ws[4]) * (y @ ws[5])) @ ws[6]

    x = torch.randn(1, 1, h)
    with torch.inference_mode():
        for _ in range(20):
            layer(x)
        t_layer = _best(lambda: layer(x), 50)
    res["layer_overhead_s"] = t_layer - sum(t.numel() * 4 for t in ws) / res["gemv_bytes_per_s"]
    return res



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
    for key, value in probe(int(sys.argv[1]) if len(sys.argv) > 1 else 1).items():
        print(f"{key}: {value:.4g}")
    for nbytes, secs in probe_gloo().items():
        print(f"gloo all-reduce {nbytes} B: {secs * 1e6:.0f} us")
