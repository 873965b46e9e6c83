#!/usr/bin/env python3
"""Pipeline and tensor parallel scaling of raypp on real Ray, one core per worker.

    python benchmarks/pipeline_scaling.py [--small checkpoints/small] [--peers-ckpt /tmp/peers/ckpt] \
        [--reps 2] [--out benchmarks/results/pipeline_scaling.json]

A GPU cluster gives each worker one device; here each worker gets one CPU core: one Ray
actor per worker with `parallel.cpus_per_worker: 1` (one torch thread), on a local cluster
`ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=100 MB)`,
shut down at the end whatever happens.  For each checkpoint (raypp's `small`, made with
raypp.model.tiny.make_checkpoint if missing, and the peers' 160M one if present):

layouts   PP1 (TP=1 PP=1, one worker on a Ray actor), PP1-local (the same in the driver
          process, one torch thread: what Ray costs), PP2 with micro_batches 1, 2, 4, TP2.
saturate  32 requests at once, 128-token prompts, 64 new tokens, greedy, EOS ignored:
          output tok/s with prefill (the peers' batch-32 number), decode tok/s and per-stage
          bubble ratio in the steady decode window (all 32 have had one decode step .. the first
          finishes); median over --reps.
side by side  The PP1 engine stays open the whole time (1 CPU) and every other layout (at most
          2 CPUs) alternates its runs with it: ref, X, X, ref, ref, X...  Ratios to PP1 are
          medians over those pairs, so machine-wide noise between minutes cancels.
batch 1   decode ms/token = (t(64 new) - t(1 new)) / 63 (the peers' formula) for PP1, TP2, PP2.
planner   on `small`: concurrency 1 and 8, 128 in / 128 out, for TP1, TP2, PP2 (the rows of
          docs/planner.md), measured TTFT / ITL / tok/s / bubble next to `raypp plan --json`.

Writes the JSON and a PNG (matplotlib, Agg) beside it.  The shared measurement code is
raypp/benchmark/ (the `raypp bench` command).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raypp import benchmark as bench  # noqa: E402

CONCURRENCY, INPUT_LEN, OUTPUT_LEN = 32, 128, 64
PLANNER_LOADS = [(1, 128, 128), (8, 128, 128)]  # (concurrency, input, output) of docs/planner.md
LAYOUTS = {  # name: (tp, pp, micro_batches, on Ray)
    "PP1": (1, 1, 1, True),
    "PP1-local": (1, 1, 1, False),
    "PP2-mb1": (1, 2, 1, True),
    "PP2-mb2": (1, 2, 2, True),
    "PP2-mb4": (1, 2, 4, True),
    "TP2": (2, 1, 1, True),
}
LATENCY_LAYOUTS = {"PP1", "PP1-local", "PP2-mb2", "TP2"}
PLANNER_LAYOUTS = {"PP1": (1, 1), "TP2": (2, 1), "PP2-mb2": (1, 2)}
TOKEN_BUDGET = CONCURRENCY * INPUT_LEN  # as vLLM's max_num_batched_tokens in the peers' runs
RAY_INIT = dict(address="local", num_cpus=4, include_dashboard=False, object_store_memory=100 * 2**20)


def log(msg: str) -> None:
    print(msg, flush=True)


def small_checkpoint(path: Path) -> Path:
    """raypp's `small` checkpoint at `path`, made first if absent."""
    if not (path / "config.json").is_file():
        from raypp.model.tiny import make_checkpoint
        log(f"[scaling] making the `small` checkpoint in {path}")
        make_checkpoint(path, preset="small")
    return path


def planner(model: str, tp: int, pp: int, c: int, inp: int, out: int, mb: int | None = None) -> dict | None:
    cmd = [sys.executable, "-m", "raypp.cli", "plan", "--model", model, "--gpu", "cpu", "--gpus-per-node",
           str(tp * pp), "--dtype", "fp32", "--concurrency", str(c), "--input-len", str(inp),
           "--output-len", str(out), "--tp", str(tp), "--pp", str(pp), "--json"]
    if mb:
        cmd += ["--micro-batches", str(mb)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    if r.returncode != 0:
        log(f"[scaling] planner failed ({' '.join(cmd[3:])}): {r.stderr.strip()[-300:]}")
        return None
    row = json.loads(r.stdout)[0]
    return {k: row.get(k) for k in ("ttft_ms", "itl_ms", "throughput_tok_s", "bubble_fraction", "micro_batches",
                                   "stage_layers")} | {"command": "raypp " + " ".join(cmd[3:])}


def _median_by(runs: list[dict], key: str) -> dict:
    """The run whose `key` is the median (lower middle for an even count)."""
    return sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]


def _saturation_summary(runs: list[dict], pp: int) -> dict:
    med = _median_by(runs, "output_tok_s")
    return {
        "output_tok_s": statistics.median(r["output_tok_s"] for r in runs),
        "output_tok_s_reps": [r["output_tok_s"] for r in runs],
        "steady_decode_tok_s": statistics.median(r["steady_decode_tok_s"] or 0.0 for r in runs),
        "steady_decode_tok_s_reps": [r["steady_decode_tok_s"] for r in runs],
        # bubble: per stage, median over reps
        "bubble_ratio_steady": [statistics.median((r["bubble_ratio_steady"] or r["bubble_ratio_run"])[s] for r in runs)
                                for s in range(pp)],
        "bubble_ratio_run": [statistics.median(r["bubble_ratio_run"][s] for r in runs) for s in range(pp)],
        "loadavg_1min_reps": [r["loadavg_1min"] for r in runs],
        "median_run": med,
        "other_runs": [{k: v for k, v in r.items() if k not in ("timeline", "stages_run", "stages_steady")}
                       for r in runs if r is not med],
    }


class LayoutRun:
    """One open engine and everything measured on it."""

    def __init__(self, name: str, engine, prompts: list[list[int]]):
        self.name, self.engine, self.prompts = name, engine, prompts
        self.runs: list[dict] = []
        self.latency: list[dict] = []
        self.t0 = time.perf_counter()

    async def warm_up(self) -> None:
        await bench.generate_timed(self.engine, self.prompts[:4], 4)  # every code path, small

    async def saturate(self, label: str) -> dict:
        load = await bench.run_load(self.engine, self.prompts, OUTPUT_LEN, CONCURRENCY, label=f" {self.name} {label}")
        j = load.to_json()
        j["loadavg_1min"] = os.getloadavg()[0]
        j["timeline"] = load.timeline()[:: max(1, len(load.timeline()) // 400)]
        self.runs.append(j)
        log(f"[scaling] {self.name} {label}: {j['output_tok_s']:.1f} tok/s with prefill, steady decode "
            f"{j['steady_decode_tok_s'] or 0:.1f} tok/s, bubble steady "
            f"{[round(b, 3) for b in (j['bubble_ratio_steady'] or [])]} run {[round(b, 3) for b in j['bubble_ratio_run']]}"
            f" (loadavg {j['loadavg_1min']:.1f}) [{time.perf_counter() - self.t0:.0f}s]")
        return j

    async def latency_rep(self, warmup: bool) -> dict:
        lat = await bench.decode_latency(self.engine, self.prompts[0], OUTPUT_LEN, reps=1, warmup=warmup)
        self.latency.append(lat)
        log(f"[scaling] {self.name}: batch-1 {lat['decode_ms_per_token']:.2f} ms/token")
        return lat

    async def planner_loads(self) -> dict:
        out = {}
        for c, inp, n_out in PLANNER_LOADS:
            load = await bench.run_load(self.engine, self.prompts[:c], n_out, c, label=f" {self.name} c={c}")
            j = load.to_json()
            out[f"c{c}"] = {
                "concurrency": c, "input_len": inp, "output_len": n_out, "ttft_ms_p50": j["ttft_ms"]["p50"],
                "itl_ms_p50": j["itl_ms"]["p50"], "itl_ms_mean": j["itl_ms"]["mean"],
                "output_tok_s": j["output_tok_s"],
                "bubble_ratio_steady": j["bubble_ratio_steady"] or j["bubble_ratio_run"]}
            log(f"[scaling] {self.name} c={c}: TTFT {j['ttft_ms']['p50']:.0f} ms, ITL {j['itl_ms']['p50']:.1f} ms, "
                f"{j['output_tok_s']:.1f} tok/s [{time.perf_counter() - self.t0:.0f}s]")
        return out

    def result(self) -> dict:
        pp = self.engine.config.parallel.pp
        res = {"saturation": _saturation_summary(self.runs, pp)}
        if self.latency:
            per = [x["decode_ms_per_token"] for x in self.latency]
            res["batch1"] = {"decode_ms_per_token": statistics.median(per), "decode_ms_per_token_reps": per,
                             "prefill_plus_first_token_s": statistics.median(
                                 x["prefill_plus_first_token_s"] for x in self.latency),
                             "first_ids": self.latency[-1]["ids"][:16]}
        return res


async def measure_against_ref(ref: LayoutRun, x: LayoutRun, reps: int, with_latency: bool, with_planner: bool) -> dict:
    """x and the PP1 reference side by side: their runs alternate (ref, x, x, ref, ref, x, ...), so a
    ratio compares runs seconds apart on this shared machine."""
    await x.warm_up()
    pairs: dict = {"output_tok_s": [], "steady_decode_tok_s": [], "batch1_ms_per_token": []}
    if with_latency:
        for i in range(3):
            order = (ref, x) if i % 2 == 0 else (x, ref)
            got = {lay.name: await lay.latency_rep(warmup=(i == 0)) for lay in order}
            pairs["batch1_ms_per_token"].append(got[x.name]["decode_ms_per_token"] / got[ref.name]["decode_ms_per_token"])
    for i in range(reps):
        order = (ref, x) if i % 2 == 0 else (x, ref)
        got = {lay.name: await lay.saturate(f"rep {i + 1}/{reps}") for lay in order}
        a, b = got[x.name], got[ref.name]
        pairs["output_tok_s"].append(a["output_tok_s"] / b["output_tok_s"])
        if a["steady_decode_tok_s"] and b["steady_decode_tok_s"]:
            pairs["steady_decode_tok_s"].append(a["steady_decode_tok_s"] / b["steady_decode_tok_s"])
    res = x.result()
    res["vs_PP1"] = {k: {"median": statistics.median(v), "reps": v} for k, v in pairs.items() if v}
    log(f"[scaling] {x.name} / PP1 side by side: " + ", ".join(
        f"{k} {v['median']:.3f}" for k, v in res["vs_PP1"].items()))
    if with_planner:
        res["planner_loads"] = await x.planner_loads()
    return res


def run_checkpoint(tag: str, path: Path, reps: int, with_planner: bool, planner_model: str,
                   only: list[str] | None) -> dict:
    import torch

    from raypp.model.config import ModelConfig

    cfg = ModelConfig.from_dir(path)
    prompts = bench.make_prompts(cfg.vocab_size, CONCURRENCY, INPUT_LEN)
    out = {"path": str(path), "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size,
                                        "vocab": cfg.vocab_size}, "layouts": {}}
    max_len = INPUT_LEN + max(OUTPUT_LEN, *(o for _, _, o in PLANNER_LOADS))

    def config_of(name):
        tp, pp, mb, _ = LAYOUTS[name]
        return bench.make_config(path, tp=tp, pp=pp, micro_batches=mb, cpus_per_worker=1,
                                 max_num_seqs=CONCURRENCY, max_model_len=max_len,
                                 max_tokens_per_micro_batch=TOKEN_BUDGET)

    def describe(name):
        tp, pp, mb, on_ray = LAYOUTS[name]
        return (f"{name} (TP={tp} PP={pp} micro_batches={mb}, "
                f"{'Ray actors' if on_ray else 'in-process, 1 torch thread'})")

    torch.set_num_threads(1)  # the driver computes only for PP1-local
    log(f"[scaling] --- {tag}: reference {describe('PP1')}, kept open; every other layout runs beside it ---")
    t_ref = time.perf_counter()
    with bench.open_engine(config_of("PP1"), use_ray=True, log=log) as ref_engine:
        ref = LayoutRun("PP1", ref_engine, prompts)
        ref_startup = time.perf_counter() - t_ref
        asyncio.run(ref.warm_up())
        for name, (tp, pp, mb, on_ray) in LAYOUTS.items():
            if name == "PP1" or (only and name not in only):
                continue
            log(f"[scaling] --- {tag}: {describe(name)} ---")
            t = time.perf_counter()
            with bench.open_engine(config_of(name), use_ray=on_ray, log=log) as engine:
                startup = time.perf_counter() - t
                res = asyncio.run(measure_against_ref(
                    ref, LayoutRun(name, engine, prompts), reps, name in LATENCY_LAYOUTS,
                    with_planner and name in PLANNER_LAYOUTS))
            res.update({"tp": tp, "pp": pp, "micro_batches": mb, "executor": "ray" if on_ray else "in-process",
                        "startup_s": startup, "wall_s": time.perf_counter() - t})
            out["layouts"][name] = res
        ref_planner = asyncio.run(ref.planner_loads()) if with_planner else None
        res = ref.result()
        if ref_planner:
            res["planner_loads"] = ref_planner
        res.update({"tp": 1, "pp": 1, "micro_batches": 1, "executor": "ray", "startup_s": ref_startup,
                    "wall_s": time.perf_counter() - t_ref,
                    "note": "reference: its runs alternate with every other layout's"})
        out["layouts"] = {"PP1": res, **out["layouts"]}
    if with_planner:
        out["planner"] = {}
        for name, (tp, pp) in PLANNER_LAYOUTS.items():
            if name in out["layouts"]:
                out["planner"][name] = {f"c{c}": planner(planner_model, tp, pp, c, i, o) for c, i, o in PLANNER_LOADS}
                out["planner"][name]["saturation"] = planner(planner_model, tp, pp, CONCURRENCY, INPUT_LEN,
                                                             OUTPUT_LEN, LAYOUTS[name][2])
    return out


def summarize(results: dict, peers_root: Path) -> dict:
    s: dict = {}
    for tag, ck in results["checkpoints"].items():
        L = ck["layouts"]
        d = {}
        # ratios to PP1 are medians of side-by-side pairs (runs seconds apart), not of separate medians
        vs = lambda n, k: L[n]["vs_PP1"][k]["median"] if n in L and k in L[n].get("vs_PP1", {}) else None  # noqa: E731
        if vs("PP2-mb2", "output_tok_s"):
            d["pp2_over_pp1_tok_s"] = vs("PP2-mb2", "output_tok_s")
            d["pp2_over_pp1_steady_decode_tok_s"] = vs("PP2-mb2", "steady_decode_tok_s")
            best = max((n for n in ("PP2-mb1", "PP2-mb2", "PP2-mb4") if vs(n, "output_tok_s")),
                       key=lambda n: vs(n, "output_tok_s"))
            d["best_pp2"] = best
            d["best_pp2_over_pp1_tok_s"] = vs(best, "output_tok_s")
        if vs("PP1-local", "output_tok_s"):
            d["pp1_ray_over_local_tok_s"] = 1 / vs("PP1-local", "output_tok_s")
        if vs("PP1-local", "batch1_ms_per_token"):
            d["pp1_ray_over_local_batch1_latency"] = 1 / vs("PP1-local", "batch1_ms_per_token")
        if vs("TP2", "batch1_ms_per_token"):
            d["tp2_over_tp1_batch1_latency"] = vs("TP2", "batch1_ms_per_token")
        if vs("TP2", "output_tok_s"):
            d["tp2_over_tp1_tok_s"] = vs("TP2", "output_tok_s")
        if vs("PP2-mb2", "batch1_ms_per_token"):
            d["pp2_over_pp1_batch1_latency"] = vs("PP2-mb2", "batch1_ms_per_token")
        sat = lambda n, k="output_tok_s": L[n]["saturation"][k] if n in L else None  # noqa: E731
        d["bubble_pp2_steady"] = {n: L[n]["saturation"]["bubble_ratio_steady"] for n in ("PP2-mb1", "PP2-mb2", "PP2-mb4")
                                  if n in L}
        if tag == "peers":
            p = peers_root / "runs" / "vllm_pp2.json"
            if p.is_file() and sat("PP2-mb2"):
                v = json.loads(p.read_text())
                if "bs32_output_tok_s" in v:
                    d["vllm_pp2_bs32_tok_s"] = v["bs32_output_tok_s"]
                    d["pp2_over_vllm_pp2_tok_s"] = sat("PP2-mb2") / v["bs32_output_tok_s"]
        s[tag] = d
    t = {}
    for tag, d in s.items():
        if "pp2_over_pp1_tok_s" in d:
            t[f"{tag}: PP=2 >= 1.8x PP=1 throughput"] = {"ratio": d["pp2_over_pp1_tok_s"], "met": d["pp2_over_pp1_tok_s"] >= 1.8}
        if "PP2-mb2" in d.get("bubble_pp2_steady", {}):
            worst = max(d["bubble_pp2_steady"]["PP2-mb2"])
            t[f"{tag}: bubble <= 10% at PP=2 micro_batches=2 saturated"] = {"ratio": worst, "met": worst <= 0.10}
        if "tp2_over_tp1_batch1_latency" in d:
            r = d["tp2_over_tp1_batch1_latency"]
            t[f"{tag}: TP=2 batch-1 latency <= 0.7x TP=1"] = {"ratio": r, "met": r <= 0.7}
        if "pp2_over_vllm_pp2_tok_s" in d:
            r = d["pp2_over_vllm_pp2_tok_s"]
            t[f"{tag}: raypp PP=2 >= 2x vLLM-cpu PP=2 throughput"] = {"ratio": r, "met": r >= 2.0}
    return {"ratios": s, "targets": t}


def run_on_ray(results: dict, jobs: dict, run, out: str) -> None:
    """`results["checkpoints"][tag] = run(tag, *args)` for each job, on a local Ray cluster."""
    import ray
    ray.init(**RAY_INIT, log_to_driver=False)
    try:
        # `timeout` or a kill sends SIGTERM: leave through `finally`, so that Ray is shut down
        # (set after ray.init, which installs a handler of its own).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        results["host"] = bench.host_info()
        for tag, job in jobs.items():
            results["checkpoints"][tag] = run(tag, *job)
            bench.write_json(results, out)  # partial results survive a later failure
    finally:
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", default=str(ROOT / "checkpoints" / "small"))
    ap.add_argument("--peers-ckpt", default="/tmp/peers/ckpt")
    ap.add_argument("--peers-root", default=os.environ.get("PEERS_ROOT", "/tmp/peers"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated layouts (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated checkpoints to skip: small, peers")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_scaling.json"))
    args = ap.parse_args()
    bench.env_defaults()
    small = small_checkpoint(Path(args.small))
    cks = {"small": (small, "small")}
    if (Path(args.peers_ckpt) / "config.json").is_file():
        cks["peers"] = (Path(args.peers_ckpt), str(Path(args.peers_ckpt) / "config.json"))
    else:
        log(f"[scaling] no peers checkpoint at {args.peers_ckpt}: skipped (run ../shared/peers/run_all.sh)")
    skip = {s for s in args.skip.split(",") if s}
    only = [s for s in args.only.split(",") if s] or None
    results = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
               "ray_init": {k: v for k, v in RAY_INIT.items()}, "workload": {
                   "concurrency": CONCURRENCY, "input_len": INPUT_LEN, "output_len": OUTPUT_LEN,
                   "token_budget": TOKEN_BUDGET, "reps": args.reps, "planner_loads": PLANNER_LOADS,
                   "cpus_per_worker": 1},
               "checkpoints": {}}
    t0 = time.perf_counter()
    jobs = {tag: (path, args.reps, True, planner_model, only) for tag, (path, planner_model) in cks.items()
            if tag not in skip}
    run_on_ray(results, jobs, run_checkpoint, args.out)
    results["wall_s"] = time.perf_counter() - t0
    results["summary"] = summarize(results, Path(args.peers_root))
    out = Path(args.out)
    from pipeline_scaling_plot import plot
    results["png"] = plot(results, out.with_suffix(".png"))
    bench.write_json(results, out)
    log(json.dumps(results["summary"], indent=2))
    log(f"wrote {out} and {results['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
