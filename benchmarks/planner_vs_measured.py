#!/usr/bin/env python3
"""The planner's predictions for raypp's own CPU runs, against measurements, after calibration.

    python benchmarks/planner_vs_measured.py [--ckpt checkpoints/small] [--layouts 1x1,2x1,1x2,2x2] \
        [--calibrate-layout 2x2] [--itl-concurrency 1] [--sat-concurrency 16] [--input-len 64] [--output-len 64] \
        [--out benchmarks/results/planner_vs_measured.json]

Run it on a quiet machine: every number is a wall-clock time on shared cores.

1. calibrate  one layout (default TP2 x PP2, one core per worker, on a local Ray) runs a load
              phase at each concurrency; the per-stage deltas of the engine's typed stats go
              to `raypp.planner.live_fit.fit`, as `raypp calibrate` does through /stats; the
              fitted factors are written as a hardware file beside the JSON.
2. compare    TP1, TP2, PP2 and TP2 x PP2 each run an ITL phase (--itl-concurrency) and a
              saturated phase (--sat-concurrency); the planner, with the fitted factors,
              predicts ITL (client view: the mean gap between a request's tokens) and output
              tok/s for the same loads.  Errors per layout are printed as the markdown table
              of docs/benchmarks.md; the target is within 15%.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from dataclasses import replace
from pathlib import Path

from raypp.planner.balance import balanced_split
from raypp.planner.hardware import DEVICES, LINKS
from raypp.layout import Layout
from raypp.planner.layout import Cluster, Workload
from raypp.planner.live_fit import Phase, fit, hardware_yaml
from raypp.planner.models import PRESETS
from raypp.planner.strategy import Options, evaluate
from raypp.benchmark import host_info, make_config, make_prompts, open_engine, run_load

ROOT = Path(__file__).resolve().parent.parent
CPU = DEVICES["cpu-epyc-2core"]


def log(msg: str) -> None:
    print(msg, flush=True)


async def _load(engine, vocab: int, concurrency: int, requests: int, isl: int, osl: int):
    prompts = make_prompts(vocab, requests, isl)
    return await run_load(engine, prompts, osl, concurrency, requests, log=log)


def phase_of(load, micro_batches: int) -> Phase:
    st = load.stages_run
    return Phase(concurrency=load.concurrency, micro_batches=micro_batches, input_len=load.input_len,
                 output_len=load.output_len, prefills=load.num_requests, steps=[s["steps"] for s in st],
                 compute_s=[s["compute_s"] for s in st], comm_s=[s["comm_s"] for s in st],
                 bubble_ratio=[s["bubble_ratio"] for s in st], tokens=load.output_tokens, wall_s=load.wall_s)


def measure(ckpt: Path, tp: int, pp: int, loads: list[tuple[int, int]], isl: int, osl: int) -> list:
    """One engine for the layout (one core per worker); a run_load per (concurrency, requests)."""
    config = make_config(ckpt, tp=tp, pp=pp, cpus_per_worker=1.0)
    vocab = PRESETS["small"].vocab
    with open_engine(config, use_ray=True, log=log) as engine:
        asyncio.run(_load(engine, vocab, 1, 1, isl, 4))     # warm-up: first forwards pay allocation
        return [asyncio.run(_load(engine, vocab, c, n, isl, osl)) for c, n in loads]


def predict(eff, tp: int, pp: int, concurrency: int, isl: int, osl: int):
    dev = replace(CPU, efficiency=eff)
    cluster = Cluster(dev, tp * pp, 1, LINKS[dev.intra_link], LINKS[dev.network])
    wl = Workload(dtype="fp32", kv_dtype="fp32", concurrency=concurrency, input_len=isl, output_len=osl)
    return evaluate(PRESETS["small"], Layout(tp, pp, (), 1), cluster, wl, Options(tp=tp, pp=pp)).prediction


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=ROOT / "checkpoints" / "small")
    ap.add_argument("--layouts", default="1x1,2x1,1x2,2x2", help="TPxPP layouts to compare")
    ap.add_argument("--calibrate-layout", default="2x2", help="TPxPP of the calibration run")
    ap.add_argument("--calibrate-concurrency", default="1,8")
    ap.add_argument("--itl-concurrency", type=int, default=1)
    ap.add_argument("--sat-concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32, help="requests of a saturated / calibration phase")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "planner_vs_measured.json")
    args = ap.parse_args()
    if not (args.ckpt / "config.json").is_file():
        from raypp.model.tiny import make_checkpoint
        make_checkpoint(args.ckpt, preset="small", seed=0)
    isl, osl = args.input_len, args.output_len

    ctp, cpp = (int(x) for x in args.calibrate_layout.lower().split("x"))
    concs = [int(x) for x in args.calibrate_concurrency.split(",")]
    log(f"[calibrate] TP{ctp} x PP{cpp}, concurrency {concs}")
    loads = measure(args.ckpt, ctp, cpp, [(c, max(c, args.requests)) for c in concs], isl, osl)
    # The runtime's split for `small` (8 layers, a 4k vocabulary) is the equal one.
    layout = Layout(ctp, cpp, tuple(balanced_split(PRESETS["small"].layers, cpp)))
    cluster = Cluster(CPU, ctp * cpp, 1, LINKS[CPU.intra_link], LINKS[CPU.network])
    eff = fit(PRESETS["small"], layout, cluster, [phase_of(ld, cpp) for ld in loads], "fp32")
    log(f"[calibrate] fitted {eff}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    hw = args.out.with_suffix(".hardware.yaml")
    hw.write_text(hardware_yaml(CPU, eff, "cpu-calibrated", f"benchmarks/planner_vs_measured.py, TP{ctp}xPP{cpp}"))

    rows = []
    for tp, pp in (tuple(int(x) for x in lay.lower().split("x")) for lay in args.layouts.split(",")):
        itl_load, sat_load = measure(args.ckpt, tp, pp, [(args.itl_concurrency, max(4, args.itl_concurrency)),
                                                         (args.sat_concurrency, args.requests)], isl, osl)
        itl_meas = statistics.fmean(x for t in itl_load.traces for x in t.itls_s) * 1e3
        p_itl = predict(eff, tp, pp, args.itl_concurrency, isl, osl)
        p_sat = predict(eff, tp, pp, args.sat_concurrency, isl, osl)
        rows.append({"layout": f"TP{tp}xPP{pp}", "itl_ms": itl_meas, "itl_ms_predicted": p_itl.itl * 1e3,
                     "tok_s": sat_load.output_tok_s, "tok_s_predicted": p_sat.throughput,
                     "bubble_measured": statistics.fmean(s["bubble_ratio"] for s in sat_load.stages_run),
                     "bubble_predicted": p_sat.bubble})
        log(f"[compare] {rows[-1]}")
    result = {"host": host_info(), "input_len": isl, "output_len": osl, "itl_concurrency": args.itl_concurrency,
              "sat_concurrency": args.sat_concurrency, "calibration_layout": args.calibrate_layout,
              "fitted": {k: getattr(eff, k) for k in eff.__dataclass_fields__}, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| layout | ITL ms measured | predicted | error | tok/s measured | predicted | error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['itl_ms']:.1f} | {r['itl_ms_predicted']:.1f} | "
              f"{r['itl_ms_predicted'] / r['itl_ms'] - 1:+.0%} | {r['tok_s']:.1f} | {r['tok_s_predicted']:.1f} | "
              f"{r['tok_s_predicted'] / r['tok_s'] - 1:+.0%} |")
    log(f"wrote {args.out} and {hw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
