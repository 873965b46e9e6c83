"""Sampled ids from the last stage to stage 0, without the driver.

The last stage's TP rank 0 samples; every stage-0 TP rank needs those ids as the
next input of the sequences that sampled them (placeholders, runtime/step.py).
They travel point to point on a process group of their own, so they never queue
behind activations.

Both ends see every step in the same order, so no ids travel with labels: after
sampling step s, the sender sends its ids to every stage-0 rank; a stage-0 rank
notes each step it runs that samples (`expect`) and receives their ids in that
order, when a later step needs them (`take`) or once the driver has seen the step
come back (`forget_upto`, so nothing piles up).

With one stage (PP = 1) nothing travels: every TP rank samples for itself.  The
ranks hold the same logits, bit for bit (the TP all-reduces hand every rank the
same sums, and the vocabulary gather adds only zeros), and sampling is seeded per
token (model/sampling.py), so each rank draws the ids rank 0 draws.  A send would
put rank 0's sampling and a gloo hop ahead of every other rank's next step: at
TP=2, batch 1, rank 1 waited ~2 ms a token for it.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from raypp.layout import Layout


def token_return_ranks(layout: Layout) -> list[int]:
    """The group: the sampler (last stage, TP rank 0) and every stage-0 rank; none at PP = 1."""
    if layout.pp == 1:
        return []
    return sorted({layout.rank(layout.pp - 1, 0)} | {layout.rank(0, r) for r in range(layout.tp)})


class TokenReturn:
    def __init__(self, layout: Layout, stage: int, tp_rank: int, group=None):
        me = layout.rank(stage, tp_rank)
        self.src = me if layout.pp == 1 else layout.rank(layout.pp - 1, 0)
        self.is_sender = me == self.src   # this rank samples (`publish`)
        self.is_receiver = stage == 0
        self.dsts = [r for r in token_return_ranks(layout) if r != self.src] if self.is_sender else []
        self.group = group
        self.ids: dict[int, list[int]] = {}
        self._expected: deque[tuple[int, int]] = deque()   # (step_id, count) on their way, in order
        self._sends: list = []

    def publish(self, step_id: int, ids: list[int]) -> None:
        """Sender: this step's sampled ids go to every stage-0 rank."""
        if self.is_receiver:
            self.ids[step_id] = ids
        if self.dsts:
            t = torch.tensor(ids, dtype=torch.int64)
            self._sends = [w for w in self._sends if not w.is_completed()]
            self._sends += [dist.isend(t, dst=d, group=self.group) for d in self.dsts]

    def expect(self, step_id: int, count: int) -> None:
        """Receiver: a step that samples `count` ids just ran on stage 0; they will arrive later."""
        if self.is_receiver and not self.is_sender and count:
            self._expected.append((step_id, count))

    def _receive_next(self) -> None:
        step_id, count = self._expected.popleft()
        t = torch.empty(count, dtype=torch.int64)
        dist.recv(t, src=self.src, group=self.group)
        self.ids[step_id] = t.tolist()

    def take(self, step_id: int, row: int) -> int:
        """Receiver: the id that `step_id` sampled for its `row`-th sample row (blocks until it is here)."""
        while step_id not in self.ids:
            self._receive_next()
        return self.ids[step_id][row]

    def forget_upto(self, step_id: int) -> None:
        """Receiver: no later step refers to steps <= step_id; receive what is left of them and drop them."""
        while self._expected and self._expected[0][0] <= step_id:
            self._receive_next()
        for s in [s for s in self.ids if s <= step_id]:
            del self.ids[s]
