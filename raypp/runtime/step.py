"""What crosses between the driver and the workers, one step at a time.

Plain data, no torch: the scheduler, the stats and the metrics use these types
without importing the model.  `StepOutput.logits` is a tensor only in tests that
ask for every token's logits (`StepInput.all_logits`).

Placeholders (vLLM's output placeholders): a running sequence's next decode step
may be scheduled before the driver has seen the token its previous step samples.
Its input token is then `PLACEHOLDER`, and `Placeholder(pos, step_id, row)` tells
stage 0 to take the id that step `step_id` sampled for its `row`-th sample row;
the last stage sends those ids to stage 0 directly (runtime/token_return.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from raypp.model.sampling_params import SamplingParams

PLACEHOLDER = -1


class Placeholder(NamedTuple):
    pos: int        # index into StepInput.token_ids
    step_id: int    # the step that samples the token
    row: int        # which of that step's sample rows


@dataclass
class StepInput:
    token_ids: list[int]                 # flat new tokens of every sequence (stage 0 embeds them)
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]               # sequences (indices) that get a token this step
    params: list[SamplingParams] = field(default_factory=list)   # one per sample row
    seeds: list[int] = field(default_factory=list)
    output_positions: list[int] = field(default_factory=list)    # index of the token to sample, per row
    all_logits: bool = False             # tests: logits of every token instead of sampling
    resumed: bool = False                # first step after the engine had no work: that gap is no bubble
    step_id: int = 0                     # increasing; steps run on every stage in this order
    placeholders: list[Placeholder] = field(default_factory=list)
    # Every step <= this one has come back to the driver, so its sampled ids have been sent
    # to stage 0 and no later step refers to them: stage 0 receives and then forgets them.
    returned_upto: int = -1


@dataclass
class StepTiming:
    stage: int
    tp_rank: int
    start: float          # wall clock (time.time) when the step began
    end: float
    idle_s: float         # from the previous step's end to this step's start: nothing queued
    wait_s: float         # waiting for the previous stage's activations
    token_wait_s: float   # stage 0: waiting for sampled ids from the last stage (placeholders)
    prep_s: float         # host-side work that does not scale with tokens: metadata, tensors
    compute_s: float      # forward (and sampling on the last stage), less comm
    comm_s: float         # TP all-reduces + stage-to-stage sends

    @property
    def busy_s(self) -> float:
        return self.prep_s + self.compute_s + self.comm_s

    @property
    def bubble_s(self) -> float:
        return self.idle_s + self.wait_s + self.token_wait_s


@dataclass
class StepOutput:
    token_ids: list[int] | None
    logprobs: list[float] | None
    timing: StepTiming
    logits: Any = None    # torch.Tensor when all_logits
