"""A request's state as the scheduler sees it."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from raypp.model.sampling_params import SamplingParams


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
    status: Status = Status.WAITING
    in_flight: bool = False        # part of a micro-batch that has not come back yet
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    def append(self, token_id: int, logprob: float | None) -> None:
        self.output_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        p = self.params
        if (token_id in p.stop_token_ids) or (not p.ignore_eos and token_id in self.eos_ids):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= p.max_tokens:
            self.finish_reason = "length"
