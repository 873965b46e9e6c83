"""Decode steps captured as CUDA graphs, one per padded batch size.

Eager decode of a ~1B model launches ~15 kernels per layer; at batch 1 each runs for a few
microseconds, so the host's launch time, not memory bandwidth, sets the step time.  A graph
replays the whole step with one launch.  `DecodeGraph` is captured for one batch size and one
maximum context (block-table width); each step copies that step's few indices (token ids,
positions, slots, block tables, lengths) into the graph's input buffer in one copy
(graph_inputs.py) and replays.  `DecodeGraphs` is
a worker's set of them: a decode of n sequences replays the graph of the next bucket
(1, 2, 4, ... up to a cap; graph_batches.py), captured the first time a step needs it.

Rows past a step's n sequences (padding), warm-up and capture write their K/V into a scratch
cache block that no sequence owns, so a graph can be captured while the cache holds live
sequences.  Capture runs the Triton kernels: the FlashInfer path plans on the host per step,
which a captured graph would not repeat.  The batch-1 graph captures fused_decode.forward
(six kernels a layer instead of ten, chained by programmatic dependent launch on Hopper)
when the model allows it.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from raypp.model import fused_decode, ops
from raypp.model.attention import AttentionMetadata
from raypp.model.graph_batches import graph_batch
from raypp.model.graph_inputs import GraphInputs

# The batch-1 graph runs fused_decode.forward where fused_decode.eligible; PDL None: where
# the GPU and Triton support it.  Both are switches for benchmarks and tests.
FUSED_BATCH1 = True
PDL: bool | None = None


class DecodeGraph:
    def __init__(self, model, batch: int, max_blocks: int, block_size: int, scratch_block: int, pool=None):
        """model: a stage module (token ids in when it embeds, else hidden states).  Capture
        writes K/V only into cache block `scratch_block`.  Graphs that share `pool` share
        memory: safe because they replay one at a time on one stream and every output is
        consumed (sampled, or copied) before the next replay."""
        weight = next(model.parameters())
        device = weight.device
        self.batch, self.block_size, self.scratch_block = batch, block_size, scratch_block
        self.inputs = GraphInputs(batch, max_blocks, block_size, scratch_block, model.embed_tokens is not None, device)
        inputs = self.inputs
        if model.embed_tokens is not None:
            self.x = inputs.ids
        else:
            self.x = torch.zeros(batch, model.cfg.hidden_size, dtype=weight.dtype, device=device)
        rows = torch.arange(batch, device=device)
        # Kept: the graph reads every tensor of it (logits_rows too) at the addresses of capture.
        self.meta = AttentionMetadata(
            positions=inputs.positions, slot_mapping=inputs.slots, logits_rows=rows, decode_rows=rows,
            decode_tables=inputs.tables, decode_lens=inputs.lens, decode_max_len=max_blocks * block_size,
            decode_pages=(), prefills=[], block_size=block_size)
        self.fused = batch == 1 and FUSED_BATCH1 and fused_decode.eligible(model)
        self.pdl = self.fused and (fused_decode.pdl_available(device) if PDL is None else PDL)
        self.max_blocks = max_blocks
        self.graph = None
        with ops.use("triton"):
            if device.type != "cuda":  # no graphs: steps run eagerly on the same buffers (CPU tests, dry runs)
                self.forward = self._forward(model)
                return
            try:
                self._capture(model, pool)
            except Exception:
                if not self.pdl:
                    raise
                # A driver or Triton without dependent launches: the same kernels, launched plainly.
                self.pdl = False
                self._capture(model, pool)

    def _forward(self, model):
        return functools.partial(fused_decode.forward, model, pdl=self.pdl) if self.fused else model

    def _capture(self, model, pool) -> None:
        device = self.x.device
        self.forward = forward = self._forward(model)
        # Warm-up on a side stream (Triton compiles, allocators settle), as capture requires.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                forward(self.x, self.meta)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread's event queries must not void the capture.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out = forward(self.x, self.meta)

    def __call__(self, x: torch.Tensor | list[int], seq_lens: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One decode step of len(seq_lens) <= batch sequences.  x: their input, token ids as a
        host list (staged with the other indices) or on the device, or hidden states [n, d] on
        the device; seq_lens[i]: sequence i's context, the new token included; block_tables[i]:
        its cache blocks.  Returns the graph's output rows of those sequences (logits or hidden
        states), valid until the next replay."""
        n = len(seq_lens)
        self.inputs.stage(x if isinstance(x, list) else None, seq_lens, block_tables)
        if not isinstance(x, list):
            self.x[:n].copy_(x)  # padding rows keep earlier inputs: finite, and their outputs are dropped
        if self.graph is None:
            with ops.use("triton"):
                self.out = self.forward(self.x, self.meta)
        else:
            self.graph.replay()
        return self.out[:n]

    def eager_meta(self, seq_lens: list[int], block_tables: list[list[int]], device) -> AttentionMetadata:
        """The metadata of an eager step of exactly what a replay computes: the graph's batch,
        and its context bound (max_blocks), which sets where attention splits the context.
        `self.forward(x, eager_meta(...))` must equal a replay bit for bit (the tests' check
        that no stale input of the graph leaks into a step)."""
        pad = self.batch - len(seq_lens)
        lens = list(seq_lens) + [1] * pad
        tables = [list(t[:self.max_blocks]) for t in block_tables] + [[self.scratch_block]] * pad
        meta = AttentionMetadata.build([1] * self.batch, lens, tables, self.block_size)
        wide = torch.zeros(self.batch, self.max_blocks, dtype=torch.int32)
        wide[:, :meta.decode_tables.shape[1]] = meta.decode_tables
        return dataclasses.replace(meta, decode_tables=wide, decode_max_len=self.max_blocks * self.block_size).to(device)


class DecodeGraphs:
    """A stage's decode graphs, one per padded batch size, each captured on first use."""

    def __init__(self, model, max_batch: int, max_blocks: int, block_size: int, scratch_block: int):
        self.model, self.max_batch, self.max_blocks = model, max_batch, max_blocks
        self.block_size, self.scratch_block = block_size, scratch_block
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, DecodeGraph] = {}

    def batch_for(self, query_lens: list[int], seq_lens: list[int], all_logits: bool) -> int | None:
        return graph_batch(query_lens, seq_lens, all_logits, self.max_batch, self.max_blocks * self.block_size)

    def run(self, x: torch.Tensor | list[int], seq_lens: list[int], block_tables: list[list[int]],
            batch: int) -> torch.Tensor:
        """A decode step replayed at `batch` (from batch_for)."""
        graph = self.graphs.get(batch)
        if graph is None:
            graph = self.graphs[batch] = DecodeGraph(self.model, batch, self.max_blocks, self.block_size,
                                                     self.scratch_block, self.pool)
        out = graph(x, seq_lens, block_tables)
        # A stage short of the head sends its output asynchronously; the next replay must not
        # overwrite it mid-send.
        return out if self.model.lm_head is not None else out.clone()
