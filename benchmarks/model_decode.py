#!/usr/bin/env python3
"""raypp's single-process decode speed on the peers' checkpoint, measured like the peers.

    python benchmarks/model_decode.py [MODEL_DIR] [--threads 2] [--reps 3] \
        [--peers-root /tmp/peers] [--out benchmarks/results/model_decode.json] [--no-profile] \
        [--sandwich vllm_tp1,... [--rounds 1]]

MODEL_DIR defaults to /tmp/peers/ckpt (what ../shared/peers/make_small.py writes; any HF
Llama directory works).  One process, the in-process engine (TP = PP = 1), `--threads` torch
threads; prompts and formulas are the peers' own (../shared/peers/common.py, imported):

- batch 1 : one 128-token prompt, 64 new tokens; decode ms/token = (t(64 new) - t(1 new)) / 63;
- batch 32: 32 x 128-token prompts at once, 64 new tokens each; output tokens / wall s,
  prefill included;

greedy, EOS ignored, one warm-up of each shape, medians of REPS.  The scheduler gets the
limits vLLM gets in vllm_bench.py (max_num_seqs = 32, a token budget of 32 x 128 per step,
max_model_len 512).  The first FIRST_IDS generated ids of the batch-1 run are compared with
the peers' (hf.json and vllm_*.json under PEERS_ROOT/runs) when those exist, and the peers'
numbers are copied into the output with the ratios and the targets.

Then (unless --no-profile) where the time goes: the engine's per-token time at batch 1 and 32
(ITL p50 under run_load), and one recorded decode step of each batch replayed on the worker
under torch.profiler (execute / metadata build / forward / sampling, top ops by self CPU time).

On a shared, noisy machine two runs minutes apart can differ 2-3x, so `--sandwich hf,vllm_tp1`
measures side by side instead: raypp, peer, raypp, next peer, raypp, ... (the peers run with
the same commands as run_all.sh, from the venvs it built) and rates each peer against the mean
of the two raypp runs around it (out: model_decode_sandwich.json, no profile); `--rounds N`
repeats the whole sandwich and takes each ratio's median over the rounds.  Each run first waits
(at most SETTLE_S) for the 1-min load to fall below 1.0: vLLM's processes wind down for a
minute after it reports, and a raypp run started at once shares the cores with them.  raypp runs the
layout that matches the peer: in-process with --threads threads next to hf / vllm_tp1, TP=2 or
PP=2 (micro_batches 2) on two Ray actors of one CPU each next to vllm_tp2 / vllm_pp2.
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
PEERS_DIR = os.environ.get("RAYPP_PEERS_DIR", str(ROOT.parent / "shared" / "peers"))
sys.path.insert(0, PEERS_DIR)
import common  # noqa: E402  (the peers' workload definition)

TARGETS = {  # from the issues (the cpu-speed ones for vLLM TP=1); ratio = raypp / peer
    "bs1_vs_vllm_tp1": ("batch-1 ms/token <= 0.9x vLLM-cpu TP=1", "<=", 0.9),
    "bs1_vs_hf": ("batch-1 ms/token <= 0.7x HF", "<=", 0.7),
    "bs32_vs_vllm_tp1": ("batch-32 tok/s >= 1.1x vLLM-cpu TP=1", ">=", 1.1),
}


def load_peers(root: Path) -> dict:
    out = {}
    for step in ("hf", "vllm_tp1", "vllm_tp2", "vllm_pp2", "vllm_http"):
        p = root / "runs" / f"{step}.json"
        if p.is_file():
            try:
                out[step] = json.loads(p.read_text())
            except ValueError:
                pass
    return out


PEER_ARGS = {  # as run_all.sh runs them
    "hf": ("hf-venv", "hf_bench.py", ["--threads", "2"]),
    "vllm_tp1": ("vllm-venv", "vllm_bench.py", ["--tp", "1", "--pp", "1", "--bind", "0-1"]),
    "vllm_tp2": ("vllm-venv", "vllm_bench.py", ["--tp", "2", "--pp", "1", "--bind", "0|1"]),
    "vllm_pp2": ("vllm-venv", "vllm_bench.py", ["--tp", "1", "--pp", "2", "--bind", "0|1"]),
}


SETTLE_S = 120  # the longest a sandwich run waits for the previous run's load to settle

# the raypp layout a peer is compared with: the same number of cores, split the same way
SANDWICH_LAYOUT = {"hf": "local", "vllm_tp1": "local", "vllm_tp2": "tp2", "vllm_pp2": "pp2"}


def run_peer(step: str, model: str, peers_root: Path, tag: str, timeout_s: int = 1500) -> dict:
    venv, script, extra = PEER_ARGS[step]
    out_dir = peers_root / "sandwich"
    out_dir.mkdir(parents=True, exist_ok=True)
    out, log_path = out_dir / f"{tag}.json", out_dir / f"{tag}.log"
    cmd = [str(peers_root / venv / "bin" / "python"), os.path.join(PEERS_DIR, script), model, *extra, "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CACHE_ROOT=os.environ.get("VLLM_CACHE_ROOT", str(peers_root / "cache" / "vllm")))
    env.pop("OMP_NUM_THREADS", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait()
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"peer {step} failed (rc={rc}); see {log_path}")
    res = json.loads(out.read_text())
    res["command"] = " ".join(cmd)
    return res


def compare(raypp: dict, peers: dict) -> dict:
    ratios, targets = {}, {}
    if "hf" in peers:
        ratios["bs1_vs_hf"] = raypp["bs1_decode_ms_per_token"] / peers["hf"]["bs1_decode_ms_per_token"]
        ratios["bs32_vs_hf"] = raypp["bs32_output_tok_s"] / peers["hf"]["bs32_output_tok_s"]
    for step in ("vllm_tp1", "vllm_tp2", "vllm_pp2"):
        if step in peers and "bs1_decode_ms_per_token" in peers[step]:
            ratios[f"bs1_vs_{step}"] = raypp["bs1_decode_ms_per_token"] / peers[step]["bs1_decode_ms_per_token"]
            ratios[f"bs32_vs_{step}"] = raypp["bs32_output_tok_s"] / peers[step]["bs32_output_tok_s"]
    if "vllm_http" in peers and "http_output_tok_s" in peers["vllm_http"]:
        ratios["bs32_vs_vllm_http"] = raypp["bs32_output_tok_s"] / peers["vllm_http"]["http_output_tok_s"]
    for key, (text, op, bound) in TARGETS.items():
        if key in ratios:
            r = ratios[key]
            targets[key] = {"target": text, "ratio": r, "met": r <= bound if op == "<=" else r >= bound}
    ids = {}
    for step, res in peers.items():
        if res.get("first_ids_bs1"):
            ids[step] = {"ids": res["first_ids_bs1"], "match": res["first_ids_bs1"] == raypp["first_ids_bs1"]}
    return {"ratios": ratios, "targets": targets, "first_ids_vs_peers": ids}


def run_sandwich(args, sandwich: list[str], raypp_run, log, t0: float) -> int:
    """raypp, peer 1, raypp, peer 2, raypp, ...: each peer against the mean of its two neighbours."""
    from raypp import benchmark as bench

    seq = []

    def record(what: str, fn) -> dict:
        # A peer's processes wind down for a minute after it reports (vLLM's engine core); the
        # next run waits for the 1-min load to settle, at most SETTLE_S, so it does not share
        # the cores with them.
        settle_until = time.time() + SETTLE_S
        while os.getloadavg()[0] > 1.0 and time.time() < settle_until:
            time.sleep(5)
        start = time.time()
        la = os.getloadavg()[0]
        log(f"[sandwich] {what} (loadavg {la:.1f})")
        res = fn()
        seq.append({"what": what, "start": start, "end": time.time(), "loadavg_1min_at_start": la,
                    **{k: res.get(k) for k in ("bs1_decode_ms_per_token", "bs1_decode_ms_per_token_reps",
                                               "bs32_output_tok_s", "bs32_output_tok_s_reps", "first_ids_bs1",
                                               "command")}})
        log(f"[sandwich]   {what}: batch-1 {res['bs1_decode_ms_per_token']:.2f} ms/token, "
            f"batch-32 {res['bs32_output_tok_s']:.1f} tok/s")
        return res

    before, before_layout = None, None
    rounds = {}
    for i, step in enumerate(sandwich * args.rounds):
        layout = SANDWICH_LAYOUT[step]
        if before_layout != layout:
            before = record(f"raypp {layout}", lambda: raypp_run(False, layout))
        peer = record(step, lambda: run_peer(step, args.model, Path(args.peers_root), f"{step}_{i}"))
        after = record(f"raypp {layout}", lambda: raypp_run(False, layout))
        bs1 = (before["bs1_decode_ms_per_token"] + after["bs1_decode_ms_per_token"]) / 2
        bs32 = (before["bs32_output_tok_s"] + after["bs32_output_tok_s"]) / 2
        rounds.setdefault(step, []).append({
            "raypp_bs1_ms_mean_of_neighbours": bs1, "peer_bs1_ms": peer["bs1_decode_ms_per_token"],
            "bs1_ratio": bs1 / peer["bs1_decode_ms_per_token"],
            "raypp_bs32_tok_s_mean_of_neighbours": bs32, "peer_bs32_tok_s": peer["bs32_output_tok_s"],
            "bs32_ratio": bs32 / peer["bs32_output_tok_s"],
            "first_ids_match": peer.get("first_ids_bs1") == after["first_ids_bs1"], "raypp_layout": layout})
        before, before_layout = after, layout
    # Each peer's ratio is the median over its rounds (one round: that round's).
    pairs = {step: {**rs[len(rs) // 2], "bs1_ratio": statistics.median(r["bs1_ratio"] for r in rs),
                    "bs32_ratio": statistics.median(r["bs32_ratio"] for r in rs),
                    "first_ids_match": all(r["first_ids_match"] for r in rs), "rounds": rs}
             for step, rs in rounds.items()}
    targets = {}
    for key, (text, op, bound) in TARGETS.items():
        peer, metric = key.split("_vs_")[1], key.split("_vs_")[0]
        if peer in pairs:
            r = pairs[peer]["bs1_ratio" if metric == "bs1" else "bs32_ratio"]
            targets[key] = {"target": text, "ratio": r, "met": r <= bound if op == "<=" else r >= bound}
    for step, p in pairs.items():  # raypp PP=2 vs vLLM PP=2 throughput (pipeline_scaling's target, side by side)
        if step == "vllm_pp2":
            targets["bs32_pp2_vs_vllm_pp2"] = {"target": "raypp PP=2 tok/s >= 2x vLLM-cpu PP=2", "ratio": p["bs32_ratio"],
                                               "met": p["bs32_ratio"] >= 2.0}
    out = {"system": "raypp", "mode": "sandwich",
           "layouts": {"local": f"1 proc (in-process engine), {args.threads} torch threads",
                       "tp2": "TP=2 on 2 Ray actors, 1 CPU (torch thread) each",
                       "pp2": "PP=2 micro_batches=2 on 2 Ray actors, 1 CPU (torch thread) each"},
           "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
           "model": str(Path(args.model).resolve()), "host": bench.host_info(), "reps": args.reps,
           "wall_s": time.perf_counter() - t0, "sequence": seq, "pairs": pairs, "targets": targets}
    bench.write_json(out, args.out)
    for step, p in pairs.items():
        log(f"raypp / {step}: batch-1 ms/token ratio {p['bs1_ratio']:.3f}, batch-32 tok/s ratio {p['bs32_ratio']:.3f}, "
            f"first ids {'match' if p['first_ids_match'] else 'DIFFER'}")
    for v in targets.values():
        log(f"  target {v['target']:45s} ratio {v['ratio']:.3f}: {'met' if v['met'] else 'MISSED'}")
    log(f"wrote {args.out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="/tmp/peers/ckpt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=common.REPS)
    ap.add_argument("--batch", type=int, default=common.BATCH)
    ap.add_argument("--token-budget", type=int, default=None,
                    help="scheduler.max_tokens_per_micro_batch (default batch x PROMPT_LEN, as vLLM's "
                         "max_num_batched_tokens in vllm_bench.py)")
    ap.add_argument("--peers-root", default=os.environ.get("PEERS_ROOT", "/tmp/peers"))
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --sandwich: repeat the whole sandwich; each ratio is the median over rounds")
    ap.add_argument("--sandwich", default="",
                    help="comma-separated peers (hf, vllm_tp1, vllm_tp2, vllm_pp2) to run between raypp runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model_decode.json"))
    args = ap.parse_args()
    sandwich = [x for x in args.sandwich.split(",") if x]
    for x in sandwich:
        if x not in PEER_ARGS:
            ap.error(f"--sandwich: unknown peer {x!r}; choose from {', '.join(PEER_ARGS)}")
    if sandwich and args.out == ap.get_default("out"):
        args.out = str(ROOT / "benchmarks" / "results" / "model_decode_sandwich.json")

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from raypp import benchmark as bench

    bench.check_model_dir(args.model)
    torch.set_num_threads(args.threads)
    new, plen = common.NEW_TOKENS, common.PROMPT_LEN
    budget = args.token_budget or args.batch * plen
    config = bench.make_config(args.model, max_num_seqs=args.batch, max_model_len=512,
                               max_tokens_per_micro_batch=budget, cpus_per_worker=args.threads)
    prompts = common.make_prompts(args.model, n=args.batch)
    log = lambda m: print(m, flush=True)  # noqa: E731

    async def measure(engine, profile: bool) -> dict:
        t = time.perf_counter()
        log(f"[model_decode] batch 1: warm-up + {args.reps} x (t({new} new), t(1 new))")
        lat = await bench.decode_latency(engine, prompts[0], new, args.reps)
        log(f"[model_decode]   {lat['decode_ms_per_token']:.2f} ms/token (reps "
            f"{', '.join(f'{x:.2f}' for x in lat['decode_ms_per_token_reps'])}) "
            f"[{time.perf_counter() - t:.0f}s]")
        log(f"[model_decode] batch {args.batch}: warm-up + {args.reps} reps")
        thr = await bench.batch_throughput(engine, prompts, new, args.reps)
        log(f"[model_decode]   {thr['output_tok_s']:.1f} output tok/s (reps "
            f"{', '.join(f'{x:.1f}' for x in thr['output_tok_s_reps'])}) [{time.perf_counter() - t:.0f}s]")
        res = {
            "bs1_decode_ms_per_token": lat["decode_ms_per_token"],
            "bs1_decode_ms_per_token_reps": lat["decode_ms_per_token_reps"],
            "bs1_e2e_s": lat["e2e_s"],
            "bs1_prefill_plus_first_token_s": lat["prefill_plus_first_token_s"],
            "bs32_output_tok_s": thr["output_tok_s"],
            "bs32_output_tok_s_reps": thr["output_tok_s_reps"],
            "bs32_e2e_s": thr["e2e_s"],
            "first_ids_bs1": lat["ids"][: common.FIRST_IDS],
        }
        if profile:  # recorded only now: copying every step would slow the timed runs above
            rec = bench.StepRecorder(engine)
            log("[model_decode] profile: engine ITL at batch 1 and batch 32, then one decode step of each replayed")
            prof = {}
            for b in (1, args.batch):
                load = await bench.run_load(engine, prompts[:b], new, b, progress_every_s=0)
                lj = load.to_json()
                prof[f"bs{b}"] = {"engine_itl_ms": lj["itl_ms"], "engine_ttft_ms": lj["ttft_ms"],
                                  "worker_idle_ratio_steady": (lj["bubble_ratio_steady"] or [None])[0]}
            rec.close()
            worker = engine.executor.worker
            for b in (1, args.batch):
                steps = rec.decode_steps(b)
                step = steps[len(steps) // 2]  # a decode step from the middle of a run (context ~160)
                p = bench.profile_step(worker, step)
                print(f"\n[model_decode] batch {b} decode step (context {p['context_len']}): execute "
                      f"{p['execute_ms']:.2f} ms = metadata {p['metadata_build_ms']:.2f} + forward "
                      f"{p['forward_ms']:.2f} + sample {p['sample_ms']:.2f} (+ rest); engine ITL p50 "
                      f"{prof[f'bs{b}']['engine_itl_ms']['p50']:.2f} ms\n{p.pop('table')}", flush=True)
                prof[f"bs{b}"].update(p)
                itl = prof[f"bs{b}"]["engine_itl_ms"]["p50"]
                prof[f"bs{b}"]["engine_overhead_ms"] = itl - p["execute_ms"]
            res["profile"] = prof
        return res

    def raypp_run(profile: bool, layout: str = "local") -> dict:
        cfg = config if layout == "local" else bench.make_config(
            args.model, tp=2 if layout == "tp2" else 1, pp=2 if layout == "pp2" else 1,
            micro_batches=2 if layout == "pp2" else None, max_num_seqs=args.batch, max_model_len=512,
            max_tokens_per_micro_batch=budget, cpus_per_worker=1)
        with bench.open_engine(cfg, use_ray=layout != "local", log=log) as engine:
            return asyncio.run(measure(engine, profile))

    t0 = time.perf_counter()
    host_at_start = bench.host_info()
    if sandwich:
        return run_sandwich(args, sandwich, raypp_run, log, t0)
    res = raypp_run(not args.no_profile)
    peers_ckpt = Path(args.peers_root) / "ckpt"
    same = peers_ckpt.is_dir() and peers_ckpt.resolve() == Path(args.model).resolve()
    peers = load_peers(Path(args.peers_root)) if same else {}
    if not same:
        log(f"[model_decode] {args.model} is not the peers' checkpoint ({peers_ckpt}): no comparison")
    out = {
        "system": "raypp", "layout": f"1 proc (in-process engine, TP=1 PP=1), {args.threads} torch threads",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "model": str(Path(args.model).resolve()), "host": bench.host_info(),
        "loadavg_at_start": host_at_start["loadavg_1_5_15"], "dtype": "float32",
        "prompt_len": plen, "new_tokens": new, "batch": args.batch, "reps": args.reps,
        "scheduler": {"max_num_seqs": args.batch, "max_tokens_per_micro_batch": budget, "max_model_len": 512},
        "wall_s": time.perf_counter() - t0,
        **res,
        "peers_root": args.peers_root,
        "peers": {k: {kk: v.get(kk) for kk in ("layout", "bs1_decode_ms_per_token", "bs32_output_tok_s",
                                               "http_output_tok_s", "first_ids_bs1", "versions")}
                  for k, v in peers.items()},
        **compare(res, peers),
    }
    bench.write_json(out, args.out)
    print(f"\nraypp (in-process, {args.threads} threads): batch-1 {res['bs1_decode_ms_per_token']:.2f} ms/token, "
          f"batch-{args.batch} {res['bs32_output_tok_s']:.1f} tok/s")
    for k, v in out["ratios"].items():
        print(f"  {k:22s} {v:.3f}")
    for k, v in out["targets"].items():
        print(f"  target {v['target']:45s} ratio {v['ratio']:.3f}: {'met' if v['met'] else 'MISSED'}")
    for k, v in out["first_ids_vs_peers"].items():
        print(f"  first {common.FIRST_IDS} ids vs {k}: {'match' if v['match'] else 'DIFFER'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
