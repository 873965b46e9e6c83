"""`raypp bench compare`: the same workload on several TP x PP layouts of one checkpoint, one
after another on this machine, for the product's claim: tensor parallelism makes one request
faster, pipeline parallelism makes the system serve more.

    raypp bench compare --model DIR --layouts tp1,tp2,pp2,tp2pp2 --concurrency 16 \
        --input-len 64 --output-len 32 --out compare.json --plot compare.png

Per layout: batch-1 decode latency (ms/token, the peers' formula) and saturated throughput
(`--concurrency` requests in flight, output tok/s with prefill, and in the steady decode
window), TTFT/ITL p50 and the per-stage bubble.  Every layout runs on Ray actors (one
`--cpus-per-worker` each), so TP1 pays the same call path as the others.  Beside each row,
the planner's prediction for the same layout and load on `--planner-device`, with the
factors its hardware catalog ships.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import sys
from dataclasses import asdict, dataclass

from raypp.benchmark.engine import check_model_dir, env_defaults, make_config, make_prompts, open_engine
from raypp.benchmark.load import decode_latency, run_load
from raypp.benchmark.plots import _plt, _save
from raypp.benchmark.report import Column, fmt, host_info, table, write_json
from raypp.errors import UserError

_LAYOUT = re.compile(r"(?:tp(\d+))?(?:pp(\d+))?")


@dataclass(frozen=True)
class LayoutName:
    name: str
    tp: int
    pp: int


def parse_layouts(text: str) -> list[LayoutName]:
    """"tp1,tp2,pp2,tp2pp2" -> layouts; a missing degree is 1."""
    out = []
    for name in (x.strip().lower() for x in text.split(",") if x.strip()):
        m = _LAYOUT.fullmatch(name)
        if not m or not (m.group(1) or m.group(2)):
            raise argparse.ArgumentTypeError(f"layout {name!r}: write tpN, ppN or tpNppN (e.g. tp2pp2)")
        tp, pp = int(m.group(1) or 1), int(m.group(2) or 1)
        if tp < 1 or pp < 1:
            raise argparse.ArgumentTypeError(f"layout {name!r}: degrees must be >= 1")
        out.append(LayoutName(name, tp, pp))
    if not out:
        raise argparse.ArgumentTypeError("give at least one layout")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face format)")
    p.add_argument("--layouts", type=parse_layouts, default=parse_layouts("tp1,tp2,pp2,tp2pp2"),
                   help="comma-separated tpN / ppN / tpNppN (default tp1,tp2,pp2,tp2pp2)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight for the throughput run")
    p.add_argument("--requests", type=int, default=None, help="requests in the throughput run (default 2 x conc.)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=32, help="new tokens per request (EOS ignored)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the batch-1 latency measurement")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (torch threads) per worker")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--planner-device", default="cpu-epyc-2core",
                   help="the planner's device for the predicted columns (a `raypp plan --gpu` name)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG here")


@dataclass(frozen=True)
class LayoutResult:
    layout: str
    tp: int
    pp: int
    micro_batches: int
    batch1_ms_per_token: float
    saturated_tok_s: float
    steady_decode_tok_s: float | None
    ttft_p50_ms: float | None
    itl_p50_ms: float | None
    bubble_ratio: list[float]
    predicted_batch1_ms_per_token: float | None
    predicted_saturated_tok_s: float | None

    @property
    def batch1_tok_s(self) -> float:
        return 1e3 / self.batch1_ms_per_token


def predict(model_dir, layout: LayoutName, device: str, concurrency: int, args) -> tuple[float | None, float | None]:
    """The planner's (batch-1 ms/token, output tok/s at `concurrency`) for this layout, on one
    node of `device`; None where the layout does not fit there."""
    from raypp.planner.hardware import DEVICES, LINKS
    from raypp.layout import Layout
    from raypp.planner.layout import Cluster, Workload
    from raypp.planner.models import from_hf_config
    from raypp.planner.strategy import Options, evaluate

    if device not in DEVICES:
        raise UserError(f"--planner-device {device}: not in the planner's catalog ({', '.join(DEVICES)})")
    dev = DEVICES[device]
    spec = from_hf_config(model_dir)
    cluster = Cluster(dev, layout.tp * layout.pp, 1, LINKS[dev.intra_link], LINKS[dev.network])
    dtype = "fp32" if args.device == "cpu" else "bf16"   # what make_config's dtype "auto" loads

    def one(c: int):
        wl = Workload(dtype=dtype, kv_dtype=dtype, concurrency=c, input_len=args.input_len,
                      output_len=args.output_len)
        return evaluate(spec, Layout(layout.tp, layout.pp, ()), cluster, wl,
                        Options(tp=layout.tp, pp=layout.pp)).prediction

    batch1, loaded = one(1), one(concurrency)
    return (batch1.itl * 1e3 if batch1 else None), (loaded.throughput if loaded else None)


async def _measure(engine, layout: LayoutName, config, prompts, args, predicted) -> LayoutResult:
    lat = await decode_latency(engine, prompts[0], args.output_len, args.reps)
    load = (await run_load(engine, prompts, args.output_len, args.concurrency, len(prompts),
                           label=f" {layout.name}")).to_json()
    return LayoutResult(layout.name, layout.tp, layout.pp, config.micro_batches, lat["decode_ms_per_token"],
                        load["output_tok_s"], load["steady_decode_tok_s"], load["ttft_ms"].get("p50"),
                        load["itl_ms"].get("p50"), load["bubble_ratio_steady"] or load["bubble_ratio_run"],
                        *predicted)


COLUMNS = [
    Column("layout", lambda r: r.layout),
    Column("workers", lambda r: str(r.tp * r.pp)),
    Column("batch-1 ms/tok", lambda r: fmt(r.batch1_ms_per_token, ".2f")),
    Column("(planner)", lambda r: fmt(r.predicted_batch1_ms_per_token, ".2f")),
    Column("saturated tok/s", lambda r: fmt(r.saturated_tok_s)),
    Column("(planner)", lambda r: fmt(r.predicted_saturated_tok_s)),
    Column("steady tok/s", lambda r: fmt(r.steady_decode_tok_s)),
    Column("TTFT p50", lambda r: fmt(r.ttft_p50_ms)),
    Column("ITL p50", lambda r: fmt(r.itl_p50_ms)),
    Column("bubble/stage", lambda r: " ".join(f"{b:.0%}" for b in r.bubble_ratio)),
]


def plot_compare(results: list[LayoutResult], title: str, path) -> str | None:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r.layout for r in results]
    for a, measured, predicted, ylabel, title in (
            (ax[0], "batch1_ms_per_token", "predicted_batch1_ms_per_token", "ms / token (lower is better)",
             "batch-1 decode latency"),
            (ax[1], "saturated_tok_s", "predicted_saturated_tok_s", "output tokens / s (higher is better)",
             "saturated throughput")):
        a.bar(names, [getattr(r, measured) for r in results], color="tab:blue", label="measured")
        a.scatter(names, [getattr(r, predicted) or float("nan") for r in results], color="tab:orange",
                  marker="D", zorder=3, label="planner")
        a.set(ylabel=ylabel, title=title)
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, plt, path)


def run(args) -> int:
    env_defaults()
    model = check_model_dir(args.model)
    for name in ("concurrency", "input_len", "output_len", "reps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from raypp.model.config import ModelConfig
    vocab = ModelConfig.from_dir(model).vocab_size
    prompts = make_prompts(vocab, args.requests or 2 * args.concurrency, args.input_len)
    budget = max(512, args.concurrency * args.input_len)
    results = []
    for layout in args.layouts:
        predicted = predict(model, layout, args.planner_device, args.concurrency, args)
        config = make_config(model, tp=layout.tp, pp=layout.pp, device=args.device,
                             cpus_per_worker=args.cpus_per_worker, max_num_seqs=args.concurrency,
                             max_model_len=args.input_len + args.output_len, max_tokens_per_micro_batch=budget)
        with open_engine(config, use_ray=True, ray_num_cpus=max(1, round(layout.tp * layout.pp
                                                                        * args.cpus_per_worker))) as engine:
            results.append(asyncio.run(_measure(engine, layout, config, prompts, args, predicted)))
    title = (f"raypp bench compare: {model.name}, {args.input_len} in / {args.output_len} out, "
             f"concurrency {args.concurrency}, {args.cpus_per_worker:g} CPU per worker on {args.device}")
    print(title)
    print(table(results, COLUMNS))
    result = {"title": title, "argv": sys.argv, "model": str(model), "host": host_info(),
              "layouts": [{**asdict(r), "batch1_tok_s": r.batch1_tok_s} for r in results]}
    if args.plot:
        png = plot_compare(results, title, args.plot)
        print(f"wrote {png}" if png else "no plot: matplotlib is not installed")
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}")
    return 0
