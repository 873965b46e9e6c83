#!/usr/bin/env python3
"""raypp's CPU kernels against the torch references: one decode step of the `small` preset.

    python benchmarks/cpu_kernels.py [MODEL_DIR] [--threads 1] [--reps 20] \
        [--out benchmarks/results/cpu_kernels.json]

MODEL_DIR defaults to /tmp/raypp-small (`raypp make-tiny --preset small`, made if missing).
The fp32 model holds `batch` sequences of CONTEXT tokens (prefilled once); a step is what a
worker runs for one new token per sequence, sampling aside: the metadata built on the host,
then Transformer.forward.  The two routes run in turns, `--reps` times each, and the medians
are reported, at batch 1 and 32; then the ops alone at batch 32 (decode attention over the
paged cache, add + RMSNorm, SiLU-and-mul), one layer's gate_proj product at 1 to 4096 rows
(F.linear against raypp's product on the weight packed at load time), every product of a
decode step back to back at 1, 16 and 32 rows (oneDNN against raypp's panels), and one
prefill step of 32 x 128-token prompts.
`--compile` adds the route not taken: the reference decode attention under torch.compile,
its first call (a cold compile: inductor gets an empty cache directory) and its steady call, then the first call at the next step's
shape (one more context token), as every decode step brings.  `--profile` prints where a
batch-32 decode step's time goes on the CPU kernels (torch.profiler, self CPU time by op).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTEXT = 160  # the middle of the peers' workload: a 128-token prompt and 32 of its 64 new tokens
BLOCK = 16
ROUTES = ("torch", "cpu")


def timed(fn, reps: int, routes=ROUTES) -> dict[str, float]:
    """Median ms of fn(route) per route, the routes taking turns; one warm-up each."""
    times = {r: [] for r in routes}
    for r in routes:
        fn(r)
    for _ in range(reps):
        for r in routes:
            t = time.perf_counter()
            fn(r)
            times[r].append((time.perf_counter() - t) * 1e3)
    return {r: statistics.median(v) for r, v in times.items()}


def timed_one(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="/tmp/raypp-small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_kernels.json"))
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.compile:  # a cold compile, as a fresh worker pays it: no cache from an earlier run
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="raypp-inductor-")
    import torch

    from kernels import activation, cpu, cpu_linear, paged_attention, rmsnorm
    from raypp.model import ops
    from raypp.model.attention import AttentionMetadata
    from raypp.model.checkpoint import load_weights
    from raypp.model.config import ModelConfig
    from raypp.model.llama import Transformer
    from raypp.model.tiny import make_checkpoint

    torch.set_num_threads(args.threads)
    if not (Path(args.model) / "config.json").is_file():
        make_checkpoint(args.model, preset="small")
    if not cpu.available():
        sys.exit("the CPU kernels did not build (see the warning)")
    cfg = ModelConfig.from_dir(args.model)
    with torch.device("meta"):
        model = Transformer(cfg)
    load_weights(model, args.model, torch.float32, "cpu")
    blocks = (CONTEXT + 1 + BLOCK - 1) // BLOCK
    model.allocate_kv_cache(num_blocks=32 * blocks, block_size=BLOCK)
    log = lambda m: print(m, flush=True)  # noqa: E731
    out = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
           "model": str(Path(args.model).resolve()), "threads": args.threads, "reps": args.reps,
           "context": CONTEXT, "loadavg_at_start": os.getloadavg(), "torch": torch.__version__}

    with torch.inference_mode():
        tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(32)]
        prompts = torch.randint(3, cfg.vocab_size, (32 * CONTEXT,), generator=torch.Generator().manual_seed(0))
        with ops.use("cpu"):  # fill the cache: every sequence CONTEXT tokens long
            model(prompts, AttentionMetadata.build([CONTEXT] * 32, [CONTEXT] * 32, tables, BLOCK))
        for batch in (1, 32):
            ids = prompts[:batch]

            def step(route, batch=batch, ids=ids):
                with ops.use(route):
                    model(ids, AttentionMetadata.build([1] * batch, [CONTEXT + 1] * batch, tables[:batch], BLOCK))

            out[f"decode_step_ms_bs{batch}"] = ms = timed(step, args.reps)
            log(f"decode step, batch {batch}: torch {ms['torch']:.2f} ms, cpu kernels {ms['cpu']:.2f} ms "
                f"({ms['torch'] / ms['cpu']:.2f}x)")
            if args.profile and batch == 32:
                with torch.profiler.profile() as prof:
                    for _ in range(5):
                        step("cpu")
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
                out["profile_bs32_cpu_5_steps"] = table
                log(table)

        meta = AttentionMetadata.build([1] * 32, [CONTEXT + 1] * 32, tables, BLOCK)
        attn = model.layers["0"].self_attn
        q = torch.randn(32, cfg.num_heads, cfg.head_dim)
        x, res = torch.randn(32, cfg.hidden_size), torch.randn(32, cfg.hidden_size)
        w = model.layers["0"].post_attention_layernorm.weight
        gate, up = torch.randn(32, cfg.intermediate_size), torch.randn(32, cfg.intermediate_size)
        opfns = {
            "decode_attention": lambda r: (paged_attention.paged_decode_attention_ref if r == "torch" else
                                           cpu.paged_decode_attention)(
                q, attn.kv_cache[0], attn.kv_cache[1], meta.decode_tables, meta.decode_lens, meta.decode_max_len,
                BLOCK, cfg.head_dim ** -0.5),
            "add_rms_norm": lambda r: (rmsnorm.add_rms_norm_ref if r == "torch" else cpu.add_rms_norm)(x, res, w, 1e-5),
            "silu_and_mul": lambda r: (activation.silu_and_mul_ref if r == "torch" else cpu.silu_and_mul)(gate, up),
        }
        for name, fn in opfns.items():
            out[f"op_ms_bs32_{name}"] = ms = timed(fn, args.reps * 10)
            log(f"{name} (batch 32, per layer): torch {ms['torch'] * 1e3:.0f} us, cpu kernels {ms['cpu'] * 1e3:.0f} us")
        # One layer's gate_proj at the rows of a batch-1 decode, a micro-batch and a prefill:
        # F.linear (sgemm) against raypp's product on a copy packed as the model packs a weight
        # (panels up to cpu_linear.PANEL_ROWS rows, oneDNN above).  One weight stays in cache.
        wg = model.layers["0"].mlp.gate_proj.weight.clone()
        cpu_linear.pack(wg)
        for rows in (1, 16, 32, 4096):
            xr = torch.randn(rows, cfg.hidden_size)
            fn = lambda r, xr=xr: (torch.nn.functional.linear(xr, wg) if r == "torch"  # noqa: E731
                                   else cpu_linear.linear(xr, wg, None))
            out[f"op_ms_linear_gate_proj_rows{rows}"] = ms = timed(fn, args.reps * (10 if rows < 1000 else 1))
            log(f"gate_proj, {rows} rows: F.linear {ms['torch'] * 1e3:.0f} us, raypp {ms['cpu'] * 1e3:.0f} us")
        # A decode step's products as a step reads them: every linear weight of the model once,
        # back to back, streaming from memory; oneDNN on its packed copies against the panels.
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        panels = [cpu.pack_panels(w) for w in weights]
        for rows in (1, 16, 32):
            xs = {n: torch.randn(rows, n) for n in {w.shape[1] for w in weights}}
            fn = lambda r, xs=xs: [  # noqa: E731
                cpu.panel_linear(xs[w.shape[1]], p, w.shape[0]) if r == "panels" else
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], cpu_linear.packed_of(w), None, "none", [], "")
                for w, p in zip(weights, panels)]
            out[f"products_ms_rows{rows}"] = ms = timed(fn, args.reps, routes=("onednn", "panels"))
            log(f"all products, {rows} rows: oneDNN {ms['onednn']:.2f} ms, panels {ms['panels']:.2f} ms "
                f"({ms['panels'] / ms['onednn']:.2f}x)")

        if args.compile:
            compiled = torch.compile(paged_attention.paged_decode_attention_ref)
            res = {}
            for key, length in (("first_call_ms", CONTEXT + 1), ("next_shape_first_call_ms", CONTEXT + 2)):
                lens = torch.full((32,), length, dtype=torch.int32)
                call = lambda: compiled(q, attn.kv_cache[0], attn.kv_cache[1], meta.decode_tables, lens,  # noqa: E731
                                        length, BLOCK, cfg.head_dim ** -0.5)
                t = time.perf_counter()
                call()
                res[key] = (time.perf_counter() - t) * 1e3
                if key == "first_call_ms":
                    res["steady_call_us"] = statistics.median(timed_one(call) for _ in range(args.reps * 10)) * 1e3
            out["torch_compile_decode_attention_bs32"] = res
            log(f"torch.compile(reference decode attention), batch 32: first call {res['first_call_ms']:.0f} ms, "
                f"then {res['steady_call_us']:.0f} us; next context length, first call "
                f"{res['next_shape_first_call_ms']:.0f} ms")

        def prefill(route):
            with ops.use(route):
                model(prompts[: 32 * 128], AttentionMetadata.build([128] * 32, [128] * 32, tables, BLOCK))

        out["prefill_step_ms_32x128"] = ms = timed(prefill, max(2, args.reps // 10))
        log(f"prefill step, 32 x 128 tokens: torch {ms['torch']:.0f} ms, cpu kernels {ms['cpu']:.0f} ms")
    out["loadavg_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
