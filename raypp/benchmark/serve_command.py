"""`raypp bench serve`: measure a running deployment over HTTP, as its users see it.

    raypp bench serve --url http://127.0.0.1:8000 --concurrency 1,2,4,8,16,32 --requests 64 \
        --input-len 128 --output-len 64 [--rate QPS] --out bench.json --plot bench.png

For each concurrency: req/s, output tok/s, TTFT, ITL and end-to-end latency percentiles,
errors by kind, and the server's per-stage busy / bubble time over the run (from /stats).
A list of concurrencies is a sweep: the plot draws throughput against latency.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from urllib.parse import urlsplit

from raypp.benchmark.http_load import LevelResult, Workload, run_level
from raypp.benchmark.plots import plot_serve
from raypp.benchmark.progress import Progress
from raypp.benchmark.report import Column, fmt, table, write_json
from raypp.client import APIConnectionError, APIStatusError, AsyncClient
from raypp.errors import UserError


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,... got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrencies must be >= 1, got {text!r}")
    return levels


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (its /v1 is added)")
    p.add_argument("--model", default=None, help="served model name (default: the one the server serves)")
    p.add_argument("--api-key", default=None, help="Bearer key (default: RAYPP_API_KEY)")
    p.add_argument("--concurrency", type=_levels, default=[8], help="requests in flight; N,N,... sweeps")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request (EOS ignored)")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: closed loop)")
    p.add_argument("--seed", type=int, default=0, help="prompt and arrival seed")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may wait for a byte")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG here")


def _check(args) -> None:
    for name in ("requests", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.rate is not None and args.rate <= 0:
        raise UserError(f"--rate must be > 0, got {args.rate}")
    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserError(f"--url {args.url}: give an http(s) URL such as http://127.0.0.1:8000")


COLUMNS = [
    Column("conc", lambda r: str(r.concurrency)),
    Column("req/s", lambda r: fmt(r.req_s, ".2f")),
    Column("out tok/s", lambda r: fmt(r.output_tok_s)),
    *(Column(f"TTFT p{q}", lambda r, q=q: fmt(getattr(r.ttft_ms, f"p{q}"))) for q in (50, 90, 99)),
    *(Column(f"ITL p{q}", lambda r, q=q: fmt(getattr(r.itl_ms, f"p{q}"))) for q in (50, 90, 99)),
    *(Column(f"e2e p{q}", lambda r, q=q: fmt(getattr(r.e2e_ms, f"p{q}"))) for q in (50, 99)),
    Column("ok/sent", lambda r: f"{r.succeeded}/{r.requests}"),
    Column("errors", lambda r: ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "-"),
    Column("bubble/stage", lambda r: " ".join(f"{s['bubble_ratio']:.0%}" for s in r.stages) if r.stages else "-"),
]


async def _measure(args) -> tuple[str, list[LevelResult]]:
    work = Workload(args.requests, args.input_len, args.output_len, args.rate, args.seed)
    async with AsyncClient(args.url, api_key=args.api_key, timeout=args.timeout, max_retries=0,
                           model=args.model, max_connections=max(args.concurrency)) as client:
        try:
            model = args.model or (await client.models())[0].id
        except APIConnectionError as e:
            raise UserError(f"{e}; is a raypp server (`serve run ...`) up at {args.url}?") from None
        except APIStatusError as e:
            raise UserError(f"{args.url}: {e}") from None
        runs = []
        for c in args.concurrency:
            bar = Progress(args.requests, f"[bench] c={c}")
            runs.append(await run_level(client, work, c, bar.update))
        return model, runs


def run(args) -> int:
    _check(args)
    model, runs = asyncio.run(_measure(args))
    title = (f"raypp bench serve: {model} at {args.url}; {args.requests} requests per level, "
             f"{args.input_len} in / {args.output_len} out" + (f", {args.rate:g} req/s" if args.rate else ""))
    print(title)
    print(table(runs, COLUMNS))
    print("latencies in ms; bubble: the server's per-stage bubble / (busy + bubble) over each run")
    result = {"title": title, "argv": sys.argv, "url": args.url, "model": model,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": [r.to_json() for r in runs]}
    if args.plot:
        png = plot_serve(runs, title, args.plot)
        print(f"wrote {png}" if png else "no plot: matplotlib is not installed")
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}")
    failed = sum(r.failed for r in runs)
    return 1 if failed == sum(r.requests for r in runs) else 0
