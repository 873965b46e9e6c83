"""What the engine hands back per request, and the errors a caller must expect."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class RequestOutput:
    request_id: str
    num_prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)        # every generated id so far
    new_token_ids: list[int] = field(default_factory=list)    # ids since the previous yield
    new_logprobs: list[float] | None = None                   # one per new id, if asked
    finished: bool = False
    finish_reason: FinishReason | None = None


class QueueFullError(RuntimeError):
    """The waiting queue is at `scheduler.max_queue`; the caller should retry later (HTTP 429)."""

    def __init__(self, waiting: int, retry_after_s: float = 1.0):
        super().__init__(f"server busy: {waiting} requests already waiting")
        self.retry_after_s = retry_after_s
