"""The plan in words, as a table, and as JSON (one object per layout, chosen first)."""
from __future__ import annotations

import math

from raypp.planner.layout import Workload
from raypp.planner.strategy import Candidate, Options

GB = 1e9
_WHY = {"latency": "lowest inter-token latency", "throughput": "highest throughput",
        "balanced": "best product of throughput and 1/ITL"}


def as_dict(c: Candidate, chosen: bool) -> dict:
    m, p = c.memory, c.prediction
    d = {
        "layout": c.layout.name, "chosen": chosen, "tp": c.layout.tp, "pp": c.layout.pp,
        "replicas": c.layout.replicas, "gpus": c.layout.world_size * c.layout.replicas,
        "stage_layers": list(c.layout.stage_layers), "fits": c.fits,
        "memory_per_gpu_gb": {"capacity": round(m.capacity / GB, 2), "weights": round(m.weights / GB, 2),
                              "activations": round(m.activations / GB, 2), "overhead": round(m.overhead / GB, 2),
                              "kv_cache": round(max(m.kv_cache, 0.0) / GB, 2),
                              "in_use": round(m.in_use(p.concurrency if p else 0) / GB, 2)},
        "kv_cache_tokens": m.kv_tokens, "kv_cache_seqs": m.kv_seqs,
        "shortfall_gb": round(m.shortfall / GB, 2),
        "ttft_ms": None, "itl_ms": None, "throughput_tok_s": None, "bubble_fraction": None,
        "micro_batches": None, "meets_slo": c.meets_slo if c.fits else None,
        "warnings": [{"code": f.code, "message": f.message} for f in c.flags],
    }
    if p is not None:
        d.update(ttft_ms=round(p.ttft * 1e3, 2), itl_ms=round(p.itl * 1e3, 3),
                 throughput_tok_s=round(c.throughput, 1), bubble_fraction=round(p.bubble, 4),
                 micro_batches=p.micro_batches, concurrency_per_replica=p.concurrency)
    return d


def to_json(cands: list[Candidate]) -> list[dict]:
    return [as_dict(c, i == 0 and c.fits) for i, c in enumerate(cands)]


def table(cands: list[Candidate]) -> str:
    head = ("", "layout", "stages", "weights GB", "in use GB", "KV seqs", "TTFT ms", "ITL ms", "tok/s", "bubble", "warnings")
    rows = []
    for i, c in enumerate(cands):
        if not c.fits:
            continue
        p = c.prediction
        codes = ",".join(sorted({f.code for f in c.flags if f.code != "note"})) or "-"
        rows.append(("*" if i == 0 else ("!" if not c.meets_slo else ""), c.layout.name,
                     "/".join(map(str, c.layout.stage_layers)), f"{c.memory.weights / GB:.1f}",
                     f"{c.memory.in_use(p.concurrency) / GB:.1f}", str(c.memory.kv_seqs),
                     f"{p.ttft * 1e3:.1f}", f"{p.itl * 1e3:.2f}", f"{c.throughput:,.0f}", f"{p.bubble:.0%}", codes))
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    misfits = [c for c in cands if not c.fits]
    if misfits:
        lines.append("")
        lines.append("do not fit (short per GPU): " + ", ".join(
            f"{c.layout.name} {c.memory.shortfall / GB:.1f} GB" for c in misfits))
    return "\n".join(lines)


def explain(cands: list[Candidate], wl: Workload, opts: Options, gpu_name: str) -> list[str]:
    fitting = [c for c in cands if c.fits]
    if not fitting:
        least = cands[0] if cands else None
        tail = f" (closest: {least.layout.name}, short {least.memory.shortfall / GB:.1f} GB per GPU)" if least else ""
        return [f"No layout fits the model on this cluster{tail}: add GPUs or nodes, use --dtype fp8, "
                f"or shorten --input-len/--output-len."]
    best = fitting[0]
    p = best.prediction
    lines = [f"Chosen: {best.layout.name} (stages {list(best.layout.stage_layers)}) for priority "
             f"'{opts.priority}': {_WHY[opts.priority]} among {len(fitting)} fitting layouts at concurrency "
             f"{wl.concurrency}, input {wl.input_len}, output {wl.output_len}."]
    lines.append(f"  Predicted: TTFT {p.ttft * 1e3:.1f} ms, ITL {p.itl * 1e3:.2f} ms, {best.throughput:,.0f} "
                 f"output tok/s, bubble {p.bubble:.0%} with {p.micro_batches} micro-batch(es); "
                 f"per {gpu_name}: weights {best.memory.weights / GB:.1f} GB, "
                 f"{best.memory.in_use(p.concurrency) / GB:.1f} GB in use of {best.memory.capacity / GB:.1f} GB; "
                 f"KV cache room for {best.memory.kv_seqs} full contexts per replica.")
    step = p.decode_stages
    comp, ar, send = (sum(t.compute for t in step), sum(t.all_reduce for t in step), sum(t.send for t in step))
    calls = sum(t.call for t in step)
    # the runtime's terms (raypp's CPU profile, a calibrated file) only where they are not zero
    runtime = (f", runtime calls {calls * 1e3:.2f} ms" if calls else "") + (
        f", pipeline hops {p.hop_latency * 1e3:.2f} ms" if p.hop_latency else "")
    lines.append(f"  One decode pass over all stages: compute {comp * 1e3:.2f} ms, TP all-reduce "
                 f"{ar * 1e3:.2f} ms, PP sends {send * 1e3:.2f} ms{runtime}.")
    if len(fitting) > 1:
        r = fitting[1]
        rp = r.prediction
        lines.append(f"  Runner-up {r.layout.name}: {r.throughput:,.0f} tok/s "
                     f"({r.throughput / best.throughput - 1:+.0%}), ITL {rp.itl * 1e3:.2f} ms "
                     f"({rp.itl / p.itl - 1:+.0%}), TTFT {rp.ttft * 1e3:.1f} ms.")
    lines += tradeoff(fitting, wl)
    if not best.meets_slo:
        lines.append("  No layout meets the SLO (--max-itl-ms/--max-ttft-ms); shown is the best by priority.")
    for f in best.flags:
        lines.append(f"  warning [{f.code}]: {f.message}")
    misfits = len(cands) - len(fitting)
    if misfits:
        lines.append(f"  {misfits} layout(s) do not fit in memory (listed under the table).")
    return lines


def _ar_share(c: Candidate) -> float:
    st = c.prediction.decode_stages
    return sum(t.all_reduce for t in st) / sum(t.total for t in st)


def tradeoff(fitting: list[Candidate], wl: Workload) -> list[str]:
    """The latency pick against the throughput pick, in the terms raypp's rules are stated in:
    all-reduce share, prefill stalls, KV-cache capacity and data-parallel replicas."""
    fast = min(fitting, key=lambda c: (c.prediction.itl, -c.throughput))
    most = max(fitting, key=lambda c: (c.throughput, -c.prediction.itl))
    fp = fast.prediction
    head = f"  {fast.layout.name}: lowest latency ({fp.itl * 1e3:.2f} ms/token at concurrency {wl.concurrency})"
    if most is fast:
        return [head + ", and the highest throughput."]
    mp = most.prediction
    why = []
    asked = math.ceil(wl.concurrency / fast.layout.replicas)
    if fp.concurrency < asked:
        why.append(f"{fast.layout.name}'s KV cache holds {fp.concurrency} sequences per replica, not {asked}")
    if _ar_share(fast) > _ar_share(most) + 0.05:
        why.append(f"TP all-reduces take {_ar_share(fast):.0%} of {fast.layout.name}'s decode step and "
                   f"{_ar_share(most):.0%} of {most.layout.name}'s")
    if mp.stall < 0.8 * fp.stall:
        why.append(f"a prompt's prefill holds up decoding {mp.stall * 1e3:.1f} ms on {most.layout.name} against "
                   f"{fp.stall * 1e3:.1f} ms on {fast.layout.name}"
                   + (" (the pipeline overlaps it with other micro-batches)" if most.layout.pp > 1 else ""))
    if most.layout.replicas > fast.layout.replicas:
        why.append(f"{most.layout.name} runs {most.layout.replicas} replicas, each batching "
                   f"{mp.concurrency} sequences")
    if not why:
        why.append(f"its decode round serves {mp.concurrency} sequences in {mp.round * 1e3:.2f} ms against "
                   f"{fp.concurrency} in {fp.round * 1e3:.2f} ms")
    return [head + ";",
            f"  {most.layout.name}: {most.throughput / fast.throughput - 1:.0%} more throughput "
            f"({most.throughput:,.0f} against {fast.throughput:,.0f} tok/s) because " + "; ".join(why) + "."]
