"""`raypp plan`: choose TP x PP for a model, a cluster and a priority.

    raypp plan --model llama-3-70b --gpu h100-sxm --gpus-per-node 8 --nodes 2 \\
        --dtype bf16 --priority throughput --concurrency 64 --input-len 1000 --output-len 200 \\
        [--emit deployments/my.yaml] [--json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from raypp.errors import UserError
from raypp.planner import emit, report
from raypp.planner.hardware import get_device, get_link, load_yaml
from raypp.planner.layout import Cluster, Workload
from raypp.planner.models import get_model
from raypp.planner.strategy import PRIORITIES, Options, plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="preset name (llama-3-70b, llama-2-7b, llama-3.1-405b, mistral-7b, qwen2-72b, tiny, small, "
                        "...) or a path to a Hugging Face config.json / checkpoint directory")
    p.add_argument("--model-path", help="checkpoint directory written into --emit (default: a placeholder)")
    p.add_argument("--gpu", required=True, help="h100-sxm, h100-pcie, h200, a100-sxm-80gb, a100-sxm-40gb, "
                   "a100-pcie-80gb, l4, l40s, cpu, or one from --hardware")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp8", "fp32"],
                   help="weights of the linear layers (fp8: embeddings and lm_head stay 16-bit)")
    p.add_argument("--kv-dtype", choices=["bf16", "fp16", "fp8", "fp32"], help="KV cache (default: --dtype)")
    p.add_argument("--priority", default="balanced", choices=PRIORITIES)
    p.add_argument("--concurrency", type=int, default=1, help="sequences in flight over the whole cluster")
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=200)
    p.add_argument("--max-itl-ms", type=float, help="SLO on inter-token latency")
    p.add_argument("--max-ttft-ms", type=float, help="SLO on time to first token")
    p.add_argument("--micro-batches", type=int, help="micro-batches in flight (default: pp, as raypp runs)")
    p.add_argument("--max-bubble", type=float, default=10.0, help="flag bubbles above this %% (default 10)")
    p.add_argument("--tp", type=int, help="evaluate only this TP degree (may cross nodes: then it is flagged)")
    p.add_argument("--pp", type=int, help="evaluate only this PP degree")
    p.add_argument("--stage-layers", help="comma-separated layers per stage to evaluate instead of the balanced split")
    p.add_argument("--network", help="inter-node link (ib-ndr, ib-hdr, eth-400g, eth-100g; default: the GPU's)")
    p.add_argument("--intra-link", help="link inside a node (nvlink3, nvlink4, pcie4, pcie5; default: the GPU's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--hardware", help="YAML file adding GPUs and links (see docs/planner.md)")
    p.add_argument("--emit", metavar="FILE.yaml", help="write the chosen layout as a `serve run` config")
    p.add_argument("--json", action="store_true", help="print every layout as JSON instead of the table")


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise UserError(f"--{name} must be > 0, got {value}")


def build(args) -> tuple:
    for name in ("gpus_per_node", "nodes", "concurrency", "input_len", "output_len"):
        _positive(name.replace("_", "-"), getattr(args, name))
    for name in ("micro_batches", "tp", "pp", "max_itl_ms", "max_ttft_ms"):
        _positive(name.replace("_", "-"), getattr(args, name), allow_none=True)
    if not 0 < args.gpu_memory_utilization <= 1:
        raise UserError("--gpu-memory-utilization must be in (0, 1]")
    devices, links = load_yaml(args.hardware) if args.hardware else ({}, {})
    dev = get_device(args.gpu, devices)
    cluster = Cluster(dev, args.gpus_per_node, args.nodes, get_link(args.intra_link or dev.intra_link, links),
                      get_link(args.network or dev.network, links))
    model = get_model(args.model)
    wl = Workload(dtype=args.dtype, kv_dtype=args.kv_dtype or args.dtype, concurrency=args.concurrency,
                  input_len=args.input_len, output_len=args.output_len, micro_batches=args.micro_batches,
                  gpu_memory_utilization=args.gpu_memory_utilization)
    if wl.context > model.max_position:
        raise UserError(f"--input-len + --output-len = {wl.context} exceeds {model.name}'s context of "
                        f"{model.max_position} tokens")
    stage_layers = None
    if args.stage_layers:
        try:
            stage_layers = tuple(int(x) for x in args.stage_layers.split(","))
        except ValueError:
            raise UserError(f"--stage-layers must be comma-separated integers, got {args.stage_layers!r}") from None
        if args.pp is None:
            args.pp = len(stage_layers)
    opts = Options(priority=args.priority, max_itl_ms=args.max_itl_ms, max_ttft_ms=args.max_ttft_ms,
                   max_bubble=args.max_bubble / 100, tp=args.tp, pp=args.pp, stage_layers=stage_layers)
    return model, cluster, wl, opts


def run(args) -> int:
    model, cluster, wl, opts = build(args)
    cands = plan(model, cluster, wl, opts)
    if args.json:
        print(json.dumps(report.to_json(cands), indent=2))
    else:
        print(f"raypp plan: {model.name} ({model.params / 1e9:.2f}B params, {wl.dtype}) on {cluster.nodes} x "
              f"{cluster.gpus_per_node} {cluster.device.name} ({cluster.intra.name} in a node, "
              f"{cluster.network.name} between nodes)")
        print(report.table(cands))
        print()
        print("\n".join(report.explain(cands, wl, opts, cluster.device.name)))
    if args.emit:
        if not cands or not cands[0].fits:
            raise UserError("nothing to emit: no layout fits")
        best = cands[0]
        cpus = min(1.0, round(cluster.gpus / (best.layout.world_size * best.layout.replicas), 2))
        cmd = (f"raypp plan --model {shlex.quote(args.model)} --gpu {args.gpu} --gpus-per-node "
               f"{args.gpus_per_node} --nodes {args.nodes} --dtype {args.dtype} --priority {args.priority} "
               f"--concurrency {args.concurrency} --input-len {args.input_len} --output-len {args.output_len}")
        text = emit.render(best, wl, model.name, args.model_path, cluster.device.kind, cmd, cpus_per_worker=cpus)
        emit.write(args.emit, text)
        print(f"wrote {args.emit}", file=sys.stderr)
    return 0
