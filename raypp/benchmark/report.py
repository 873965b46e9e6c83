"""Results on disk and on the terminal: the JSON file, the host it was measured on, tables."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


def write_json(obj: dict, path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2) + "\n")


def host_info() -> dict:
    import platform

    import torch
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu,
            "ncpu": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


@dataclass(frozen=True)
class Column:
    title: str
    cell: Callable[[object], str]


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: Sequence[object], columns: Sequence[Column]) -> str:
    """Plain-text table: titles over right-aligned cells, one line per row."""
    cells = [[c.title for c in columns]] + [[c.cell(r) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in cells)
