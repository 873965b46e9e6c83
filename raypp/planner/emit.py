"""`--emit`: the chosen layout as a Ray Serve config file that `serve run` accepts.

The app's `args` are a `DeploymentConfig` (validated here before writing, so a
file the planner writes always loads).  No `ray_actor_options`: raypp places
its own workers with placement groups, so the ingress replica needs no GPU.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from raypp.config import DeploymentConfig
from raypp.errors import UserError
from raypp.planner.layout import Workload
from raypp.planner.strategy import Candidate

_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "auto"}
GB = 1e9


def deployment_args(c: Candidate, wl: Workload, model_path: str, device_kind: str,
                    cpus_per_worker: float = 1.0, make_preset: str | None = None) -> dict:
    p = c.prediction
    # KV room for twice the planned sequences (preemption headroom), never more than is free.
    kv_gb = min(max(c.memory.kv_cache, 0.0), 2 * max(1, p.concurrency) * c.memory.kv_per_seq) / GB
    args = {
        "model": {"path": model_path, "dtype": _DTYPE[wl.dtype], "max_model_len": wl.context},
        "parallel": {"tp": c.layout.tp, "pp": c.layout.pp, "stage_layers": list(c.layout.stage_layers),
                     "device": "cpu" if device_kind == "cpu" else "cuda"},
        "scheduler": {"micro_batches": p.micro_batches, "max_num_seqs": max(1, p.concurrency),
                      "kv_memory_gb": max(0.1, math.ceil(kv_gb * 10) / 10)},
    }
    if device_kind == "cpu":
        args["parallel"]["cpus_per_worker"] = cpus_per_worker
    if make_preset:
        args["model"]["make_tiny_if_missing"] = make_preset
    DeploymentConfig.model_validate(args)
    return args


def render(c: Candidate, wl: Workload, model_name: str, model_path: str | None, device_kind: str,
           command: str, cpus_per_worker: float = 1.0) -> str:
    # raypp's own presets can be made on first start; any other model needs a real checkpoint.
    own = model_name in ("tiny", "small") and model_path is None
    path = model_path or (f"checkpoints/{model_name}" if own else f"/models/{model_name}")
    args = deployment_args(c, wl, path, device_kind, cpus_per_worker, model_name if own else None)
    app = {"applications": [{"name": "raypp", "import_path": "raypp.serve:build_app", "route_prefix": "/",
                             "args": args}]}
    p = c.prediction
    head = [f"# Written by: {command}",
            f"# Layout {c.layout.name}: predicted TTFT {p.ttft * 1e3:.1f} ms, ITL {p.itl * 1e3:.2f} ms, "
            f"{c.throughput:,.0f} output tok/s, {c.memory.in_use(p.concurrency) / GB:.1f} GB per GPU in use (docs/planner.md).",
            "# Run with: serve run <this file>"]
    if model_path is None and not own:
        head.append(f"# model.path is a placeholder: point it at your {model_name} checkpoint "
                    f"(a local Hugging Face directory), or re-plan with --model-path.")
    if wl.dtype == "fp8":
        head.append("# dtype 'auto' takes the checkpoint's: the plan assumed FP8 linear weights.")
    if c.layout.replicas > 1:
        head.append(f"# The plan counts {c.layout.replicas} data-parallel replicas of this app on the cluster; "
                    f"the numbers above are for all of them.")
    return "\n".join(head) + "\n" + yaml.safe_dump(app, sort_keys=False)


def write(path: str, text: str) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None
