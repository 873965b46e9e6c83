"""A request's state as the scheduler sees it.

A sequence's tokens fall into three parts: those whose K/V are in the cache
(`num_computed`), those that steps in flight are computing (`num_running`), and
the rest.  A step in flight may also *sample* a token the driver has not seen
yet (`unseen`): the next step can still be scheduled, with a placeholder for that
token (see runtime/step.py).  At most `MAX_STEPS_IN_FLIGHT` steps of one sequence
are in flight: the one computing and the one queued behind it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from raypp.model.sampling_params import SamplingParams

MAX_STEPS_IN_FLIGHT = 2


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    eos_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    num_computed: int = 0          # tokens whose K/V are in the cache
    num_running: int = 0           # tokens whose K/V steps in flight are computing
    steps_in_flight: int = 0
    unseen: int = 0                # tokens steps in flight will sample, not yet seen by the driver
    last_sampler: tuple[int, int] | None = None   # (step_id, sample row) of the newest unseen token
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    admitted_at: float | None = None   # time.perf_counter() when first taken out of the queue

    @property
    def in_flight(self) -> bool:
        return self.steps_in_flight > 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """Tokens known to exist, seen or not."""
        return len(self.prompt_ids) + len(self.output_ids) + self.unseen

    @property
    def num_pending(self) -> int:
        """Tokens not yet handed to any step."""
        return self.num_tokens - self.num_computed - self.num_running

    @property
    def schedulable(self) -> bool:
        """May join the next micro-batch: running, something to compute, room for one more step,
        and not already sure to finish (max_tokens reached) with the steps in flight."""
        return (self.status is Status.RUNNING and self.num_pending > 0
                and self.steps_in_flight < MAX_STEPS_IN_FLIGHT
                and len(self.output_ids) + self.unseen < self.params.max_tokens)

    def append(self, token_id: int, logprob: float | None) -> None:
        self.output_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        p = self.params
        if (token_id in p.stop_token_ids) or (not p.ignore_eos and token_id in self.eos_ids):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= p.max_tokens:
            self.finish_reason = "length"
