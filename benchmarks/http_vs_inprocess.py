"""What the HTTP path costs: throughput at saturation through `serve run` vs the engine in-process.

Same layout (a deployment file, default deployments/tiny_cpu.yaml: TP=2 x PP=2 on CPU),
same checkpoint, same Ray cluster, same requests (token-id prompts, fixed output lengths
via ignore_eos), and more requests in flight than the engine runs at once, so it is
always full:

- in-process: this process drives `Engine.from_config(args)` directly (the replica's job
  without Serve, FastAPI, HTTP or a client);
- HTTP: `serve run <file>` against the same cluster, the same requests as OpenAI
  /v1/completions calls from an asyncio client in this process, answered as one JSON
  body, then streamed token by token (SSE).

The three are measured in interleaved rounds (order rotated) so that load from anything
else on the machine falls on all of them alike; the reported ratio is the median over
rounds of HTTP / in-process output tokens/s (target >= 0.9).  Writes JSON and a PNG under
benchmarks/results/.  On a small CPU box every process competes with the workers for
cores, so the gap there is an upper bound of what Serve + HTTP cost next to GPU workers.

    .venv/bin/python benchmarks/http_vs_inprocess.py [--rounds 6] [--requests 128] [--concurrency 64]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from raypp.benchmark import make_prompts  # noqa: E402
from raypp.client import AsyncClient  # noqa: E402
from raypp.runtime.stats import EngineStats  # noqa: E402
from tests.serve_helpers import ServeRun, app_args, load_deployment  # noqa: E402

MODES = ("in_process", "http_json", "http_stream")


def engine_delta(before: EngineStats, after: EngineStats) -> dict:
    """What the engine did during a timed run: steps of stage 0, tokens per step."""
    steps = after.stages[0].steps - before.stages[0].steps
    tokens = after.tokens_generated - before.tokens_generated
    return {"steps": steps, "tokens": tokens, "tokens_per_step": tokens / max(1, steps)}


async def run_load(submit, prompts, concurrency: int) -> dict:
    """Every prompt through `submit` with at most `concurrency` in flight."""
    sem = asyncio.Semaphore(concurrency)
    latencies, tokens = [], 0

    async def one(p):
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            n = await submit(p)  # (not `tokens += await ...`: that reads `tokens` before awaiting)
            tokens += n
            latencies.append(time.perf_counter() - t0)

    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*[one(p) for p in prompts])
    wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()
    return {"requests": len(prompts), "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "latency_p50_s": latencies[len(latencies) // 2],
            "latency_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            # CPU of this process: the engine driver (in-process) or the HTTP client.
            "this_process_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)}


class InProcess:
    def __init__(self, args_dict: dict, max_tokens: int):
        from raypp.model.sampling_params import SamplingParams
        from raypp.runtime.engine import Engine
        from raypp.serve import parse_args
        self.engine = Engine.from_config(parse_args(args_dict))
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def submit(self, p) -> int:
        n = 0
        async for out in self.engine.generate(p, self.params):
            n = len(out.token_ids)
        return n

    async def measure(self, prompts, warmup, concurrency):
        await run_load(self.submit, warmup, concurrency)
        before = self.engine.stats()
        result = await run_load(self.submit, prompts, concurrency)
        result["engine"] = engine_delta(before, self.engine.stats())
        return result


class OverHTTP:
    def __init__(self, base_url: str, model: str, max_tokens: int, stream: bool):
        self.base_url, self.model, self.max_tokens, self.stream = base_url, model, max_tokens, stream

    async def measure(self, prompts, warmup, concurrency):
        async with AsyncClient(self.base_url, model=self.model, max_retries=0,
                               max_connections=concurrency) as client:
            async def submit(p) -> int:
                fields = {"max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}
                if not self.stream:
                    return (await client.complete(p, **fields)).usage.completion_tokens
                usage = 0
                async for chunk in await client.complete(p, **fields, stream=True):
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
                return usage

            await run_load(submit, warmup, concurrency)
            before = await client.stats()
            result = await run_load(submit, prompts, concurrency)
            result["engine"] = engine_delta(before, await client.stats())
            return result


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"in_process": "in-process engine", "http_json": "HTTP, JSON", "http_stream": "HTTP, SSE stream"}
    med = {m: statistics.median(r[m]["tokens_per_s"] for r in result["rounds"]) for m in MODES}
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, m in enumerate(MODES):
        ax.bar(i, med[m], color=["#4c72b0", "#55a868", "#8fbc8f"][i], label=None)
        pts = [r[m]["tokens_per_s"] for r in result["rounds"]]
        ax.scatter([i] * len(pts), pts, color="black", s=12, zorder=3)
        ratio = "" if m == "in_process" else f"\n{result['ratio'][m]:.2f}x (median of rounds)"
        ax.annotate(f"{med[m]:.0f} tok/s{ratio}", (i, max(pts)), ha="center", va="bottom", fontsize=9,
                    xytext=(0, 3), textcoords="offset points")
    ax.axhline(0.9 * med["in_process"], color="gray", ls="--", lw=1, label="0.9 x in-process (target)")
    ax.set_xticks(range(len(MODES)), [labels[m] for m in MODES])
    ax.set_ylabel("output tokens / s (dots: rounds)")
    ax.set_ylim(0, max(max(r[m]["tokens_per_s"] for r in result["rounds"]) for m in MODES) * 1.3)
    ax.set_title(f"{result['deployment']} ({result['layout']}), {result['machine']['cpus']} CPUs: "
                 f"{result['requests']} requests x {result['max_tokens']} tokens, {result['concurrency']} in flight",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deployment", default="tiny_cpu.yaml", help="file under deployments/ (default tiny_cpu.yaml)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight (> max_num_seqs saturates)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "http_vs_inprocess"),
                    help="output path without extension (.json and .png are written)")
    a = ap.parse_args(argv)

    import ray

    from raypp.model.config import ModelConfig
    from raypp.runtime.checkpoint_dir import ensure_checkpoint
    from raypp.serve import parse_args

    config = load_deployment(a.deployment)
    args = app_args(config)
    ckpt = Path(args["model"]["path"])
    if not ckpt.is_absolute():
        ckpt = REPO / ckpt  # a relative path in the file: under the repo, where `make serve` makes it
    args["model"]["path"] = str(ckpt)
    ensure_checkpoint(parse_args(args))
    vocab = ModelConfig.from_dir(ckpt).vocab_size
    prompts = make_prompts(vocab, a.requests, a.prompt_len, seed=0)
    warmup = make_prompts(vocab, 8, a.prompt_len, seed=1)
    model = args["model"].get("served_name") or ckpt.name

    # One cluster for both paths; logical CPUs sized so that both pipelines fit at once.
    ray.init(address="local", num_cpus=max(4, os.cpu_count()), include_dashboard=False, log_to_driver=False)
    rounds = []
    try:
        in_proc = InProcess(args, a.max_tokens)
        with ServeRun(config, Path(tempfile.mkdtemp(prefix="raypp-bench-")),
                      address=ray.get_runtime_context().gcs_address) as server:
            runners = {"in_process": in_proc,
                       "http_json": OverHTTP(server.base_url, model, a.max_tokens, stream=False),
                       "http_stream": OverHTTP(server.base_url, model, a.max_tokens, stream=True)}
            for r in range(a.rounds):
                order = MODES[r % 3:] + MODES[:r % 3]
                res = {}
                for m in order:
                    res[m] = asyncio.run(runners[m].measure(prompts, warmup, a.concurrency))
                    res[m]["load_avg_1m_after"] = os.getloadavg()[0]  # other work on the machine
                    print(f"round {r + 1}: {m:<11} {res[m]['tokens_per_s']:7.1f} tok/s  "
                          f"({res[m]['engine']['tokens_per_step']:.1f} tokens/step)", flush=True)
                rounds.append(res)
        in_proc.engine.shutdown()
    finally:
        ray.shutdown()

    per_round = {m: [x[m]["tokens_per_s"] / x["in_process"]["tokens_per_s"] for x in rounds] for m in MODES[1:]}
    ratio = {m: statistics.median(v) for m, v in per_round.items()}
    par = args["parallel"]
    result = {
        "benchmark": "http_vs_inprocess", "deployment": f"deployments/{a.deployment}",
        "layout": f"TP{par.get('tp', 1)}xPP{par.get('pp', 1)} {par.get('device', 'cuda')}",
        "model": ckpt.name, "requests": a.requests, "concurrency": a.concurrency, "prompt_len": a.prompt_len,
        "max_tokens": a.max_tokens, "scheduler": args.get("scheduler", {}),
        "ratio": ratio, "ratio_per_round": per_round, "target_ratio": 0.9, "rounds": rounds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"median ratio HTTP/in-process: JSON {ratio['http_json']:.3f}, SSE stream {ratio['http_stream']:.3f} "
          f"(target >= 0.9); wrote {out}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
