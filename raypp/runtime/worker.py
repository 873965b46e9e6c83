"""One (stage, tp_rank) worker: its model shard, its KV cache, one step at a time.

A plain class (no Ray here): the Ray actor in `executors.py` wraps it, the
in-process engine calls it directly, and the multi-process tests drive it with
torch.multiprocessing.  Activations cross stages by torch.distributed
point-to-point (to the same TP rank of the next stage); only the small
`StepInput` travels by the caller.

Every step records where this worker's time went (`StepTiming`): waiting for
the caller (idle), waiting for the previous stage's activations (bubble),
computing, and communicating (TP all-reduces and sends).
"""
from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist

from raypp.model.attention import AttentionMetadata, to_device
from raypp.model.checkpoint import load_weights, resolve_dtype
from raypp.model.config import ModelConfig
from raypp.model.cuda_graph import DecodeGraphs
from raypp.model.graph_batches import CUDA_GRAPH_MAX_BATCH
from raypp.model.sampling import sample
from raypp.layout import Layout
from raypp.parallel.pipeline import build_stage_module
from raypp.parallel.shm_allreduce import ShmAllReduce
from raypp.runtime.step import StepInput, StepOutput, StepTiming
from raypp.runtime.token_return import TokenReturn, token_return_ranks


class _CommClock:
    """Times the TP all-reduces that hooks run inside forward()."""

    def __init__(self, model):
        self.total = 0.0
        for layer in model.layers.values():
            for mod in (layer.self_attn, layer.mlp):
                if mod._forward_hooks:  # the all-reduce hook that apply_tp added
                    mod.register_forward_hook(self._before, prepend=True)
                    mod.register_forward_hook(self._after)

    def _before(self, *_):
        self._t = time.perf_counter()

    def _after(self, *_):
        self.total += time.perf_counter() - self._t


class StageWorker:
    def __init__(self, model_path: str, dtype: str, layout: Layout, stage: int, tp_rank: int,
                 num_blocks: int, block_size: int, device: str = "cpu", progress: bool = False,
                 timeout_s: float = 120.0, cuda_graph_max_batch: int = CUDA_GRAPH_MAX_BATCH):
        self.cfg = ModelConfig.from_dir(model_path)
        self.layout, self.stage, self.tp_rank = layout, stage, tp_rank
        self.first, self.last = stage == 0, stage == layout.pp - 1
        self.rank = layout.rank(stage, tp_rank)
        self.device = device
        self.block_size = block_size
        self.distributed = layout.world_size > 1
        tp_group = self._make_tp_group() if self.distributed else None
        # Every rank creates every group, in the same order: the TP groups, then this one.
        token_ranks = token_return_ranks(layout)
        token_group = dist.new_group(token_ranks) if self.distributed and token_ranks else None
        self.tokens = TokenReturn(layout, stage, tp_rank, token_group)
        self.dtype = resolve_dtype(dtype, self.cfg, device)
        self.model = build_stage_module(self.cfg, layout, stage, tp_rank, self._tp_all_reduce(tp_group, timeout_s))
        self.bytes_loaded = load_weights(self.model, model_path, self.dtype, device, progress=progress)
        # Decode graphs (raypp/model/cuda_graph.py) on CUDA at tp=1: with TP they would have to
        # capture the all-reduces too, which no test here covers.  Their padding rows write K/V
        # into one extra cache block, past the num_blocks that the scheduler hands out.
        graphs = cuda_graph_max_batch > 0 and torch.device(device).type == "cuda" and layout.tp == 1
        self.kv_cache_bytes = self.model.allocate_kv_cache(num_blocks + graphs, block_size)
        max_blocks = min(num_blocks, -(-self.cfg.max_position_embeddings // block_size))
        self.graphs = DecodeGraphs(self.model, cuda_graph_max_batch, max_blocks, block_size,
                                   scratch_block=num_blocks) if graphs else None
        self.comm_clock = _CommClock(self.model)
        self._pending_send = None
        self._last_end = None

    def _tp_all_reduce(self, tp_group, timeout_s: float):
        """CPU ranks of one host meet in shared memory (~1 ms less per call than gloo's loopback TCP);
        anything else uses torch.distributed."""
        self.shm_all_reduce = None
        if self.layout.tp > 1 and self.device == "cpu":
            self.shm_all_reduce = ShmAllReduce.for_group(tp_group, self.tp_rank, self.layout.tp, timeout_s)
        if self.shm_all_reduce is not None:
            return self.shm_all_reduce.all_reduce
        return functools.partial(dist.all_reduce, group=tp_group)

    def _make_tp_group(self):
        # Every rank must create every group, in the same order (torch.distributed's rule).
        groups = [dist.new_group([self.layout.rank(s, r) for r in range(self.layout.tp)])
                  for s in range(self.layout.pp)]
        return groups[self.stage]

    def _input_ids(self, step: StepInput) -> list[int]:
        """Stage 0: the step's token ids, placeholders filled with ids from the last stage."""
        ids = step.token_ids
        if step.placeholders:
            ids = list(ids)
            for p in step.placeholders:
                ids[p.pos] = self.tokens.take(p.step_id, p.row)
        self.tokens.forget_upto(step.returned_upto)
        if step.sample_rows and not step.all_logits:
            self.tokens.expect(step.step_id, len(step.sample_rows))
        return ids

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        start = time.perf_counter()
        idle = 0.0 if step.resumed or self._last_end is None else start - self._last_end
        graph_batch = self.graphs and self.graphs.batch_for(step.query_lens, step.seq_lens, step.all_logits)
        # A graph step takes its few indices from the step itself: the eager metadata's host
        # build (~25 us a sequence) would cost as much as the whole replay at batch 32.
        meta = None if graph_batch else AttentionMetadata.build(
            step.query_lens, step.seq_lens, step.block_tables, self.block_size, all_logits=step.all_logits)
        token_wait = 0.0
        wait_from = time.perf_counter()
        prep = wait_from - start
        if self.first:
            x = self._input_ids(step)
            if not graph_batch:  # a graph stages the ids with its other indices, in one copy
                x = to_device(torch.tensor(x, dtype=torch.long), self.device)
            token_wait = time.perf_counter() - wait_from
            wait_from = time.perf_counter()
        else:
            x = torch.empty(sum(step.query_lens), self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, src=self.layout.rank(self.stage - 1, self.tp_rank))
        wait = time.perf_counter() - wait_from
        all_reduce_before = self.comm_clock.total
        if graph_batch:
            out = self.graphs.run(x, step.seq_lens, step.block_tables, graph_batch)
        else:
            out = self.model(x, meta)
        send = 0.0
        ids = logprobs = logits = None
        if not self.last:
            send_from = time.perf_counter()
            if self._pending_send is not None:
                self._pending_send.wait()  # the previous micro-batch's send; long done in steady state
            self._pending_send = dist.isend(out, dst=self.layout.rank(self.stage + 1, self.tp_rank))
            send = time.perf_counter() - send_from
        elif step.all_logits:
            logits = out
        elif self.tokens.is_sender:
            rows = out if len(step.sample_rows) == out.shape[0] else out[step.sample_rows]
            ids, logprobs = sample(rows, step.params, step.seeds, step.output_positions)
            if ids:
                self.tokens.publish(step.step_id, ids)
            if self.tp_rank != 0:  # at PP = 1 every rank samples for itself; rank 0 reports
                ids = logprobs = None
        end = time.perf_counter()
        self._last_end = end
        comm = self.comm_clock.total - all_reduce_before + send
        now = time.time()
        timing = StepTiming(self.stage, self.tp_rank, start=now - (end - start), end=now, idle_s=idle,
                            wait_s=wait, token_wait_s=token_wait, prep_s=prep,
                            compute_s=end - start - prep - token_wait - wait - comm, comm_s=comm)
        return StepOutput(ids, logprobs, timing, logits)
