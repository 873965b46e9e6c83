"""The figure of benchmarks/pipeline_scaling.py: saturation throughput, the PP=2 bubble by
micro-batches, batch-1 latency, and the planner's predictions against the measurements."""
from __future__ import annotations

from pathlib import Path

from pipeline_scaling import CONCURRENCY, INPUT_LEN, LAYOUTS, OUTPUT_LEN

from raypp import benchmark as bench


def plot(results: dict, path: Path) -> str | None:
    plt = bench._plt()
    if plt is None:
        return None
    cks = results["checkpoints"]
    fig, ax = plt.subplots(2, 2, figsize=(14, 9))
    names = [n for n in LAYOUTS if any(n in ck["layouts"] for ck in cks.values())]
    width = 0.8 / max(1, len(cks))
    for i, (tag, ck) in enumerate(cks.items()):
        xs = [k + i * width for k in range(len(names))]
        ys = [ck["layouts"].get(n, {}).get("saturation", {}).get("output_tok_s", 0) for n in names]
        ys2 = [ck["layouts"].get(n, {}).get("saturation", {}).get("steady_decode_tok_s", 0) for n in names]
        ax[0, 0].bar(xs, ys, width, label=f"{tag}: with prefill")
        ax[0, 0].scatter(xs, ys2, marker="_", s=300, color="k", zorder=3, label=f"{tag}: steady decode" if i == 0 else None)
    ax[0, 0].set_xticks([k + width * (len(cks) - 1) / 2 for k in range(len(names))], names, rotation=20)
    ax[0, 0].set(ylabel="output tok/s", title=f"saturation: {CONCURRENCY} requests, {INPUT_LEN} in / {OUTPUT_LEN} out")
    ax[0, 0].legend(fontsize=8)
    for tag, ck in cks.items():
        mbs = [(m, ck["layouts"][f"PP2-mb{m}"]["saturation"]["bubble_ratio_steady"]) for m in (1, 2, 4)
               if f"PP2-mb{m}" in ck["layouts"]]
        for s in range(2):
            ax[0, 1].plot([m for m, _ in mbs], [b[s] * 100 for _, b in mbs], marker="o", label=f"{tag} stage {s}")
    ax[0, 1].axhline(10, color="r", ls="--", lw=1, label="target 10%")
    ax[0, 1].set(xlabel="micro_batches", ylabel="bubble % (steady decode)", xticks=[1, 2, 4],
                 title="PP=2 bubble ratio under saturation")
    ax[0, 1].legend(fontsize=8)
    lat_names = [n for n in ("PP1", "PP1-local", "TP2", "PP2-mb2")]
    for i, (tag, ck) in enumerate(cks.items()):
        xs = [k + i * width for k in range(len(lat_names))]
        ys = [ck["layouts"].get(n, {}).get("batch1", {}).get("decode_ms_per_token", 0) for n in lat_names]
        ax[1, 0].bar(xs, ys, width, label=tag)
    ax[1, 0].set_xticks([k + width * (len(cks) - 1) / 2 for k in range(len(lat_names))], lat_names)
    ax[1, 0].set(ylabel="ms / token", title="batch-1 decode latency (one core per worker)")
    ax[1, 0].legend(fontsize=8)
    small = cks.get("small", {})
    labels, pred, meas = [], [], []
    for name, loads in small.get("planner", {}).items():
        for c in ("c1", "c8"):
            p, m = loads.get(c), small["layouts"][name].get("planner_loads", {}).get(c)
            if p and m:
                for metric, pk, mk in (("ITL", "itl_ms", "itl_ms_p50"), ("tok/s", "throughput_tok_s", "output_tok_s")):
                    labels.append(f"{name} {c}\n{metric}")
                    pred.append(p[pk])
                    meas.append(m[mk])
    if labels:
        ratios = [m / p for m, p in zip(meas, pred)]
        ax[1, 1].bar(range(len(labels)), ratios, color=["tab:blue" if "ITL" in lb else "tab:orange" for lb in labels])
        ax[1, 1].axhline(1, color="k", lw=1)
        ax[1, 1].set_xticks(range(len(labels)), labels, fontsize=7)
        ax[1, 1].set(ylabel="measured / predicted", title="small: planner prediction vs measurement (128 in / 128 out)")
    fig.suptitle("raypp on Ray, one CPU core per worker")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
