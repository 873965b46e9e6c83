"""Which decode steps replay as CUDA graphs, and at what padded batch size (cuda_graph.py).

Plain Python, no torch: the config takes its default from here, and the rules are tested
without a GPU.
"""
from __future__ import annotations

# Covers the scheduler's default max_num_seqs; measured in docs/benchmarks.md (GPU section).
CUDA_GRAPH_MAX_BATCH = 64


def bucket(n: int, max_batch: int) -> int:
    """The batch size a decode of n sequences pads to: the next power of two, at most max_batch."""
    return min(1 << (n - 1).bit_length(), max_batch)


def graph_batch(query_lens: list[int], seq_lens: list[int], all_logits: bool, max_batch: int,
                max_len: int) -> int | None:
    """The padded batch size a step replays as, or None when it must run eagerly: only pure
    decode steps (one new token per sequence) whose logits are sampled, of at most max_batch
    sequences, none longer than the graphs' context (max_len tokens)."""
    n = len(query_lens)
    if all_logits or not 0 < n <= max_batch or any(q != 1 for q in query_lens) or max(seq_lens) > max_len:
        return None
    return bucket(n, max_batch)
