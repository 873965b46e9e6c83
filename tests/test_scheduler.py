"""The router's rules, without a model: disjoint micro-batches, lookahead with placeholders, cost
balance, chunking, preemption, finishing and aborting with steps in flight."""
from raypp.model.sampling_params import SamplingParams
from raypp.runtime.block_manager import BlockManager
from raypp.runtime.scheduler import Scheduler, StepCost
from raypp.runtime.sequence import Sequence, Status
from raypp.runtime.step import PLACEHOLDER, Placeholder


def seq(rid, prompt_len, max_tokens=8, **params):
    return Sequence(rid, list(range(3, 3 + prompt_len)),
                    SamplingParams(max_tokens=max_tokens, temperature=0, **params), seed=0, eos_ids=frozenset({2}))


def ids(mb):
    return [x.request_id for x in mb.seqs]


def test_micro_batches_are_disjoint_until_a_lookahead_is_on_time():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, token_budget=512, micro_batches=2, num_stages=2)
    for i in range(4):
        s.add(seq(f"r{i}", 5))
    a, b = s.schedule(), s.schedule()
    assert ids(a) == ["r0", "r1"] and ids(b) == ["r2", "r3"]
    # Step 2 is two steps after step 0: a's tokens have left the last stage by the time stage 0
    # runs step 2, so a's sequences go again, their input a placeholder for the unseen token.
    c = s.schedule()
    assert ids(c) == ["r0", "r1"] and c.step.step_id == 2
    assert c.step.token_ids == [PLACEHOLDER, PLACEHOLDER]
    assert c.step.placeholders == [Placeholder(0, 0, 0), Placeholder(1, 0, 1)]
    assert c.step.seq_lens == [6, 6] and c.step.output_positions == [1, 1]
    d = s.schedule()
    assert ids(d) == ["r2", "r3"] and d.step.placeholders == [Placeholder(0, 1, 0), Placeholder(1, 1, 1)]
    assert s.schedule() is None            # two steps of everyone in flight
    s.complete(a, [7, 8], None)
    assert [x.output_ids for x in a.seqs] == [[7], [8]]
    e = s.schedule()                       # a's next step: its input is still c's unseen token
    assert ids(e) == ["r0", "r1"] and e.step.placeholders == [Placeholder(0, 2, 0), Placeholder(1, 2, 1)]
    assert e.step.returned_upto == 0


def test_with_nothing_else_to_run_a_lookahead_goes_at_once():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, token_budget=512, micro_batches=2, num_stages=4)
    s.add(seq("alone", 5))
    first, second = s.schedule(), s.schedule()
    assert first.step.placeholders == [] and first.step.sample_rows == [0]
    assert ids(second) == ["alone"] and second.step.placeholders == [Placeholder(0, 0, 0)]
    assert s.schedule() is None


def test_a_lookahead_stops_at_max_tokens():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, token_budget=512, micro_batches=1, num_stages=1)
    s.add(seq("x", 5, max_tokens=1))
    mb = s.schedule()
    assert s.schedule() is None            # the step in flight samples the last token allowed
    s.complete(mb, [9], None)
    assert mb.seqs[0].finish_reason == "length" and s.blocks.num_free == 64


def test_finishing_while_the_next_step_is_in_flight_drops_its_token_and_frees_blocks_after():
    blocks = BlockManager(64, 4)
    s = Scheduler(blocks, max_num_seqs=8, token_budget=512, micro_batches=1, num_stages=1)
    x = seq("x", 5)
    s.add(x)
    first, second = s.schedule(), s.schedule()
    s.complete(first, [2], None)           # EOS
    assert x.status is Status.FINISHED and x.output_ids == [2] and blocks.num_free < 64
    assert s.complete(second, [11], None) == []
    assert x.output_ids == [2] and blocks.num_free == 64


def test_micro_batches_are_balanced_by_cost_with_a_prefill_spread_over_both():
    s = Scheduler(BlockManager(256, 16), max_num_seqs=32, token_budget=512, micro_batches=2, num_stages=2)
    decoders = [seq(f"d{i}", 4, max_tokens=100) for i in range(16)]
    for d in decoders:
        s.add(d)
    while any(not d.output_ids or d.in_flight for d in decoders):   # every prompt done, nothing in flight
        in_flight = []
        while mb := s.schedule():
            in_flight.append(mb)
        for mb in in_flight:
            s.complete(mb, [7] * len(mb.step.sample_rows), None)
    s.add(seq("long", 300))
    a, b = s.schedule(), s.schedule()
    tokens = [sum(mb.chunks) for mb in (a, b)]
    assert sum(tokens) == 316 and abs(tokens[0] - tokens[1]) <= 16, tokens
    assert "long" in ids(a) and "long" in ids(b)


def test_context_makes_a_decode_token_cost_more():
    cost = StepCost(context_weight=1e-3)
    assert cost.of(1, 2000) == 3.0 and cost.of(1, 0) == 1.0 and cost.of(10, 0) == 10.0


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
    s = Scheduler(BlockManager(4, 4), max_num_seqs=8, token_budget=64, micro_batches=1, num_stages=2)
    first, second = seq("first", 8, max_tokens=20), seq("second", 8, max_tokens=20)
    s.add(first)
    s.add(second)
    mb = s.schedule()
    assert s.schedule() is None         # a lookahead needs a 3rd block each and never preempts
    s.complete(mb, [9, 9], None)        # both hold 2 blocks (8 prompt tokens each): the pool is full
    mb = s.schedule()                   # each needs a 3rd block for its 9th token: "second" is preempted
    assert ids(mb) == ["first"]
    assert second.status is Status.WAITING and second.num_computed == 0 and s.num_preemptions == 1
    assert list(s.waiting) == [second] and second.output_ids == [9]
    s.complete(mb, [9], None)


def test_abort_in_flight_frees_blocks_when_the_last_step_returns():
    blocks = BlockManager(8, 4)
    s = Scheduler(blocks, max_num_seqs=8, token_budget=64, micro_batches=1, num_stages=1)
    x = seq("x", 6)
    s.add(x)
    first, second = s.schedule(), s.schedule()
    s.abort(x)
    assert blocks.num_free == 6           # still in flight: a stage may be writing its K/V
    s.complete(first, [5], None)
    assert blocks.num_free == 6
    s.complete(second, [5], None)
    assert blocks.num_free == 8 and x.output_ids == []
