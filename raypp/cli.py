"""`raypp <command>`: each command lives in the module that owns its idea.

A command module exposes `add_arguments(parser)` and `run(args) -> int`; it is
imported only when chosen, so `raypp plan` never imports torch or Ray.
Errors a user can fix (`raypp.errors.UserError`) print one line, not a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from raypp.errors import UserError

COMMANDS = {
    "make-tiny": ("raypp.model.tiny", "write a deterministic Llama checkpoint (HF format) with a tokenizer"),
    "plan": ("raypp.planner.command", "choose TP x PP for a model, a cluster and a priority"),
    "bench": ("raypp.benchmark.command", "measure a server over HTTP, a layout in-process, or layouts side by side"),
    "calibrate": ("raypp.calibrate", "fit the planner's hardware factors to a live deployment; write --hardware"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="raypp")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args, _ = parser.parse_known_args(argv) if chosen is None else (parser.parse_args(argv), None)
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except UserError as e:
        print(f"raypp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
