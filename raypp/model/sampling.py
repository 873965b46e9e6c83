"""Token sampling on the last pipeline stage: greedy, temperature, top-k, top-p.

Randomness is stateless per token: the generator for a request's n-th output
token is seeded from (request seed, n).  A preempted and recomputed sequence, or
the same request run on another layout, therefore samples the same tokens, and
no generator state has to live in a worker between steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 means greedy
    top_k: int = 0                    # 0 disables
    top_p: float = 1.0
    seed: int | None = None           # None: the engine draws one at admission
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False            # return the chosen token's log-probability

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


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
    greedy_ids = torch.argmax(logits, dim=-1).tolist()
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
