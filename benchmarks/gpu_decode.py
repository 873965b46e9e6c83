#!/usr/bin/env python3
"""raypp on one GPU: each kernel's achieved HBM bandwidth, and decode tokens/s against the
weight-bytes roofline.

    python benchmarks/gpu_decode.py [--preset 1b] [--batches 1,16] [--engine-batches 1,8,32,64]
                                    [--out benchmarks/results/gpu_decode.json]
    python benchmarks/gpu_decode.py --dry-run --out /tmp/dry.json   # CPU, tiny shapes: the script runs

1. Ceiling: a device-to-device copy of 2 GiB (bytes read + written over time).
2. Kernels (gpu_kernels.py; bf16, shapes well past the L2): each Triton kernel and its torch
   reference, and decode attention on each backend, bandwidth = the fewest bytes the op must
   move / time.
3. Decode: a checkpoint made like `raypp make-tiny` (preset `1b`: Llama-3.2-1B's layer
   shapes, bf16), a PROMPT-token prefill, then STEPS greedy decode steps per batch size:
   eager through the kernels (--eager-torch: the references too), and replayed as one CUDA
   graph per step (raypp.model.cuda_graph) as the worker captures it; at batch 1 also with
   the fused products' default tiles, without dependent launches, unfused, and on cuBLAS
   (`modes`).  Before it the fused products are tuned (gpu_batch1.tune_fused); after it,
   the bf16 graph-vs-eager check (gpu_batch1.graph_vs_eager).  Every step reads
   the sampled ids back; an eager step builds its metadata on the host, a graph step copies
   in only its indices, as the engine's worker does.
   Roofline tokens/s = batch x copy bandwidth / (weight bytes + KV bytes read per step).
4. Engine path: the same checkpoint through the engine's StageWorker (`execute`: metadata,
   sampling, the step's timing), greedy decode steps one after another, CUDA graphs off
   (parallel.cuda_graph_max_batch 0) and on, per batch size; both workers' tokens compared.

--dry-run runs the same code on the CPU with tiny shapes (Triton's interpreter for the
kernels); its numbers mean nothing, it checks that the GPU run will not fail on a typo.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raypp.model import ops  # noqa: E402
from raypp.model.attention import AttentionMetadata  # noqa: E402
from benchmarks import gpu_batch1  # noqa: E402
from benchmarks.gpu_batch1 import kernel_profile  # noqa: E402
from benchmarks.gpu_kernels import bench_attention_backends, bench_kernels, copy_bandwidth, timer  # noqa: E402

TARGETS = {"kernel_hbm_fraction": 0.8, "batch1_roofline_fraction": 0.7}  # from the issue


def load(path: str, dtype: torch.dtype, device: str, num_blocks: int, block_size: int):
    from raypp.model.checkpoint import load_weights
    from raypp.model.config import ModelConfig
    from raypp.model.llama import Transformer

    cfg = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    load_weights(model, path, dtype, device)
    if device == "cpu":  # --dry-run: the fused products a CUDA load makes, so the fused path runs
        model.fuse_projections()
    model.allocate_kv_cache(num_blocks, block_size)
    return model


@torch.inference_mode()
def decode_run(model, mode: str, batch: int, prompt: int, steps: int, block_size: int, scratch_block: int,
               device: str) -> dict:
    """Prefill `batch` prompts, then `steps` greedy decode steps; returns the decode tokens/s."""
    from raypp.model.cuda_graph import DecodeGraph

    blocks = (prompt + steps + block_size) // block_size  # one spare: step k+1's metadata is built early
    tables = [[b * blocks + j for j in range(blocks)] for b in range(batch)]
    vocab = model.lm_head.weight.shape[0]
    ids = torch.randint(3, vocab, (batch * prompt,), generator=torch.Generator().manual_seed(0)).to(device)
    from kernels import fused_gemv
    from raypp.model import cuda_graph, fused_decode

    defaults = cuda_graph.FUSED_BATCH1, cuda_graph.PDL, fused_decode.PDL_TRIGGER
    ops.use_gemv = mode != "graph-cublas"
    cuda_graph.FUSED_BATCH1 = mode not in ("graph-unfused", "graph-cublas")
    cuda_graph.PDL = False if mode == "graph-nopdl" else None
    fused_decode.PDL_TRIGGER = 2 if mode == "graph-early" else 1
    tuned = dict(fused_gemv.TUNED)
    if mode == "graph-untuned":
        fused_gemv.TUNED.clear()
    with ops.use("torch" if mode == "eager-torch" else "triton"):
        # The cache's last block is the graph's scratch block, which no sequence uses.
        try:
            graph = DecodeGraph(model, batch, blocks, block_size, scratch_block) if mode.startswith("graph") else None
        finally:
            cuda_graph.FUSED_BATCH1, cuda_graph.PDL, fused_decode.PDL_TRIGGER = defaults
            fused_gemv.TUNED.update(tuned)
        meta = AttentionMetadata.build([prompt] * batch, [prompt] * batch, tables, block_size)
        next_ids = model(ids, meta).argmax(-1)
        out = []

        def run(ids, k: int):  # decode step k; the graph takes the indices, eager the device metadata
            lens = [prompt + k + 1] * batch
            if graph:
                return graph(ids, lens, tables)
            return model(ids, AttentionMetadata.build([1] * batch, lens, tables, block_size).to(device))

        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        logits = run(next_ids, 0)
        for k in range(steps):
            next_ids = logits.argmax(-1)  # stays on the device as the next step's input
            host_ids = next_ids.to("cpu", non_blocking=True)
            done = torch.cuda.Event() if device == "cuda" else None
            if done is not None:
                done.record()
            if k + 1 < steps:
                # Step k+1 is queued before step k's ids reach the host, as the engine queues
                # a step behind one whose tokens it has not seen: the host builds metadata
                # while the GPU computes, and the GPU does not wait for the host.
                logits = run(next_ids, k + 1)
            if done is not None:
                done.synchronize()
            out.append(host_ids.tolist())  # the sampled ids: the one host wait per step
        elapsed = time.perf_counter() - t
    row = dict(mode=mode, batch=batch, steps=steps, step_ms=elapsed / steps * 1e3,
               tokens_per_s=batch * steps / elapsed, first_ids=[r[0] for r in out[:8]])
    if graph:  # the device's time for one step, without the host's part
        row.update(fused=graph.fused, pdl=graph.pdl)
        if device == "cuda":
            row["replay_ms"] = timer(graph.graph.replay, device, 3, 20, calls=0) * 1e3
            kernels_ = kernel_profile(graph.graph.replay)
            row.update(replay_kernels=kernels_[:16], replay_kernel_us=sum(k["us"] for k in kernels_),
                       replay_launches=sum(k["calls"] for k in kernels_))
    ops.use_gemv = True
    return row


def decode_bench(path: Path, batches: list[int], prompt: int, steps: int, device: str, dtype: torch.dtype,
                 ceiling: float, eager_torch: bool, only: list[str] | None) -> tuple[dict, list[dict], object]:
    block_size = 16
    blocks_per_seq = (prompt + steps + block_size) // block_size
    cache_blocks = max(batches) * blocks_per_seq + 1  # + the graphs' scratch block
    model = load(str(path), dtype, device, cache_blocks, block_size)
    cfg = model.cfg
    params = sum(p.numel() for p in model.parameters())
    # Decode reads every weight once per step, except the embedding table (one row a token).
    weight_bytes = (params - model.embed_tokens.weight.numel()) * dtype.itemsize
    info = dict(preset=path.name, params=params, weight_bytes=weight_bytes,
                prompt=prompt, steps=steps, layers=cfg.num_layers, hidden=cfg.hidden_size)
    rows = []
    for batch in batches:
        mean_ctx = prompt + (steps + 1) / 2
        kv_bytes = 2 * batch * mean_ctx * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
        roofline = batch * ceiling / (weight_bytes + kv_bytes)
        for mode in gpu_batch1.modes(batch, device, eager_torch, only):
            try:
                r = decode_run(model, mode, batch, prompt, steps, block_size, cache_blocks - 1, device)
            except Exception as e:  # one mode failing must not cost the others' numbers
                print(f"decode batch {batch} {mode} failed: {type(e).__name__}: {e}")
                rows.append(dict(mode=mode, batch=batch, error=f"{type(e).__name__}: {e}"[:300]))
                continue
            finally:
                model.allocate_kv_cache(cache_blocks, block_size)  # fresh cache per run
            r.update(roofline_tokens_per_s=roofline, frac_of_roofline=r["tokens_per_s"] / roofline)
            rows.append(r)
    return info, rows, model


def engine_bench(path: Path, batches: list[int], prompt: int, steps: int, device: str) -> dict:
    """Greedy decode through StageWorker.execute with CUDA graphs off, then on (up to the
    largest batch), each worker loaded once and run at every batch size."""
    from raypp.model.config import ModelConfig
    from raypp.parallel.layout import make_layout
    from raypp.runtime.worker import StageWorker

    block_size, warm = 16, 3  # untimed first decode steps: the graph of the batch is captured there
    blocks = (prompt + warm + steps + block_size) // block_size
    cfg = ModelConfig.from_dir(path)
    runs, captured = {}, []
    for graphs in (False, True):
        worker = StageWorker(str(path), "auto", make_layout(cfg, 1, 1), 0, 0, max(batches) * blocks, block_size,
                             device, cuda_graph_max_batch=max(batches) if graphs else 0)
        for batch in batches:
            runs[graphs, batch] = engine_run(worker, batch, prompt, warm, steps, blocks)
        if worker.graphs:
            captured = sorted(worker.graphs.graphs)
        del worker
    rows = []
    for batch in batches:
        (eager_s, eager_ids), (graph_s, graph_ids) = runs[False, batch], runs[True, batch]
        rows.append(dict(batch=batch, steps=steps, eager_step_ms=eager_s * 1e3, graph_step_ms=graph_s * 1e3,
                         eager_tokens_per_s=batch / eager_s, graph_tokens_per_s=batch / graph_s,
                         speedup=eager_s / graph_s, same_tokens=eager_ids == graph_ids))
    return dict(prompt=prompt, warmup_steps=warm, graphs_captured=captured, rows=rows)


def engine_run(worker, batch: int, prompt: int, warm: int, steps: int, blocks: int) -> tuple[float, list]:
    """Prefill, `warm` + `steps` decode steps; returns seconds per timed step and every step's ids."""
    from raypp.model.sampling_params import SamplingParams
    from raypp.runtime.step import StepInput

    vocab = worker.cfg.vocab_size
    prompts = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).tolist()
    tables = [[b * blocks + j for j in range(blocks)] for b in range(batch)]
    greedy = SamplingParams(max_tokens=warm + steps + 1, temperature=0, ignore_eos=True)

    def step(ids: list[int], query_len: int, seq_len: int, k: int) -> list[int]:
        return worker.execute(StepInput(ids, [query_len] * batch, [seq_len] * batch, tables, list(range(batch)),
                                        [greedy] * batch, [0] * batch, [k] * batch, step_id=k)).token_ids

    out = [step(sum(prompts, []), prompt, prompt, 0)]
    for k in range(1, warm + steps + 1):
        if k == warm + 1:
            t = time.perf_counter()
        out.append(step(out[-1], 1, prompt + k, k))
    return (time.perf_counter() - t) / steps, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--engine-batches", default="1,8,32,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    p.add_argument("--check-batches", default="1,8,32", help="batches of the bf16 graph-vs-eager check")
    p.add_argument("--check-steps", type=int, default=32)
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--no-tune", action="store_true", help="keep the fused products' default tiles")
    p.add_argument("--eager-torch", action="store_true", help="also decode eagerly on the torch references")
    p.add_argument("--modes", type=lambda s: s.split(","), help="run only these decode modes (gpu_batch1.modes)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_decode.json"))
    args = p.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on the CPU", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    torch.manual_seed(0)
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
                  torch=torch.__version__, triton=__import__("triton").__version__,
                  flashinfer=ops.HAS_FLASHINFER, dtype=str(dtype), targets=TARGETS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every phase: a run cut short still leaves what it measured
        out.write_text(json.dumps(result, indent=2) + "\n")

    ceiling = copy_bandwidth(device, (1 << 20) if args.dry_run else (2 << 30), 3 if args.dry_run else 20)
    result["copy_gbps"] = ceiling / 1e9
    result["attention_backends"] = bench_attention_backends(device, dtype, args.dry_run, ceiling)
    save()
    if not args.skip_kernels:
        result["kernels"] = bench_kernels(device, dtype, args.dry_run, ceiling)
        save()
    from raypp.model.fused_decode import pdl_available

    if not args.no_tune:
        result["fused_tuning"] = gpu_batch1.tune_fused(device, dtype, args.dry_run, ceiling, timer,
                                                       pdl_available(torch.device(device)))
        save()
    preset = "tiny" if args.dry_run else args.preset
    batches, engine_batches = ([1, 2], [1, 2]) if args.dry_run else (
        [int(b) for b in args.batches.split(",")], [int(b) for b in args.engine_batches.split(",")])
    check_batches = [1, 2] if args.dry_run else [int(b) for b in args.check_batches.split(",")]
    prompt, steps = (8, 2) if args.dry_run else (args.prompt, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        from raypp.model.tiny import make_checkpoint

        t = time.perf_counter()
        path = make_checkpoint(Path(tmp) / preset, preset=preset, seed=0,
                               dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
        made_s = time.perf_counter() - t
        result["model"], result["decode"], model = decode_bench(path, batches, prompt, steps, device, dtype, ceiling,
                                                                args.eager_torch, args.modes)
        result["model"]["checkpoint_made_s"] = made_s
        save()
        try:
            result["graph_vs_eager"] = gpu_batch1.graph_vs_eager(model, check_batches, prompt,
                                                                 2 if args.dry_run else args.check_steps, device)
        except Exception as e:
            print(f"graph_vs_eager failed: {type(e).__name__}: {e}")
            result["graph_vs_eager"] = [dict(error=f"{type(e).__name__}: {e}"[:300])]
        del model
        save()
        result["engine"] = engine_bench(path, engine_batches, prompt, steps, device)
        save()

    gpu_batch1.report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
