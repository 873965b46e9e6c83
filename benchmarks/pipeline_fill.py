#!/usr/bin/env python3
"""Does the pipeline stay full?  raypp's PP throughput against PP=1, against the limit the
model's own step costs set, and per-stage timelines of where each stage's time goes.

    python benchmarks/pipeline_fill.py [--small checkpoints/small] [--peers-ckpt /tmp/peers/ckpt] \
        [--reps 2] [--out benchmarks/results/pipeline_fill.json]

Workload: 32 requests at once, 128-token prompts, 64 new tokens, greedy, EOS ignored; one core
per worker (PP=4: half a core each) on `ray.init(address="local", num_cpus=4)`.  The PP=1
engine stays open and its runs alternate with every other layout's (pipeline_scaling.py's
side-by-side method), so a ratio compares runs seconds apart on a shared machine.

The limit.  In steady decode each stage reads all its weights once per micro-batch, so with m
micro-batches a round of 32 tokens costs each stage m steps of 32/m sequences.  If T(b) is the
time of one decode step of b sequences through the whole model on one core, PP=2 gives at most
2 T(32) / (m T(32/m)) times PP=1's throughput -- 2.0 only if a step's cost grows in proportion
to its sequences.  T(b) is measured here first, in process, one thread (`limit` in the JSON).

Steps reach the workers over the step socket (`parallel.step_transport: socket`, the default);
PP2-mb2-raycalls is the default layout with steps sent as Ray actor calls, for what the socket
saves.

Timelines: every stage's `StepTiming` of one saturated run of PP2 at micro_batches 1 and of the
default layout are kept; the PNG draws one second of steady decode per stage.  The driver's time
per step and a result's return latency come from `Engine.driver`.  vLLM-cpu PP=2 is read from
`/tmp/peers/runs/vllm_pp2.json` (`../shared/peers/vllm_bench.py CKPT --tp 1 --pp 2 --bind "0|1"`,
the step run_all.sh runs) when present.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline_scaling import (CONCURRENCY, INPUT_LEN, OUTPUT_LEN, TOKEN_BUDGET, LayoutRun,  # noqa: E402
                              measure_against_ref, run_on_ray, small_checkpoint)

from raypp import benchmark as bench  # noqa: E402

LAYOUTS = {  # name: (pp, micro_batches or None for the default, cpus per worker, how steps reach workers)
    "PP2-mb1": (2, 1, 1.0, "socket"),
    "PP2-mb2": (2, 2, 1.0, "socket"),
    "PP2-mb2-raycalls": (2, 2, 1.0, "ray"),
    "PP2-mb3": (2, 3, 1.0, "socket"),
    "PP4-mb4": (4, 4, 0.5, "socket"),
    "PP4-mb5": (4, 5, 0.5, "socket"),
}
PEERS_LAYOUTS = ("PP2-mb2", "PP2-mb2-raycalls", "PP2-mb3")
TIMELINES = ("PP2-mb1", "PP2-mb2")
LIMIT_BATCHES = (32, 16, 11, 8, 7)


def log(msg: str) -> None:
    print(msg, flush=True)


def step_costs(path: Path) -> dict:
    """T(b): ms of one decode step of b sequences (context ~160) through the whole model, one thread."""
    import torch

    from raypp.model.config import ModelConfig
    from raypp.model.sampling_params import SamplingParams
    from raypp.parallel.layout import make_layout
    from raypp.runtime.step import StepInput
    from raypp.runtime.worker import StageWorker

    torch.set_num_threads(1)
    cfg = ModelConfig.from_dir(path)
    blocks_per_seq, ctx, n = 16, INPUT_LEN + OUTPUT_LEN // 2, max(LIMIT_BATCHES)
    worker = StageWorker(str(path), "float32", make_layout(cfg, 1, 1, None), 0, 0, n * blocks_per_seq, 16)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(n)]
    g = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0)
    for t in tables:
        worker.execute(StepInput([5] * ctx, [ctx], [ctx], [t], [0], [g], [0], [0]))
    out = {}
    for b in LIMIT_BATCHES:
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            worker.execute(StepInput([7] * b, [1] * b, [ctx + 1] * b, tables[:b], list(range(b)), [g] * b,
                                     [0] * b, [0] * b))
            times.append(time.perf_counter() - t0)
        out[b] = statistics.median(times) * 1e3
    return out


def pp_limit(t: dict, m: int) -> float:
    """The most PP (any depth, same cores in all) can give over PP=1 with m micro-batches of 32."""
    return 2 * t[CONCURRENCY] / (m * t[-(-CONCURRENCY // m)])


class TimelineRecorder:
    """Keeps every StepTiming the engine records (TP rank 0 of each stage)."""

    def __init__(self, engine):
        self.rows: list[dict] = []
        self._stats, self._orig = engine.pipeline_stats, engine.pipeline_stats.record

        def record(timings, step_time_s, **kw):
            self.rows.extend(asdict(t) for t in timings)
            return self._orig(timings, step_time_s, **kw)
        engine.pipeline_stats.record = record

    def close(self) -> list[dict]:
        self._stats.record = self._orig
        return self.rows


def steady_slice(rows: list[dict], seconds: float = 1.0) -> list[dict]:
    """`seconds` of decode steps from the middle of the runs: prefill steps (several times the median
    step) and the gaps between runs stay out."""
    if not rows:
        return []
    med = statistics.median(r["end"] - r["start"] for r in rows)
    decode = sorted((r for r in rows if r["end"] - r["start"] < 3 * med), key=lambda r: r["start"])
    begin = decode[len(decode) // 2]["start"]
    window = [r for r in decode if begin <= r["start"] <= begin + seconds]
    # Stop at the first gap longer than a few steps (the end of a run).
    out = window[:1]
    for r in window[1:]:
        if r["start"] - max(x["end"] for x in out) > 5 * med:
            break
        out.append(r)
    return out


def run_checkpoint(tag: str, path: Path, reps: int, names: list[str]) -> dict:
    from raypp.model.config import ModelConfig

    cfg = ModelConfig.from_dir(path)
    prompts = bench.make_prompts(cfg.vocab_size, CONCURRENCY, INPUT_LEN)
    log(f"[fill] {tag}: measuring T(b) in process")
    t = step_costs(path)
    out = {"path": str(path), "step_ms": t, "limit": {f"m{m}": pp_limit(t, m) for m in (2, 3, 4, 5)},
           "layouts": {}}
    log(f"[fill] {tag}: T(b) ms {t}; PP limit by micro-batches {out['limit']}")

    def config_of(pp, mb, cpus, transport):
        return bench.make_config(path, pp=pp, micro_batches=mb, cpus_per_worker=cpus, max_num_seqs=CONCURRENCY,
                                 max_model_len=INPUT_LEN + OUTPUT_LEN, max_tokens_per_micro_batch=TOKEN_BUDGET,
                                 step_transport=transport)

    with bench.open_engine(config_of(1, 1, 1.0, "socket"), use_ray=True, log=log) as ref_engine:
        ref = LayoutRun("PP1", ref_engine, prompts)
        asyncio.run(ref.warm_up())
        for name in names:
            pp, mb, cpus, transport = LAYOUTS[name]
            with bench.open_engine(config_of(pp, mb, cpus, transport), use_ray=True, log=log) as engine:
                x = LayoutRun(name, engine, prompts)
                rec = TimelineRecorder(engine) if name in TIMELINES else None
                res = asyncio.run(measure_against_ref(ref, x, reps, False, False))
                if rec:
                    res["timeline"] = steady_slice(rec.close())
                driver = engine.stats().driver
                busy_ms, return_ms = driver.per_step_ms()
                res["driver"] = {"busy_ms_per_step": busy_ms, "return_latency_ms": return_ms, "steps": driver.steps}
                res.update({"pp": pp, "micro_batches": engine.config.micro_batches, "cpus_per_worker": cpus,
                            "step_transport": transport})
                res["limit"] = pp_limit(t, engine.config.micro_batches)
                out["layouts"][name] = res
                ratio = res["vs_PP1"]["output_tok_s"]["median"]
                log(f"[fill] {tag} {name}: {ratio:.3f}x PP1 (limit {res['limit']:.3f}, "
                    f"{ratio / res['limit']:.0%} of it); driver {busy_ms:.2f} ms/step")
        out["layouts"]["PP1"] = ref.result()
    return out


def summarize(results: dict) -> dict:
    s = {}
    for tag, ck in results["checkpoints"].items():
        L = ck["layouts"]
        d = {n: {"vs_PP1_tok_s": L[n]["vs_PP1"]["output_tok_s"]["median"],
                 "vs_PP1_steady_decode": L[n]["vs_PP1"].get("steady_decode_tok_s", {}).get("median"),
                 "limit": L[n]["limit"], "bubble_steady": L[n]["saturation"]["bubble_ratio_steady"],
                 "tok_s": L[n]["saturation"]["output_tok_s"]} for n in L if n != "PP1"}
        d["PP1_tok_s"] = L["PP1"]["saturation"]["output_tok_s"]
        vllm = results.get("vllm_pp2")
        if tag == "peers" and vllm:
            for n in PEERS_LAYOUTS:
                if n in d:
                    d[n]["vs_vllm_pp2"] = d[n]["tok_s"] / vllm["bs32_output_tok_s"]
        s[tag] = d
    return s


def plot(results: dict, path: Path) -> str | None:
    plt = bench._plt()
    if plt is None:
        return None
    small = results["checkpoints"].get("small", {})
    panels = [n for n in TIMELINES if small.get("layouts", {}).get(n, {}).get("timeline")]
    fig, ax = plt.subplots(1 + len(panels), 1, figsize=(13, 3.6 * (1 + len(panels))))
    ax = ax if len(panels) else [ax]
    names = [n for n in LAYOUTS if any(n in ck["layouts"] for ck in results["checkpoints"].values())]
    for i, (tag, ck) in enumerate(results["checkpoints"].items()):
        xs = [k + i * 0.4 for k, n in enumerate(names) if n in ck["layouts"]]
        here = [n for n in names if n in ck["layouts"]]
        ax[0].bar(xs, [ck["layouts"][n]["vs_PP1"]["output_tok_s"]["median"] for n in here], 0.4, label=f"{tag}: measured")
        ax[0].scatter(xs, [ck["layouts"][n]["limit"] for n in here], marker="_", s=400, color="k", zorder=3,
                      label="limit set by step costs" if i == 0 else None)
    ax[0].set_xticks([k + 0.2 * (len(results["checkpoints"]) - 1) for k in range(len(names))], names)
    ax[0].axhline(1, color="grey", lw=1)
    ax[0].set(ylabel="output tok/s / PP=1", title=f"{CONCURRENCY} requests, {INPUT_LEN} in / {OUTPUT_LEN} out, "
                                                   "one core per worker (PP4: half)")
    ax[0].legend(fontsize=8)
    colors = {"busy": "tab:green", "wait_prev": "tab:orange", "wait_tokens": "tab:purple"}
    for a, name in zip(ax[1:], panels):
        rows = steady_slice(small["layouts"][name]["timeline"])
        t0 = min(r["start"] for r in rows)
        for r in rows:
            y, s = r["stage"], r["start"] - t0
            segs = [("busy", r["prep_s"]), ("wait_tokens", r["token_wait_s"]), ("wait_prev", r["wait_s"]),
                    ("busy", r["compute_s"] + r["comm_s"])]
            for kind, d in segs:
                a.barh(y, d * 1e3, left=s * 1e3, color=colors[kind], height=0.6)
                s += d
        b = small["layouts"][name]["saturation"]["bubble_ratio_steady"]
        a.set(yticks=range(len(b)), yticklabels=[f"stage {k}" for k in range(len(b))], xlabel="ms",
              title=f"small, {name}: steady decode (green busy, orange waiting for the previous stage, "
                    f"purple waiting for tokens, white idle); bubble {[round(x, 2) for x in b]}")
        a.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", default=str(ROOT / "checkpoints" / "small"))
    ap.add_argument("--peers-ckpt", default="/tmp/peers/ckpt")
    ap.add_argument("--vllm-pp2", default="/tmp/peers/runs/vllm_pp2.json")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated layouts (default: all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_fill.json"))
    args = ap.parse_args()
    bench.env_defaults()
    small = small_checkpoint(Path(args.small))
    only = [n for n in args.only.split(",") if n] or list(LAYOUTS)
    cks = {"small": (small, [n for n in LAYOUTS if n in only])}
    if (Path(args.peers_ckpt) / "config.json").is_file():
        cks["peers"] = (Path(args.peers_ckpt), [n for n in PEERS_LAYOUTS if n in only])
    results = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
               "workload": {"concurrency": CONCURRENCY, "input_len": INPUT_LEN, "output_len": OUTPUT_LEN,
                            "token_budget": TOKEN_BUDGET, "reps": args.reps},
               "loadavg_before": os.getloadavg(), "checkpoints": {}}
    if Path(args.vllm_pp2).is_file():
        results["vllm_pp2"] = json.loads(Path(args.vllm_pp2).read_text())
    t0 = time.perf_counter()
    run_on_ray(results, {tag: (path, args.reps, names) for tag, (path, names) in cks.items()}, run_checkpoint,
               args.out)
    results["loadavg_after"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t0
    results["summary"] = summarize(results)
    out = Path(args.out)
    results["png"] = plot(results, out.with_suffix(".png"))
    bench.write_json(results, out)
    log(json.dumps(results["summary"], indent=2))
    log(f"wrote {out} and {results['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
