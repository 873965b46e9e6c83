"""`raypp calibrate`: measure a live raypp deployment and fit the planner's factors to it.

    raypp calibrate http://127.0.0.1:8000 --model small --gpu cpu --tp 1 --dtype fp32 \\
        --out cpu-calibrated.yaml [--concurrency 1,4,16] [--requests 16] [--input-len 32] [--output-len 32]

For each concurrency it keeps that many completions in flight through the OpenAI API
(`raypp.client`: token-id prompts, greedy, ignore_eos, so every request runs its full
length), reads `/stats` (the engine's typed `EngineStats`) before and after, and takes
the per-stage deltas: forwards, compute, comm and bubble.  `raypp.planner.live_fit` fits the
efficiency factors of the `--gpu` entry to them; the result is written as a hardware
file for `raypp plan --hardware FILE --gpu NAME`, and the fit is reported per stage.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from raypp.client import Client
from raypp.client.errors import RayppError
from raypp.errors import UserError
from raypp.planner.balance import balanced_split
from raypp.planner.hardware import get_device, get_link, load_yaml
from raypp.layout import Layout
from raypp.planner.layout import Cluster
from raypp.planner.live_fit import Phase, fit, hardware_yaml, predicted_phase, rows
from raypp.planner.models import get_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="base URL of a running raypp deployment (serves /stats and /v1/completions)")
    p.add_argument("--model", required=True, help="the deployment's model: a preset (tiny, small, ...) or its "
                   "checkpoint directory / config.json")
    p.add_argument("--gpu", required=True, help="catalog entry whose peaks the fit starts from (cpu, h100-sxm, ...)")
    p.add_argument("--tp", type=int, default=1, help="the deployment's TP degree (PP is read from /stats)")
    p.add_argument("--stage-layers", help="the deployment's layers per stage, comma-separated (default: balanced)")
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp8", "fp32"])
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrencies, one load phase each "
                   "(batch 1 shows the weight stream; two larger loads tell weight packing from FLOPs)")
    p.add_argument("--requests", type=int, default=16, help="completions per phase (at least the concurrency)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--name", help="name of the written entry (default: <gpu>-calibrated)")
    p.add_argument("--out", required=True, metavar="FILE.yaml", help="hardware file to write")
    p.add_argument("--hardware", help="YAML file with the --gpu entry, if it is not in the catalog")
    p.add_argument("--api-key", help="default: $RAYPP_API_KEY")
    p.add_argument("--timeout", type=float, default=600, help="seconds per request")


def measure(client: Client, concurrency: int, requests: int, input_len: int, output_len: int) -> Phase:
    """Keep `concurrency` completions in flight until `requests` have run; stats deltas over that."""
    before = client.stats()
    t0 = time.perf_counter()
    # Distinct prompts (no prefix sharing); ids stay small so every vocabulary holds them.
    prompts = [[1 + (i * 7 + j) % 97 for j in range(input_len)] for i in range(requests)]
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda p: client.complete(p, max_tokens=output_len, temperature=0, ignore_eos=True), prompts))
    wall = time.perf_counter() - t0
    after = client.stats()
    d = lambda a, b: [y - x for x, y in zip(a, b)]
    busy = d([s.busy_s for s in before.stages], [s.busy_s for s in after.stages])
    bubble = d([s.bubble_s for s in before.stages], [s.bubble_s for s in after.stages])
    return Phase(concurrency=concurrency, micro_batches=after.micro_batches, input_len=input_len,
                 output_len=output_len, prefills=requests,
                 steps=d([s.steps for s in before.stages], [s.steps for s in after.stages]),
                 compute_s=d([s.compute_s for s in before.stages], [s.compute_s for s in after.stages]),
                 comm_s=d([s.comm_s for s in before.stages], [s.comm_s for s in after.stages]),
                 bubble_ratio=[b / (u + b) if u + b > 0 else 0.0 for u, b in zip(busy, bubble)],
                 tokens=after.tokens_generated - before.tokens_generated, wall_s=wall,
                 idle_s=d([s.idle_s for s in before.stages], [s.idle_s for s in after.stages]))


def report(model, layout, cluster, fitted_cluster, phases, dtype) -> list[str]:
    lines = ["per stage, ms per forward: measured / catalog factors / fitted factors"]
    before = rows(model, layout, cluster, phases, dtype)
    after = rows(model, layout, fitted_cluster, phases, dtype)
    for b, a in zip(before, after):
        c = phases[a.phase].concurrency
        lines.append(f"  c={c:<4} stage {a.stage} {a.what:<7} {a.measured * 1e3:8.3f} / {b.predicted * 1e3:8.3f} "
                     f"({b.error:+.0%}) / {a.predicted * 1e3:8.3f} ({a.error:+.0%})")
    lines.append("whole phase: measured vs predicted with the fitted factors")
    for ph in phases:
        p = predicted_phase(model, layout, fitted_cluster, ph, dtype)
        thr = ph.tokens / ph.wall_s if ph.wall_s > 0 else 0.0
        bub = sum(ph.bubble_ratio) / len(ph.bubble_ratio)
        lines.append(f"  c={ph.concurrency:<4} throughput {thr:8.1f} vs {p.throughput:8.1f} tok/s "
                     f"({p.throughput / thr - 1 if thr else 0.0:+.0%}); bubble {bub:.0%} vs {p.bubble:.0%}")
    return lines


def run(args) -> int:
    concs = [int(x) for x in args.concurrency.split(",")]
    if min(concs) < 1 or args.requests < max(concs):
        raise UserError(f"--concurrency must be >= 1 and --requests ({args.requests}) >= the largest concurrency")
    devices, links = load_yaml(args.hardware) if args.hardware else ({}, {})
    dev = get_device(args.gpu, devices)
    model = get_model(args.model)
    with Client(args.url, api_key=args.api_key, timeout=args.timeout) as client:
        try:
            pp = len(client.stats().stages)
            split = (tuple(int(x) for x in args.stage_layers.split(",")) if args.stage_layers
                     else tuple(balanced_split(model.layers, pp)))
            if len(split) != pp or sum(split) != model.layers:
                raise UserError(f"--stage-layers {list(split)} must have {pp} entries (the deployment's stages) "
                                f"summing to {model.layers}")
            layout = Layout(args.tp, pp, split)
            cluster = Cluster(dev, layout.world_size, 1, get_link(dev.intra_link, links), get_link(dev.network, links))
            phases = []
            for c in concs:
                print(f"load: {args.requests} requests, {c} in flight, {args.input_len}+{args.output_len} tokens ...")
                phases.append(measure(client, c, args.requests, args.input_len, args.output_len))
        except RayppError as e:
            raise UserError(f"{e}; is the deployment at {args.url} running?") from None
    eff = fit(model, layout, cluster, phases, args.dtype)
    fitted = replace(cluster, device=replace(dev, efficiency=eff))
    print("\n".join(report(model, layout, cluster, fitted, phases, args.dtype)))
    name = args.name or f"{dev.name}-calibrated"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    source = (f"raypp calibrate {args.url} ({model.name}, TP{layout.tp} x PP{pp}, {args.dtype}, "
              f"concurrency {args.concurrency}) on {stamp}; peaks from {dev.name}")
    Path(args.out).write_text(hardware_yaml(dev, eff, name, source))
    print(f"fitted: {eff}")
    print(f"wrote {args.out}: raypp plan --hardware {args.out} --gpu {name} ...")
    return 0
