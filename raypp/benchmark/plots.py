"""PNG figures of benchmark results (matplotlib, optional: each function returns None without it)."""
from __future__ import annotations

import os
from pathlib import Path


def _plt():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, plt, path) -> str:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _cdf(ax, series: dict[str, list[float]], title: str) -> None:
    for name, xs in series.items():
        xs = sorted(xs)
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
    ax.set(xscale="log", xlabel="ms", ylabel="fraction of requests/tokens", title=title)
    ax.legend()


def _stage_bars(ax, stages: list[dict], title: str) -> None:
    idx = [s["stage"] for s in stages]
    busy = [s["busy_s"] for s in stages]
    ax.bar(idx, busy, label="busy (compute + comm)")
    ax.bar(idx, [s["bubble_s"] for s in stages], bottom=busy, label="bubble (idle + waiting)")
    for i, s in zip(idx, stages):
        ax.text(i, s["busy_s"] + s["bubble_s"], f"{s['bubble_ratio']:.1%}", ha="center", va="bottom")
    ax.set(xticks=idx, xlabel="pipeline stage", ylabel="s", title=title)
    ax.legend(loc="lower right")


def plot_bench(result: dict, load, path: str | os.PathLike) -> str | None:
    """An in-process run (`LoadResult`): cumulative output tokens over time (steady window
    shaded), TTFT and ITL distributions, per-stage busy vs bubble time."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    tl = load.timeline()
    ax[0].plot(tl, range(1, len(tl) + 1), lw=1.5)
    if load.steady_window_s:
        ax[0].axvspan(*load.steady_window_s, color="tab:green", alpha=0.15, label="steady decode")
        ax[0].legend(loc="upper left")
    ax[0].set(xlabel="s since start", ylabel="output tokens (cumulative)",
              title=f"{load.output_tok_s:.1f} tok/s at concurrency {load.concurrency}")
    _cdf(ax[1], {"TTFT": [t.ttft_s * 1e3 for t in load.traces],
                 "ITL": [x * 1e3 for t in load.traces for x in t.itls_s]}, "TTFT and ITL (CDF)")
    _stage_bars(ax[2], load.stages_steady or load.stages_run,
                "stage time, " + ("steady decode window" if load.stages_steady else "whole run"))
    fig.suptitle(result.get("title", ""))
    return _save(fig, plt, path)


def plot_serve(runs: list, title: str, path: str | os.PathLike) -> str | None:
    """`raypp bench serve` (`LevelResult`s, one per concurrency): throughput against latency
    (the sweep's curve, labelled by concurrency), tokens over time, and the server's bubble
    ratio per stage against concurrency (bars of busy / bubble for a single level)."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    tput = [r.output_tok_s for r in runs]
    for name, key in (("ITL p50", lambda r: r.itl_ms.p50), ("TTFT p50", lambda r: r.ttft_ms.p50),
                      ("e2e p50", lambda r: r.e2e_ms.p50)):
        ax[0].plot(tput, [key(r) for r in runs], marker="o", label=name)
    for r in runs:
        ax[0].annotate(f"c={r.concurrency}", (r.output_tok_s, r.itl_ms.p50 or 0), textcoords="offset points",
                       xytext=(4, 4), fontsize=8)
    ax[0].set(xlabel="output tokens / s", ylabel="ms", yscale="log", title="throughput vs latency")
    ax[0].legend()
    for r in runs:
        ax[1].plot(r.timeline_s, range(1, len(r.timeline_s) + 1), lw=1.2, label=f"c={r.concurrency}")
    ax[1].set(xlabel="s since start", ylabel="streamed chunks (cumulative)", title="tokens over time")
    ax[1].legend(fontsize=8)
    measured = [r for r in runs if r.stages]
    if len(measured) == 1:
        _stage_bars(ax[2], measured[0].stages, "server stage time (run)")
    elif measured:
        concs = [r.concurrency for r in measured]
        for s in range(len(measured[0].stages)):
            ax[2].plot(concs, [r.stages[s]["bubble_ratio"] for r in measured], marker="o", label=f"stage {s}")
        ax[2].set(xscale="log", xlabel="concurrency", ylabel="bubble / (busy + bubble)", ylim=(0, 1),
                  title="server pipeline bubble")
        ax[2].set_xticks(concs, [str(c) for c in concs], minor=False)
        ax[2].minorticks_off()
        ax[2].legend()
    else:
        ax[2].set_axis_off()
        ax[2].text(0.5, 0.5, "no /stats from the server", ha="center", va="center")
    fig.suptitle(title)
    return _save(fig, plt, path)
