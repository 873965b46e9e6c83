"""The router: continuous batching into disjoint micro-batches that keep every stage busy.

Requests join and leave at step boundaries.  Up to `micro_batches` micro-batches
are in flight at once; a sequence belongs to at most one of them, so while
micro-batch k runs on stage 1, k+1 (other sequences) runs on stage 0.  Running
sequences are spread evenly over the micro-batch slots (an uneven split would
leave the short micro-batch's stages idle), and a prefill is chunked under the
per-micro-batch token budget so that stage times stay even.

When the KV cache runs out, the most recently admitted sequence that is not in
flight is preempted: its blocks are freed and it goes back to the front of the
queue, to be recomputed (prompt + tokens so far) later.  Nothing is dropped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from raypp.runtime.block_manager import BlockManager
from raypp.runtime.sequence import Sequence, Status
from raypp.runtime.step import StepInput


@dataclass
class MicroBatch:
    seqs: list[Sequence]
    chunks: list[int]            # tokens each sequence runs this step
    step: StepInput

    @property
    def sampled(self) -> list[Sequence]:
        return [self.seqs[i] for i in self.step.sample_rows]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, token_budget: int, micro_batches: int):
        self.blocks = blocks
        self.max_num_seqs, self.token_budget, self.micro_batches = max_num_seqs, token_budget, micro_batches
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []    # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = seq.finish_reason or reason
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        # A sequence in flight keeps its blocks until its micro-batch returns:
        # a stage may still be writing its K/V.
        if not seq.in_flight:
            self.blocks.free(seq.request_id)

    def _preempt_for(self, seq: Sequence) -> bool:
        """Free a later-admitted, idle sequence's blocks; False if there is none."""
        for victim in reversed(self.running):
            if victim is not seq and not victim.in_flight:
                self.running.remove(victim)
                self.blocks.free(victim.request_id)
                victim.num_computed = 0
                victim.status = Status.WAITING
                victim.num_preemptions += 1
                self.waiting.appendleft(victim)
                self.num_preemptions += 1
                return True
        return False

    def _reserve(self, seq: Sequence, chunk: int) -> bool:
        while not self.blocks.allocate(seq.request_id, seq.num_computed + chunk):
            if not self._preempt_for(seq):
                return False
        return True

    def schedule(self) -> MicroBatch | None:
        """The next micro-batch from sequences not in flight, or None if there is nothing to run."""
        budget = self.token_budget
        share = -(-(len(self.running) + len(self.waiting)) // self.micro_batches)  # even spread
        seqs, chunks = [], []
        for seq in list(self.running):
            if len(seqs) >= share or budget == 0:
                break
            if seq.in_flight or seq.status is not Status.RUNNING:
                continue
            chunk = min(seq.num_pending, budget)
            if self._reserve(seq, chunk):
                seq.in_flight = True  # from here on it is no candidate for preemption
                seqs.append(seq)
                chunks.append(chunk)
                budget -= chunk
        while self.waiting and budget > 0 and len(seqs) < share and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            chunk = min(seq.num_pending, budget)
            if not self.blocks.allocate(seq.request_id, seq.num_computed + chunk):
                break  # admitting would need preempting someone already running: wait instead
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.in_flight = True
            self.running.append(seq)
            seqs.append(seq)
            chunks.append(chunk)
            budget -= chunk
        if not seqs:
            return None
        return MicroBatch(seqs, chunks, self._step_input(seqs, chunks))

    def _step_input(self, seqs: list[Sequence], chunks: list[int]) -> StepInput:
        token_ids, sample_rows = [], []
        for i, (seq, chunk) in enumerate(zip(seqs, chunks)):
            token_ids.extend(seq.all_ids[seq.num_computed: seq.num_computed + chunk])
            if seq.num_computed + chunk == seq.num_tokens:
                sample_rows.append(i)
        sampled = [seqs[i] for i in sample_rows]
        return StepInput(
            token_ids=token_ids,
            query_lens=chunks,
            seq_lens=[s.num_computed + c for s, c in zip(seqs, chunks)],
            block_tables=[self.blocks.tables[s.request_id] for s in seqs],
            sample_rows=sample_rows,
            params=[s.params for s in sampled],
            seeds=[s.seed for s in sampled],
            output_positions=[len(s.output_ids) for s in sampled],
        )

    def complete(self, mb: MicroBatch, token_ids: list[int], logprobs: list[float] | None) -> list[Sequence]:
        """Apply a returned micro-batch; returns the sequences that got a new token."""
        for seq, chunk in zip(mb.seqs, mb.chunks):
            seq.in_flight = False
            seq.num_computed += chunk
            if seq.status is Status.FINISHED:  # aborted while in flight: release now
                self.blocks.free(seq.request_id)
        updated = []
        for j, seq in enumerate(mb.sampled):
            if seq.status is not Status.RUNNING:
                continue
            seq.append(token_ids[j], logprobs[j] if logprobs else None)
            updated.append(seq)
            if seq.finish_reason:
                self._finish(seq, seq.finish_reason)
        return updated
