"""A decode step of the model captured as one CUDA graph.

Eager decode of a ~1B model launches ~15 kernels per layer; at batch 1 each runs for a few
microseconds, so the host's launch time, not memory bandwidth, sets the step time.  A graph
replays the whole step with one launch.  It is captured for one batch size and one maximum
context (block-table width); each step copies that step's small metadata (positions, slots,
block tables, lengths) into the graph's input buffers and replays.

Capture runs the Triton kernels: the FlashInfer path plans on the host per step, which a
captured graph would not repeat.  Warm-up and capture run a dummy token whose K/V land in
cache slot 0, so a graph is made before the cache holds any sequence's data.
"""
from __future__ import annotations

import torch

from raypp.model import ops
from raypp.model.attention import AttentionMetadata


class DecodeGraph:
    def __init__(self, model, batch: int, max_blocks: int, block_size: int):
        device = model.lm_head.weight.device
        zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        rows = torch.arange(batch, device=device)
        self.ids = zeros(batch)
        self.meta = AttentionMetadata(
            positions=zeros(batch), slot_mapping=zeros(batch), logits_rows=rows, decode_rows=rows,
            decode_tables=zeros(batch, max_blocks, dtype=torch.int32),
            decode_lens=torch.ones(batch, dtype=torch.int32, device=device),
            decode_max_len=max_blocks * block_size, decode_pages=(), prefills=[], block_size=block_size)
        with ops.use("triton"):
            # Warm-up on a side stream (Triton compiles, allocators settle), as capture requires.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    model(self.ids, self.meta)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model(self.ids, self.meta)

    def __call__(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """ids [batch] on the device (e.g. the previous step's argmax: no host round trip);
        meta: this step's decode metadata, already on the device.  Returns the graph's logits
        buffer, valid until the next call."""
        m = self.meta
        self.ids.copy_(ids)
        m.positions.copy_(meta.positions)
        m.slot_mapping.copy_(meta.slot_mapping)
        m.decode_lens.copy_(meta.decode_lens)
        m.decode_tables[:, : meta.decode_tables.shape[1]].copy_(meta.decode_tables)
        self.graph.replay()
        return self.logits
