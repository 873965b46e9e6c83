"""Decode steps captured from a live engine and replayed on an in-process worker under
torch.profiler: where a step's time goes."""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time

from raypp.runtime.step import PLACEHOLDER


class StepRecorder:
    """Keeps a copy of every StepInput the engine sends to its executor, so a decode step
    can be replayed on an in-process worker under a profiler."""

    def __init__(self, engine):
        self.steps = []
        self._engine = engine
        self._orig = engine.executor.submit

        def submit(step):
            self.steps.append(replayable(step))
            return self._orig(step)

        engine.executor.submit = submit

    def close(self) -> None:
        self._engine.executor.submit = self._orig

    def decode_steps(self, batch: int) -> list:
        return [s for s in self.steps if len(s.query_lens) == batch and all(q == 1 for q in s.query_lens)]


def replayable(step):
    """A copy of `step` that a worker can run again, any time: a placeholder's token comes from a
    step long gone (its ids already consumed), so the copy feeds token 0 in its place; what a
    step costs does not depend on which ids it embeds."""
    ids = [0 if t == PLACEHOLDER else t for t in step.token_ids]
    return dataclasses.replace(copy.deepcopy(step), token_ids=ids, placeholders=[])


def profile_step(worker, step, iters: int = 20, row_limit: int = 15) -> dict:
    """Replay one StepInput on an in-process StageWorker: wall time of execute() and of its parts
    (metadata build, model forward, sampling), and torch.profiler's top ops by self CPU time.
    The replay rewrites the same K/V into the same cache slots: harmless once the run is over."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from raypp.model.attention import AttentionMetadata
    from raypp.model.sampling import sample

    def timed(fn, n=iters):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    for _ in range(3):
        worker.execute(step)
    meta_args = (step.query_lens, step.seq_lens, step.block_tables, worker.block_size)
    meta = AttentionMetadata.build(*meta_args)
    x = torch.tensor(step.token_ids, dtype=torch.long)
    with torch.inference_mode():
        logits = worker.model(x, meta)
        parts = {
            "execute_ms": timed(lambda: worker.execute(step)),
            "metadata_build_ms": timed(lambda: AttentionMetadata.build(*meta_args)),
            "forward_ms": timed(lambda: worker.model(x, meta)),
            "sample_ms": timed(lambda: sample(logits, step.params, step.seeds, step.output_positions)),
        }
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                worker.execute(step)
    ka = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in ka) / iters / 1e3
    rows = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:row_limit]
    top = [{"op": e.key, "calls_per_step": e.count / iters, "self_cpu_ms_per_step": e.self_cpu_time_total / iters / 1e3}
           for e in rows]
    n_ops = sum(e.count for e in ka) / iters
    parts.update({"batch": len(step.query_lens), "context_len": max(step.seq_lens),
                  "profiler_self_cpu_ms_per_step": total_self, "ops_per_step": n_ops, "top_ops": top,
                  "table": ka.table(sort_by="self_cpu_time_total", row_limit=row_limit)})
    return parts
