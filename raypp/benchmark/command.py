"""`raypp bench <what>`: each kind of measurement in a module of its own, imported when chosen."""
from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = {
    "serve": ("raypp.benchmark.serve_command", "load a running server over HTTP: throughput, TTFT, ITL, bubble"),
    "engine": ("raypp.benchmark.engine_command", "one layout in-process: batch-1 latency, throughput, bubble"),
    "compare": ("raypp.benchmark.compare", "several TP x PP layouts of one checkpoint, one after another"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sp)


def run(args) -> int:
    return importlib.import_module(SUBCOMMANDS[args.bench_command][0]).run(args)
