"""Token sampling on the last pipeline stage: greedy, temperature, top-k, top-p.

Randomness is stateless per token: the generator for a request's n-th output
token is seeded from (request seed, n).  A preempted and recomputed sequence, or
the same request run on another layout, therefore samples the same tokens, and
no generator state has to live in a worker between steps.
"""
from __future__ import annotations

import torch

from raypp.model.sampling_params import SamplingParams


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= p.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
           output_positions: list[int]) -> tuple[list[int], list[float] | None]:
    """One token per row of `logits` [n, vocab]; returns ids and, if any row asks, logprobs."""
    logits = logits.float()
    greedy_ids = torch.argmax(logits, dim=-1).tolist()  # on a GPU, the step's one wait for the device
    if not all(p.greedy for p in params):
        # The seeded CPU generators draw the same tokens whatever device computed the logits.
        logits = logits.cpu()
    ids = []
    for i, p in enumerate(params):
        if p.greedy:
            ids.append(greedy_ids[i])
            continue
        g = torch.Generator().manual_seed((seeds[i] * 1_000_003 + output_positions[i]) % (1 << 63))
        ids.append(int(torch.multinomial(_filtered_probs(logits[i], p), 1, generator=g)))
    logprobs = None
    if any(p.logprobs for p in params):
        lp = torch.log_softmax(logits, dim=-1)
        logprobs = lp[torch.arange(len(ids)), torch.tensor(ids)].tolist()
    return ids, logprobs
