"""Batch-1 decode on one GPU, the parts gpu_decode.py runs before and after its decode table.

- tune_fused: each fused batch-1 product of the 1b preset (kernels/fused_gemv.py) at a few
  tile shapes; the fastest becomes fused_gemv.TUNED for the decode runs that follow, and
  every time is reported against the copy bandwidth.
- graph_vs_eager: in bf16, greedy tokens with CUDA graphs differ from eager ones.  For each
  batch, teacher-forced steps (both sides fed the eager step's argmax) compare a replay with
  the eager step of the same forward given the graph's context bound (must be bit-identical:
  nothing stale in the graph's inputs) and with the eager step as the worker runs it (its
  own attention splits: rounding apart), and record each argmax flip with its top-2 margin.
"""
from __future__ import annotations

import itertools

import torch

from kernels import fused_gemv as fg
from raypp.model import ops
from raypp.model.attention import AttentionMetadata

# (name, mode, n, k) of the 1b preset: hidden 2048, 32/8 heads of 64, MLP 8192, vocab 4096.
SHAPES_1B = [("qkv + norm + rope + cache", fg.ROPE, 3072, 2048), ("o + residual", fg.RESIDUAL, 2048, 2048),
             ("gate_up + norm + silu", fg.SILU, 16384, 2048), ("down + residual", fg.RESIDUAL, 2048, 8192),
             ("lm_head + norm", fg.PLAIN, 4096, 2048)]
SHAPES_DRY = [("qkv", fg.ROPE, 8 * 16, 64), ("o", fg.RESIDUAL, 64, 64), ("gate_up", fg.SILU, 96, 64),
              ("lm_head", fg.PLAIN, 40, 64)]


def _call(mode: int, n: int, k: int, device: str, dtype: torch.dtype, copies: int):
    """fn(cfg, pdl) running the product on the next of `copies` weights (past the L2), and its bytes."""
    def randn(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    ws, x, nw = [randn(n, k) for _ in range(copies)], randn(1, k), randn(k)
    cycle = itertools.cycle(ws)
    kw, out_bytes = {}, n
    if mode == fg.ROPE:
        hd = 64 if n >= 1024 else 16
        heads = n // hd
        kv = heads // 6  # 32/8/8 and 4/... the same 4:1:1 split
        cos, sin = randn(1, hd), randn(1, hd)
        cache = randn(2, 64, kv, hd)
        kw = dict(rope=(cos, sin, cache[0], cache[1], torch.tensor([3], device=device), heads - 2 * kv, kv, hd))
    elif mode == fg.RESIDUAL:
        kw, out_bytes = dict(out=randn(1, n)), 2 * n
    elif mode == fg.SILU:
        kw, out_bytes = dict(pair_offset=n // 2), n // 2
    norm = (nw, 1e-5) if mode in (fg.ROPE, fg.SILU, fg.PLAIN) else None
    nbytes = (n * k + k + out_bytes + (k if norm else 0)) * dtype.itemsize
    return (lambda cfg, pdl: fg.fused_gemv(x, next(cycle), mode, norm=norm, cfg=cfg, pdl=pdl, **kw)), nbytes


def modes(batch: int, device: str, eager_torch: bool, only: list[str] | None = None) -> list[str]:
    """graph: as the worker captures it (at batch 1 the fused forward, PDL where supported,
    tiles from --tune); graph-untuned: default tiles; graph-early: each kernel lets the next
    launch as soon as its programs start (fused_decode.PDL_TRIGGER 2); graph-nopdl: no
    dependent launches; graph-unfused: Transformer.forward, one kernel per op; graph-cublas:
    that on cuBLAS.  only: keep these."""
    eager = (["eager-torch"] if eager_torch else []) + ["eager-triton"]
    if device != "cuda":  # --dry-run: a DecodeGraph runs its forward eagerly; the interpreter is slow
        graphs = ["graph", "graph-unfused"] if batch == 1 else []
    elif batch == 1:
        graphs = ["graph"] + (["graph-untuned"] if fg.TUNED else []) + ["graph-early", "graph-nopdl", "graph-unfused",
                                                                      "graph-cublas"]
    else:
        graphs = ["graph"]
    return [m for m in eager + graphs if only is None or m in only]


def candidates(mode: int, n: int, k: int, dry: bool) -> list[tuple]:
    if dry:
        return [(2, 32, 4, 1), (4, 16, 4, 1)]
    out = []
    for half, tile in itertools.product((2, 4, 8), (4096, 8192)):
        block_k = min(k, tile // (2 * half))
        out.append((half, block_k, 8 if tile > 4096 else 4, 1))
    return out


def tune_fused(device: str, dtype: torch.dtype, dry: bool, ceiling: float, timer, pdl: bool) -> list[dict]:
    """Times each candidate, sets fg.TUNED to the fastest, returns one row per shape."""
    rows = []
    for name, mode, n, k in (SHAPES_DRY if dry else SHAPES_1B):
        copies = 1 if dry else (256 << 20) // (n * k * dtype.itemsize) + 1
        fn, nbytes = _call(mode, n, k, device, dtype, copies)
        default = fg.config(mode, n, k, torch.device(device), n // 2 if mode == fg.SILU else 0, 32 if n >= 1024 else 8)
        times = {}
        if pdl:  # a Triton or driver without dependent launches: tune (and report) plain launches
            try:
                fn(default, 1)
            except Exception as e:
                print(f"launch_pdl failed, tuning without it: {type(e).__name__}: {str(e)[:200]}")
                pdl = False
        for cfg in dict.fromkeys([default] + candidates(mode, n, k, dry)):
            try:
                times[cfg] = timer(lambda c=cfg: fn(c, 1 if pdl else 0), device, 1 if dry else 3, 2 if dry else 20)
            except Exception as e:  # a tile shape that does not compile here is skipped, not fatal
                print(f"tune {name} {cfg}: {type(e).__name__}: {str(e)[:120]}")
        if not times:
            rows.append(dict(product=name, n=n, k=k, error="no tile shape ran"))
            continue
        best = min(times, key=times.get)
        fg.TUNED[(mode, n, k)] = best
        rows.append(dict(product=name, n=n, k=k, bytes=nbytes, pdl=pdl, default_cfg=list(default),
                         default_us=times.get(default, float("nan")) * 1e6, best_cfg=list(best), best_us=times[best] * 1e6,
                         best_gbps=nbytes / times[best] / 1e9, best_frac_of_copy=nbytes / times[best] / ceiling,
                         all_us={str(list(c)): t * 1e6 for c, t in times.items()}))
    return rows


@torch.inference_mode()
def graph_vs_eager(model, batches: list[int], prompt: int, steps: int, device: str) -> list[dict]:
    """Graphs bounded like the worker's (StageWorker: the model's whole context, at most the
    cache), so that attention splits the context as it does in serving."""
    from kernels.paged_attention import num_splits
    from raypp.model.cuda_graph import DecodeGraph

    bs = 16
    rows = []
    for batch in batches:
        blocks = (prompt + steps + bs) // bs
        max_blocks = -(-model.cfg.max_position_embeddings // bs)
        model.allocate_kv_cache(batch * blocks + 1, bs)
        graph = DecodeGraph(model, batch, max_blocks, bs, scratch_block=batch * blocks)
        kv_heads = model.cfg.num_kv_heads
        splits = dict(graph=num_splits(batch, kv_heads, max_blocks * bs, 64, torch.device(device)),
                      eager_first=num_splits(batch, kv_heads, prompt + 1, 64, torch.device(device)),
                      eager_last=num_splits(batch, kv_heads, prompt + steps, 64, torch.device(device)))
        tables = [[b * blocks + j for j in range(blocks)] for b in range(batch)]
        vocab = model.lm_head.weight.shape[0]
        ids = torch.randint(3, vocab, (batch * prompt,), generator=torch.Generator().manual_seed(batch)).to(device)
        lens = [prompt] * batch
        with ops.use("triton"):
            ids = model(ids, AttentionMetadata.build(lens, lens, tables, bs)).argmax(-1)
        bitwise, worst_rel, worst_abs, flips = True, 0.0, 0.0, []
        for k in range(steps):
            lens = [n + 1 for n in lens]
            replayed = graph(ids, lens, tables).clone()
            with ops.use("triton"):  # what graphs run (on CUDA also the default)
                same_split = graph.forward(ids, graph.eager_meta(lens, tables, device))
                own = model(ids, AttentionMetadata.build([1] * batch, lens, tables, bs).to(device))
            bitwise &= bool(torch.equal(replayed, same_split))
            diff = (replayed - own).float()
            worst_rel = max(worst_rel, (diff.norm() / own.float().norm()).item())
            worst_abs = max(worst_abs, (diff.abs().max() / own.float().abs().max()).item())
            g_ids, e_ids = replayed.argmax(-1), own.argmax(-1)
            for row in (g_ids != e_ids).nonzero().flatten().tolist():
                top2 = own[row].float().topk(2).values
                flips.append(dict(step=k, row=row, eager_margin=(top2[0] - top2[1]).item(),
                                  graph_gap=(replayed[row, g_ids[row]] - replayed[row, e_ids[row]]).item()))
            ids = e_ids
        rows.append(dict(batch=batch, steps=steps, fused=graph.fused, pdl=graph.pdl, graph_max_len=max_blocks * bs,
                         attention_splits=splits,
                         replay_equals_eager_with_graph_splits=bitwise, max_rel_logit_diff_vs_eager=worst_rel,
                         max_abs_logit_diff_over_max_logit=worst_abs, argmax_flips=len(flips),
                         tokens=batch * steps, flips=flips[:10]))
        del graph
    return rows


def check_main(argv=None) -> int:
    """Only the graph-vs-eager check, on a fresh bf16 checkpoint (a device run of its own)."""
    import argparse
    import json
    import tempfile
    from pathlib import Path

    from raypp.model.tiny import make_checkpoint

    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1b")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    device, dtype = ("cpu", "float32") if args.dry_run else ("cuda", args.dtype)
    batches = [1, 2] if args.dry_run else [int(b) for b in args.batches.split(",")]
    prompt, steps = (8, 2) if args.dry_run else (args.prompt, args.steps)
    from gpu_decode import load

    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / args.preset, preset="tiny" if args.dry_run else args.preset, seed=0,
                               dtype=dtype)
        model = load(str(path), getattr(torch, dtype), device, 1, 16)
        rows = graph_vs_eager(model, batches, prompt, steps, device)
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                              dtype=dtype, prompt=prompt, rows=rows), indent=2) + "\n")
    for r in rows:
        print({k: v for k, v in r.items() if k != "flips"}, r["flips"][:3])
    return 0


def kernel_profile(fn) -> list[dict]:
    """Device time per kernel name over one call of fn (CUPTI sees the kernels inside a graph),
    longest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:  # a profiler that cannot attach here must not cost the measurements above
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except RuntimeError as e:
        return [dict(kernel=f"profiler failed: {e}"[:80], calls=0, us=0.0)]
    rows = [dict(kernel=e.key[:80], calls=e.count, us=e.self_device_time_total) for e in prof.key_averages()
            if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r["us"])


def report(result: dict) -> None:
    print(f"\n{result['device']}: copy {result['copy_gbps']:.0f} GB/s (read + write)")
    for r in result.get("kernels", []):
        print(f"{r['kernel']:24s} {r['shape']:34s} triton {r['triton_us']:9.1f} us {r['triton_gbps']:7.0f} GB/s "
              f"({r['triton_frac_of_copy']:.0%} of copy)  torch {r['torch_us']:9.1f} us  x{r['speedup']:.2f}")
    for r in result.get("attention_backends", []):
        print(f"decode attention {r['shape']:28s}" + "".join(
            f"  {name} {r[name + '_us']:7.1f} us ({r[name + '_frac_of_copy']:.0%} of copy)" if name + "_us" in r
            else f"  {name} {r[name + '_error']}" for name in ("triton", "flashinfer")
            if name + "_us" in r or name + "_error" in r))
    m = result["model"]
    print(f"model {m['preset']}: {m['params'] / 1e9:.3f} B params, {m['weight_bytes'] / 1e9:.2f} GB read per step")
    for r in result.get("fused_tuning", []):
        if "error" in r:
            print(f"fused {r['product']}: {r['error']}")
            continue
        print(f"fused {r['product']:26s} 1x{r['k']} @ {r['k']}x{r['n']}: default {r['default_cfg']} {r['default_us']:.1f} us,"
              f" best {r['best_cfg']} {r['best_us']:.1f} us {r['best_gbps']:.0f} GB/s ({r['best_frac_of_copy']:.0%})")
    for r in result["decode"]:
        if "error" in r:
            print(f"decode batch {r['batch']:3d} {r['mode']:13s} FAILED {r['error']}")
            continue
        print(f"decode batch {r['batch']:3d} {r['mode']:13s} {r['step_ms']:7.3f} ms/step {r['tokens_per_s']:9.1f} tok/s"
              f"  roofline {r['roofline_tokens_per_s']:9.1f}  ({r['frac_of_roofline']:.0%})"
              + (f"  replay alone {r['replay_ms']:.3f} ms" if "replay_ms" in r else ""))
    for r in result["graph_vs_eager"]:
        print("graph vs eager (bf16, teacher-forced):", {k: v for k, v in r.items() if k != "flips"})
    print(f"engine (StageWorker.execute), graphs captured at {result['engine']['graphs_captured']}:")
    for r in result["engine"]["rows"]:
        print(f"  batch {r['batch']:3d}: eager {r['eager_step_ms']:7.3f} ms/step, "
              f"graphs {r['graph_step_ms']:7.3f} ms/step ({r['graph_tokens_per_s']:8.1f} tok/s)  x{r['speedup']:.2f}  same tokens: {r['same_tokens']}")
    for r in result["decode"]:
        if r["batch"] == 1 and "replay_kernels" in r:
            print(f"batch-1 {r['mode']} replay, device time by kernel:")
            for k in r["replay_kernels"]:
                print(f"  {k['us']:8.1f} us  {k['calls']:4d} x  {k['kernel']}")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
    sys.exit(check_main())
