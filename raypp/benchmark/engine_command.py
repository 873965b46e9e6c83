"""`raypp bench engine`: one layout driven in-process, without HTTP.

    raypp bench engine --model DIR [--tp N --pp N --micro-batches M --device cpu] \
        --concurrency C --input-len L --output-len N --out benchmarks/results/NAME.json

One run measures, for one layout:

- batch-1 latency: decode ms/token = (t(N new) - t(1 new)) / (N - 1) for one L-token prompt,
  the formula of the peer benchmarks (../shared/peers/common.py), median of --reps;
- throughput under load: C requests in flight (closed loop, --num-requests in all, each
  L prompt tokens and N new tokens, greedy, EOS ignored): output tokens / wall time, prefill
  included; TTFT and inter-token latency (ITL) per request;
- per-stage busy / idle time and the bubble ratio (idle / (busy + idle)) over the whole run
  and over the steady decode window (from the moment the first C requests have had one decode
  step each, i.e. 2 tokens, to the first request that finishes), from `Engine.stats()`.

It writes a JSON file and a PNG next to it (cumulative tokens over time, TTFT/ITL
distribution, per-stage busy/idle).  Layouts with TP x PP > 1 (or --ray) run on a local Ray
cluster started here (one CPU per worker by default) and shut down at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from raypp.benchmark.engine import (PROMPT_SEED, check_model_dir, describe_layout, env_defaults, make_config,
                                    make_prompts, open_engine)
from raypp.benchmark.load import decode_latency, generate_timed, run_load
from raypp.benchmark.plots import plot_bench
from raypp.benchmark.report import host_info, write_json
from raypp.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face format)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (default 1)")
    p.add_argument("--micro-batches", type=int, default=None, help="micro-batches in flight (default: pp)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs (torch threads) per worker; in-process runs use this many torch threads")
    p.add_argument("--ray", action="store_true", help="run even TP=PP=1 on a Ray actor (default: in-process)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--num-requests", type=int, default=None, help="requests in all (default: = concurrency)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="new tokens per request (EOS ignored)")
    p.add_argument("--token-budget", type=int, default=None,
                   help="scheduler.max_tokens_per_micro_batch (default: max(512, concurrency x input-len))")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the batch-1 latency measurement")
    p.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency measurement")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up wave")
    p.add_argument("--seed", type=int, default=PROMPT_SEED, help="prompt seed")
    p.add_argument("--out", default="benchmarks/results/bench.json", help="JSON path; the PNG goes beside it")


def _check_args(args) -> Path:
    for name in ("tp", "pp", "concurrency", "input_len", "output_len", "reps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.micro_batches is not None and args.micro_batches < 1:
        raise UserError(f"--micro-batches must be >= 1, got {args.micro_batches}")
    if args.num_requests is not None and args.num_requests < 1:
        raise UserError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    if not str(args.out).endswith(".json"):
        raise UserError(f"--out {args.out}: give a .json path (the PNG is written beside it)")
    model = check_model_dir(args.model)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device here; use --device cpu")
    return model


def run(args) -> int:
    env_defaults()
    model = _check_args(args)
    import torch

    from raypp.model.config import ModelConfig

    cfg = ModelConfig.from_dir(model)
    world = args.tp * args.pp
    use_ray = world > 1 or args.ray
    if not use_ray:
        torch.set_num_threads(max(1, int(args.cpus_per_worker)))
    budget = args.token_budget or max(512, args.concurrency * args.input_len)
    max_len = args.input_len + args.output_len
    if max_len > cfg.max_position_embeddings:
        raise UserError(f"--input-len + --output-len = {max_len} exceeds the model's context "
                        f"({cfg.max_position_embeddings})")
    config = make_config(model, tp=args.tp, pp=args.pp, micro_batches=args.micro_batches, device=args.device,
                         cpus_per_worker=args.cpus_per_worker, max_num_seqs=max(args.concurrency, 1),
                         max_model_len=max_len, max_tokens_per_micro_batch=budget)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot create its directory ({e.strerror})") from None
    n_req = args.num_requests or args.concurrency
    prompts = make_prompts(cfg.vocab_size, max(n_req, 1), args.input_len, args.seed)
    title = (f"raypp bench engine: {model.name} {describe_layout(config)}; concurrency {args.concurrency}, "
             f"{args.input_len} in / {args.output_len} out")
    print(title, flush=True)

    def log(msg):
        print(msg, flush=True)

    async def main(engine):
        res = {}
        if not args.no_warmup:
            log("[bench] warm-up: one wave")
            await generate_timed(engine, prompts[: args.concurrency], min(args.output_len, 8))
        if not args.no_latency and args.output_len >= 2:
            log(f"[bench] batch-1 latency: {args.reps} x (t({args.output_len} new) - t(1 new))")
            lat = await decode_latency(engine, prompts[0], args.output_len, args.reps, warmup=not args.no_warmup)
            res["batch1"] = {k: v for k, v in lat.items() if k != "ids"}
            res["batch1"]["first_ids"] = lat["ids"][:16]
            log(f"[bench] batch-1 decode {lat['decode_ms_per_token']:.2f} ms/token, "
                f"prefill+first token {lat['prefill_plus_first_token_s'] * 1e3:.1f} ms")
        log(f"[bench] load: {n_req} requests, {args.concurrency} in flight")
        load = await run_load(engine, prompts, args.output_len, args.concurrency, n_req, log=log)
        res["load"] = load.to_json()
        return res, load

    t0 = time.perf_counter()
    with open_engine(config, use_ray=use_ray, log=log) as engine:
        startup = time.perf_counter() - t0
        res, load = asyncio.run(main(engine))
    result = {
        "title": title, "argv": sys.argv, "args": vars(args),
        "model": str(model), "layout": {"tp": args.tp, "pp": args.pp, "micro_batches": config.micro_batches,
                                        "device": args.device, "cpus_per_worker": args.cpus_per_worker,
                                        "executor": "ray" if use_ray else "in-process",
                                        "token_budget": budget},
        "host": host_info(), "startup_s": startup, **res,
    }
    png = plot_bench(result, load, out.with_suffix(".png"))
    result["png"] = png
    write_json(result, out)
    ld = res["load"]
    bub = ld["bubble_ratio_steady"] or ld["bubble_ratio_run"]
    print("\nsummary")
    if "batch1" in res:
        print(f"  batch-1 decode      {res['batch1']['decode_ms_per_token']:.2f} ms/token")
    print(f"  throughput          {ld['output_tok_s']:.1f} output tok/s (concurrency {args.concurrency}, "
          f"prefill included); steady decode {ld['steady_decode_tok_s'] or float('nan'):.1f} tok/s")
    print(f"  TTFT p50/p90        {ld['ttft_ms']['p50']:.1f} / {ld['ttft_ms']['p90']:.1f} ms")
    if ld["itl_ms"]["n"]:
        print(f"  ITL p50/p90         {ld['itl_ms']['p50']:.1f} / {ld['itl_ms']['p90']:.1f} ms")
    print("  bubble per stage    " + ", ".join(f"{b:.1%}" for b in bub)
          + (" (steady decode window)" if ld["bubble_ratio_steady"] else " (whole run)"))
    print(f"  wrote {out}" + (f" and {png}" if png else " (no PNG: matplotlib is not installed)"))
    return 0
