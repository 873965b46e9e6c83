"""The router's rules, without a model: disjoint micro-batches, even spread, chunking, preemption."""
from raypp.model.sampling_params import SamplingParams
from raypp.runtime.block_manager import BlockManager
from raypp.runtime.scheduler import Scheduler
from raypp.runtime.sequence import Sequence, Status


def seq(rid, prompt_len, max_tokens=8):
    return Sequence(rid, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0),
                    seed=0, eos_ids=frozenset({2}))


def test_micro_batches_in_flight_are_disjoint_and_even():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, token_budget=512, micro_batches=2)
    for i in range(6):
        s.add(seq(f"r{i}", 5))
    a, b = s.schedule(), s.schedule()
    assert len(a.seqs) == 3 and len(b.seqs) == 3
    assert not {x.request_id for x in a.seqs} & {x.request_id for x in b.seqs}
    assert s.schedule() is None  # everyone is in flight


def test_long_prompt_is_chunked_under_the_token_budget():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, token_budget=16, micro_batches=1)
    s.add(seq("long", 40))
    chunks = []
    while True:
        mb = s.schedule()
        chunks.append(mb.chunks[0])
        sampled = bool(mb.step.sample_rows)
        s.complete(mb, [7] if sampled else [], None)
        if sampled:
            break
    assert chunks == [16, 16, 8]
    assert mb.step.seq_lens == [40] and mb.step.output_positions == [0]


def test_out_of_blocks_preempts_the_latest_idle_sequence_and_requeues_it():
    s = Scheduler(BlockManager(4, 4), max_num_seqs=8, token_budget=64, micro_batches=1)
    first, second = seq("first", 8, max_tokens=20), seq("second", 8, max_tokens=20)
    s.add(first)
    s.add(second)
    mb = s.schedule()
    s.complete(mb, [9, 9], None)        # both hold 2 blocks (8 prompt tokens each): the pool is full
    mb = s.schedule()                   # each needs a 3rd block for its 9th token: "second" is preempted
    assert [x.request_id for x in mb.seqs] == ["first"]
    assert second.status is Status.WAITING and second.num_computed == 0 and s.num_preemptions == 1
    assert list(s.waiting) == [second] and second.output_ids == [9]
    s.complete(mb, [9], None)


def test_abort_in_flight_frees_blocks_when_the_micro_batch_returns():
    blocks = BlockManager(8, 4)
    s = Scheduler(blocks, max_num_seqs=8, token_budget=64, micro_batches=1)
    x = seq("x", 6)
    s.add(x)
    mb = s.schedule()
    s.abort(x)
    assert blocks.num_free == 6           # still in flight: a stage may be writing its K/V
    s.complete(mb, [5], None)
    assert blocks.num_free == 8 and x.output_ids == []
