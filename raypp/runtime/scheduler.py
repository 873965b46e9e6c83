"""The router: continuous batching into micro-batches that keep every stage busy.

Requests join and leave at step boundaries.  Each step is one micro-batch; the
engine keeps several in flight so that while micro-batch k runs on stage 1,
k+1 (other sequences) runs on stage 0.  The rules, each stated once:

- Even cost.  A step costs what its tokens and their attention context cost
  (`StepCost`); every micro-batch aims at 1/m of the work pending over all
  sequences (m = `micro_batches`), under the per-micro-batch token budget, so
  no micro-batch leaves the others' stages waiting.  A long prefill is chunked
  and its chunks ride along with decode tokens (stall-free batching).
- Placeholders.  A running sequence's next step may be scheduled before its
  previous token reached the driver (runtime/sequence.py, runtime/step.py):
  stage 0 gets that token from the last stage directly.  Such a *lookahead* is
  taken once at least `pp` steps were scheduled after the step that samples the
  token, so the token has left the last stage by the time stage 0 needs it; if
  nothing else can run, it is taken at once (stage 0 then waits for the token,
  which still beats waiting for the driver).
- Order of preference: sequences with nothing in flight, ready lookaheads (oldest
  first), new requests, then early lookaheads.
- Preemption.  When the KV cache runs out, the most recently admitted sequence
  with nothing in flight is preempted: its blocks are freed and it goes back to
  the front of the queue, to be recomputed (prompt + tokens so far) later.
  Nothing is dropped.  A lookahead never preempts anyone.
- Finishing.  A sequence may finish (EOS, stop id) while its lookahead step is
  in flight: that step's token is dropped, never emitted, and the blocks are
  freed when the last step in flight returns.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from raypp.model.config import ModelConfig
from raypp.runtime.block_manager import BlockManager
from raypp.runtime.sequence import Sequence, Status
from raypp.runtime.step import PLACEHOLDER, Placeholder, StepInput


# A prefill is cut to balance micro-batches only into pieces of at least this many tokens:
# smaller pieces cost more in per-step overhead than they gain in balance.
MIN_PREFILL_CHUNK = 32


@dataclass(frozen=True)
class StepCost:
    """Relative cost of running tokens: one per token, plus `context_weight` per token of attention
    context each of them reads.  For a layer, a token's matmuls cost 2 x (its weights) FLOPs and its
    attention 4 x hidden FLOPs per context token: context_weight = 2 x hidden / weights per layer."""
    context_weight: float = 0.0

    def of(self, chunk: int, seq_len: int) -> float:
        return chunk * (1.0 + self.context_weight * seq_len)

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> "StepCost":
        h, d = cfg.hidden_size, cfg.head_dim
        per_layer = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * h * cfg.intermediate_size
        return cls(context_weight=2 * h / per_layer)


@dataclass
class MicroBatch:
    seqs: list[Sequence]
    chunks: list[int]            # tokens each sequence runs this step
    step: StepInput

    @property
    def sampled(self) -> list[Sequence]:
        return [self.seqs[i] for i in self.step.sample_rows]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, token_budget: int, micro_batches: int,
                 num_stages: int = 1, cost: StepCost = StepCost()):
        self.blocks = blocks
        self.max_num_seqs, self.token_budget, self.micro_batches = max_num_seqs, token_budget, micro_batches
        self.num_stages, self.cost = num_stages, cost
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []    # in admission order
        self.num_preemptions = 0
        self.next_step_id = 0
        self.returned_upto = -1              # every step <= this one has come back

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
        # A sequence in flight keeps its blocks until its last step returns: a stage may still be
        # writing its K/V.
        if not seq.in_flight:
            self.blocks.free(seq.request_id)

    def _preempt_for(self, keep: list[Sequence]) -> bool:
        """Free the blocks of the latest-admitted idle sequence not in `keep`; False if there is none."""
        for victim in reversed(self.running):
            if victim not in keep and not victim.in_flight:
                self.running.remove(victim)
                self.blocks.free(victim.request_id)
                self._requeue(victim)
                victim.num_preemptions += 1
                self.num_preemptions += 1
                return True
        return False

    def _requeue(self, seq: Sequence) -> None:
        """Back to the front of the queue, to be recomputed from prompt + tokens seen (its blocks are freed)."""
        seq.num_computed = seq.num_running = seq.steps_in_flight = seq.unseen = 0
        seq.last_sampler = None
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _reserve(self, seq: Sequence, chunk: int, batch: list[Sequence]) -> bool:
        tokens = seq.num_computed + seq.num_running + chunk
        while not self.blocks.allocate(seq.request_id, tokens):
            if seq.in_flight or not self._preempt_for([seq, *batch]):
                return False
        return True

    def _pending_cost(self) -> float:
        seqs = [s for s in self.running if s.status is Status.RUNNING] + list(self.waiting)
        return sum(self.cost.of(s.num_pending, s.num_tokens) for s in seqs)

    def schedule(self) -> MicroBatch | None:
        """The next micro-batch, or None if nothing can run now."""
        step_id = self.next_step_id
        budget = self.token_budget
        target = self._pending_cost() / self.micro_batches
        seqs: list[Sequence] = []
        chunks: list[int] = []
        cost = 0.0

        def full() -> bool:
            return budget == 0 or (bool(seqs) and cost >= target)

        def take(seq: Sequence) -> None:
            nonlocal budget, cost
            chunk = min(seq.num_pending, budget)
            if seqs and chunk > 2 * MIN_PREFILL_CHUNK:   # a long prefill: fill up to the target cost
                fill = int((target - cost) / self.cost.of(1, seq.num_tokens))
                chunk = min(chunk, max(fill, MIN_PREFILL_CHUNK))
            if seq.status is not Status.RUNNING or not self._reserve(seq, chunk, seqs):
                return  # preempted by an earlier pick of this batch, or no blocks
            seqs.append(seq)
            chunks.append(chunk)
            budget -= chunk
            cost += self.cost.of(chunk, seq.num_computed + seq.num_running + chunk)

        ready = [s for s in self.running if s.schedulable]
        idle = [s for s in ready if not s.in_flight]
        ahead = sorted((s for s in ready if s.in_flight), key=lambda s: s.last_sampler or (step_id, 0))
        on_time = [s for s in ahead if s.last_sampler is None or step_id - s.last_sampler[0] >= self.num_stages]
        for seq in idle + on_time:
            if full():
                break
            take(seq)
        while self.waiting and not full() and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.allocate(seq.request_id, seq.num_computed + min(seq.num_pending, budget)):
                break  # admitting would need preempting someone already running: wait instead
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if seq.admitted_at is None:
                seq.admitted_at = time.perf_counter()
            self.running.append(seq)
            take(seq)
        if not seqs:
            for seq in ahead:
                if full():
                    break
                if seq not in on_time:
                    take(seq)
        if not seqs:
            return None
        self.next_step_id += 1
        return MicroBatch(seqs, chunks, self._step_input(step_id, seqs, chunks))

    def _step_input(self, step_id: int, seqs: list[Sequence], chunks: list[int]) -> StepInput:
        """Builds the step and marks its sequences as in flight with it."""
        token_ids, sample_rows, placeholders, seq_lens = [], [], [], []
        params, seeds, output_positions = [], [], []
        for i, (seq, chunk) in enumerate(zip(seqs, chunks)):
            start = seq.num_computed + seq.num_running
            known = seq.all_ids
            token_ids.extend(known[start: start + chunk])
            if start + chunk > len(known):   # the newest token is still on its way from the last stage
                placeholders.append(Placeholder(len(token_ids), *seq.last_sampler))
                token_ids.append(PLACEHOLDER)
            seq_lens.append(start + chunk)
            seq.num_running += chunk
            seq.steps_in_flight += 1
            if start + chunk == seq.num_tokens:
                params.append(seq.params)
                seeds.append(seq.seed)
                output_positions.append(len(seq.output_ids) + seq.unseen)
                seq.last_sampler = (step_id, len(sample_rows))
                seq.unseen += 1
                sample_rows.append(i)
        return StepInput(
            token_ids=token_ids, query_lens=list(chunks), seq_lens=seq_lens,
            block_tables=[self.blocks.tables[s.request_id] for s in seqs],
            sample_rows=sample_rows, params=params, seeds=seeds, output_positions=output_positions,
            step_id=step_id, placeholders=placeholders, returned_upto=self.returned_upto)

    def requeue_all(self) -> None:
        """The workers and their KV caches are gone: every running sequence goes back to the front of
        the queue, in admission order, to be recomputed from prompt + tokens seen; all blocks are free."""
        for seq in reversed(self.running):
            self._requeue(seq)
        self.running.clear()
        for rid in list(self.blocks.tables):
            self.blocks.free(rid)
        self.returned_upto = self.next_step_id - 1   # no later step refers to an earlier one

    def complete(self, mb: MicroBatch, token_ids: list[int], logprobs: list[float] | None) -> list[Sequence]:
        """Apply a returned micro-batch (steps return in order); returns the sequences that got a token."""
        self.returned_upto = mb.step.step_id
        for seq, chunk in zip(mb.seqs, mb.chunks):
            seq.steps_in_flight -= 1
            seq.num_running -= chunk
            seq.num_computed += chunk
        updated = []
        for j, seq in enumerate(mb.sampled):
            seq.unseen -= 1
            if seq.last_sampler is not None and seq.last_sampler[0] == mb.step.step_id:
                seq.last_sampler = None
            if seq.status is not Status.RUNNING:
                continue   # finished while this step was in flight: its token is dropped
            seq.append(token_ids[j], logprobs[j] if logprobs else None)
            updated.append(seq)
            if seq.finish_reason:
                self._finish(seq, seq.finish_reason)
        for seq in mb.seqs:
            if seq.status is Status.FINISHED and not seq.in_flight:
                self.blocks.free(seq.request_id)
        return updated
