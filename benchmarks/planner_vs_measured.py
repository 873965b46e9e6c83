#!/usr/bin/env python3
"""The planner's predictions for raypp's own CPU runs, against measurements, after calibration.

    python benchmarks/planner_vs_measured.py [--ckpt checkpoints/small] [--layouts 1x1,2x1,1x2,2x2] \
        [--calibrate-layout 2x1] [--reps 3] [--itl-concurrency 1] [--sat-concurrency 16] [--input-len 64] \
        [--output-len 64] [--out benchmarks/results/planner_vs_measured.json]
    python benchmarks/planner_vs_measured.py --recompute [--calibration-runs FILE.json:LAYOUT] [--out ...]

Run it on a quiet machine: every number is a wall-clock time on shared cores.  It runs --reps rounds,
each the calibration layout and then every compared layout, so that the machine's drift from one
minute to the next reaches the calibration and the comparison alike.

1. calibrate  one layout (default TP2, one core per worker, on a local Ray) runs a load phase at
              each concurrency; the per-stage deltas of the engine's typed stats, summed over the
              rounds, go to `raypp.planner.live_fit.fit` (from `hardware.CPU_PROBED`, what cpu_probe
              measured), as `raypp calibrate` does through /stats; the fitted factors are written as
              a hardware file beside the JSON, the phases into it.
2. compare    TP1, TP2, PP2 and TP2 x PP2 each run an ITL phase (--itl-concurrency) and a
              saturated phase (--sat-concurrency) per round, a row is the median of its rounds;
              the planner, with the fitted factors, predicts ITL (client view: the mean gap between
              a request's tokens) and output tok/s for the same loads: equal requests, so the
              saturated phase runs in waves of --sat-concurrency that start and end together
              (`perf.static_batch_throughput`).  Errors per layout are printed as the markdown table
              of docs/benchmarks.md; the target is within 15%.

--recompute starts no engine: it refits from the calibration phases recorded in --out (or from
the per-stage runs of another benchmark's JSON, `--calibration-runs pipeline_fill.json:1x2`) and
predicts the rows recorded there again, printing the table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from raypp.planner.cpu_fit import CPU, fit_small, small_layout
from raypp.planner.hardware import LINKS
from raypp.layout import Layout
from raypp.planner.layout import Cluster, Workload, stage_shapes
from raypp.planner.live_fit import Phase, hardware_yaml, merge
from raypp.planner.models import PRESETS
from raypp.planner.perf import decode_round, static_batch_throughput
from raypp.planner.strategy import Options, evaluate
from raypp.benchmark import host_info, make_config, make_prompts, open_engine, run_load

ROOT = Path(__file__).resolve().parent.parent
TOKEN_BUDGET = 512        # make_config's max_tokens_per_micro_batch: prompts prefilled per forward


def log(msg: str) -> None:
    print(msg, flush=True)


async def _load(engine, vocab: int, concurrency: int, requests: int, isl: int, osl: int):
    prompts = make_prompts(vocab, requests, isl)
    return await run_load(engine, prompts, osl, concurrency, requests, log=log)


def phase_of(run: dict, micro_batches: int, token_budget: int) -> Phase:
    """A load run as `LoadResult.to_json` records it (here or in another benchmark's JSON)."""
    st = run["stages_run"]
    return Phase(concurrency=run["concurrency"], micro_batches=micro_batches, input_len=run["input_len"],
                 output_len=run["output_len"], prefills=run["num_requests"], steps=[s["steps"] for s in st],
                 compute_s=[s["compute_s"] for s in st], comm_s=[s["comm_s"] for s in st],
                 bubble_ratio=[s["bubble_ratio"] for s in st], tokens=run["output_tokens"], wall_s=run["wall_s"],
                 idle_s=[s["idle_s"] for s in st], prefill_chunk=token_budget)


def recorded_runs(path: Path) -> list[Phase]:
    """Every per-stage run of pipeline_fill.py's JSON for `small` (its layouts differ only in micro-batches)."""
    data = json.loads(path.read_text())
    budget = data["workload"]["token_budget"]
    layouts = data["checkpoints"]["small"]["layouts"]
    return [phase_of(lay["saturation"]["median_run"], lay["micro_batches"], budget)
            for lay in layouts.values() if lay.get("pp") == 2]


def measure(ckpt: Path, tp: int, pp: int, loads: list[tuple[int, int]], isl: int, osl: int) -> list:
    """One engine for the layout (one core per worker); a run_load per (concurrency, requests)."""
    config = make_config(ckpt, tp=tp, pp=pp, cpus_per_worker=1.0, max_tokens_per_micro_batch=TOKEN_BUDGET)
    vocab = PRESETS["small"].vocab
    with open_engine(config, use_ray=True, log=log) as engine:
        asyncio.run(_load(engine, vocab, 1, 1, isl, 4))     # warm-up: first forwards pay allocation
        return [asyncio.run(_load(engine, vocab, c, n, isl, osl)) for c, n in loads]


def predict(eff, tp: int, pp: int, itl_concurrency: int, sat_concurrency: int, isl: int, osl: int):
    """(ITL ms at itl_concurrency, tok/s and decode bubble of waves of sat_concurrency equal requests)."""
    dev = replace(CPU, efficiency=eff)
    cluster = Cluster(dev, tp * pp, 1, LINKS[dev.intra_link], LINKS[dev.network])
    wl = Workload(dtype="fp32", kv_dtype="fp32", concurrency=itl_concurrency, input_len=isl, output_len=osl,
                  prefill_chunk=TOKEN_BUDGET)
    itl = evaluate(PRESETS["small"], Layout(tp, pp, (), 1), cluster, wl, Options(tp=tp, pp=pp)).prediction.itl
    layout = small_layout(f"{tp}x{pp}")
    sat = replace(wl, concurrency=sat_concurrency)
    shapes = stage_shapes(PRESETS["small"], layout, sat)
    per_forward = max(1, TOKEN_BUDGET // isl)
    tok_s = static_batch_throughput(shapes, layout, cluster, sat, sat_concurrency, per_forward)
    _, bubble, _ = decode_round(shapes, layout, cluster, sat, sat_concurrency,
                                layout.micro_batches(sat_concurrency, None), isl + osl / 2)
    return itl * 1e3, tok_s, bubble


def print_table(rows: list[dict]) -> None:
    print("| layout | ITL ms measured | predicted | error | tok/s measured | predicted | error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['itl_ms']:.1f} | {r['itl_ms_predicted']:.1f} | "
              f"{r['itl_ms_predicted'] / r['itl_ms'] - 1:+.0%} | {r['tok_s']:.1f} | {r['tok_s_predicted']:.1f} | "
              f"{r['tok_s_predicted'] / r['tok_s'] - 1:+.0%} |")


def recompute(args) -> int:
    """Refit and predict the recorded rows again; nothing is started and nothing is written."""
    result = json.loads(args.out.read_text())
    if args.calibration_runs:
        path, spec = args.calibration_runs.rsplit(":", 1)
        layout, phases = small_layout(spec), recorded_runs(Path(path))
    else:
        layout = small_layout(result["calibration_layout"])
        phases = [Phase(**ph) for ph in result["calibration_phases"]]
    eff = fit_small(layout, phases)
    log(f"[recompute] {layout.name} from {len(phases)} phase(s): fitted {eff}")
    rows = []
    for r in result["rows"]:
        tp, pp = (int(x) for x in r["layout"].removeprefix("TP").split("xPP"))
        itl, tok_s, bubble = predict(eff, tp, pp, result["itl_concurrency"], result["sat_concurrency"],
                                     result["input_len"], result["output_len"])
        rows.append({**r, "itl_ms_predicted": itl, "tok_s_predicted": tok_s, "bubble_predicted": bubble})
    print_table(rows)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=ROOT / "checkpoints" / "small")
    ap.add_argument("--layouts", default="1x1,2x1,1x2,2x2", help="TPxPP layouts to compare")
    ap.add_argument("--calibrate-layout", default="2x1", help="TPxPP of the calibration run")
    ap.add_argument("--calibrate-concurrency", default="1,4,16")
    ap.add_argument("--itl-concurrency", type=int, default=1)
    ap.add_argument("--sat-concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32, help="requests of a saturated / calibration phase")
    ap.add_argument("--reps", type=int, default=3,
                    help="rounds over the calibration and the layouts; a row is the median of its runs")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "planner_vs_measured.json")
    ap.add_argument("--recompute", action="store_true", help="refit and predict the rows recorded in --out again")
    ap.add_argument("--calibration-runs", metavar="FILE.json:TPxPP",
                    help="with --recompute: calibrate from pipeline_fill.py's per-stage runs of that layout")
    args = ap.parse_args()
    if args.recompute:
        return recompute(args)
    if not (args.ckpt / "config.json").is_file():
        from raypp.model.tiny import make_checkpoint
        make_checkpoint(args.ckpt, preset="small", seed=0)
    isl, osl = args.input_len, args.output_len

    layout = small_layout(args.calibrate_layout)
    concs = [int(x) for x in args.calibrate_concurrency.split(",")]
    layouts = [tuple(int(x) for x in lay.lower().split("x")) for lay in args.layouts.split(",")]
    load_before = os.getloadavg()
    cal_runs, runs = [], {lay: [] for lay in layouts}
    # Whole rounds, the calibration layout first: this shared VM's speed drifts by 10-20% from one minute
    # to the next, so a calibration measured once, minutes before the layouts, carries its minute's speed
    # into every prediction.  Each round's calibration phases are summed with the others'.
    for rep in range(args.reps):
        log(f"[calibrate] round {rep + 1}/{args.reps}: {layout.name}, concurrency {concs}")
        cal_runs.append(measure(args.ckpt, layout.tp, layout.pp, [(c, max(c, args.requests)) for c in concs],
                                isl, osl))
        for tp, pp in layouts:
            log(f"[compare] round {rep + 1}/{args.reps}: TP{tp}xPP{pp}")
            runs[tp, pp].append(measure(args.ckpt, tp, pp, [(args.itl_concurrency, max(4, args.itl_concurrency)),
                                                            (args.sat_concurrency, args.requests)], isl, osl))
    phases = [merge([phase_of(r[i].to_json(), layout.pp, TOKEN_BUDGET) for r in cal_runs]) for i in range(len(concs))]
    eff = fit_small(layout, phases)
    log(f"[calibrate] fitted {eff}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    hw = args.out.with_suffix(".hardware.yaml")
    hw.write_text(hardware_yaml(CPU, eff, "cpu-calibrated", f"benchmarks/planner_vs_measured.py, {layout.name}"))
    rows = []
    for (tp, pp), reps in runs.items():
        itls = [statistics.fmean(x for t in itl.traces for x in t.itls_s) * 1e3 for itl, _ in reps]
        tok_s = [sat.output_tok_s for _, sat in reps]
        p_itl, p_tok_s, p_bubble = predict(eff, tp, pp, args.itl_concurrency, args.sat_concurrency, isl, osl)
        rows.append({"layout": f"TP{tp}xPP{pp}", "itl_ms": statistics.median(itls), "itl_ms_predicted": p_itl,
                     "tok_s": statistics.median(tok_s), "tok_s_predicted": p_tok_s,
                     "itl_ms_runs": itls, "tok_s_runs": tok_s,
                     "bubble_measured": statistics.fmean(s["bubble_ratio"] for _, sat in reps for s in sat.stages_run),
                     "bubble_predicted": p_bubble,
                     # each layout's own per-stage runs, so a later --recompute can calibrate on any of them
                     "phases": [asdict(phase_of(ld.to_json(), pp, TOKEN_BUDGET)) for ld in reps[0]]})
        log(f"[compare] {({k: v for k, v in rows[-1].items() if k != 'phases'})}")
    result = {"host": host_info(), "loadavg_before": list(load_before), "input_len": isl, "output_len": osl, "itl_concurrency": args.itl_concurrency,
              "sat_concurrency": args.sat_concurrency, "calibration_layout": args.calibrate_layout,
              "fitted": asdict(eff), "calibration_phases": [asdict(ph) for ph in phases], "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows)
    log(f"wrote {args.out} and {hw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
