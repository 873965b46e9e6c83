"""The in-process engine: continuous batching, cancellation, preemption, sampling."""
import asyncio

import pytest

from raypp.config import DeploymentConfig
from raypp.errors import UserError
from raypp.model.config import ModelConfig
from raypp.model.sampling_params import SamplingParams
from raypp.runtime.engine import Engine
from raypp.runtime.outputs import QueueFullError
from tests.reference import all_blocks_free, collect, greedy, random_prompts

LENGTHS = [3, 9, 14, 20, 27, 31, 38, 45, 5, 11, 17, 23, 29, 35, 41, 50]


def make_engine(ckpt, **scheduler):
    return Engine.from_config(DeploymentConfig.model_validate(
        {"model": {"path": str(ckpt)}, "parallel": {"device": "cpu"}, "scheduler": scheduler}))


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    return random_prompts(ModelConfig.from_dir(tiny_ckpt).vocab_size, LENGTHS, seed=7)


@pytest.fixture(scope="module")
def alone(tiny_ckpt, prompts):
    engine = make_engine(tiny_ckpt)
    out = [asyncio.run(collect(engine, p, greedy(4 + i))) for i, p in enumerate(prompts)]
    engine.shutdown()
    return out


def run_concurrently(engine, prompts):
    async def main():
        return await asyncio.gather(*[collect(engine, p, greedy(4 + i)) for i, p in enumerate(prompts)])
    return asyncio.run(main())


def test_concurrent_requests_match_each_alone(tiny_ckpt, prompts, alone):
    engine = make_engine(tiny_ckpt, max_tokens_per_micro_batch=64)
    assert run_concurrently(engine, prompts) == alone
    assert all_blocks_free(engine)


def test_small_kv_cache_preempts_and_recomputes_identically(tiny_ckpt, prompts, alone):
    engine = make_engine(tiny_ckpt, num_kv_blocks=12, block_size=8)
    assert run_concurrently(engine, prompts) == alone
    assert engine.stats().preemptions > 0
    assert all_blocks_free(engine)


def test_seeded_sampling_survives_preemption(tiny_ckpt, prompts):
    params = [SamplingParams(max_tokens=6 + i % 5, temperature=0.8, top_k=20, top_p=0.9, seed=50 + i)
              for i in range(len(prompts))]

    def run(engine):
        async def main():
            return await asyncio.gather(*[collect(engine, p, q) for p, q in zip(prompts, params)])
        return asyncio.run(main())
    roomy = make_engine(tiny_ckpt)
    cramped = make_engine(tiny_ckpt, num_kv_blocks=12, block_size=8)
    assert run(cramped) == run(roomy)
    assert cramped.stats().preemptions > 0


def test_max_num_seqs_caps_the_running_set(tiny_ckpt, prompts, alone):
    engine = make_engine(tiny_ckpt, max_num_seqs=3)
    running = []
    submit = engine.executor.submit

    def spy(step):
        running.append(len(engine.scheduler.running))
        return submit(step)
    engine.executor.submit = spy
    assert run_concurrently(engine, prompts) == alone
    assert max(running) == 3


def test_cancel_frees_blocks_and_leaves_others_alone(tiny_ckpt, prompts, alone):
    engine = make_engine(tiny_ckpt)

    async def main():
        others = [asyncio.ensure_future(collect(engine, p, greedy(4 + i))) for i, p in enumerate(prompts[:4])]
        victim = engine.generate(prompts[5], greedy(200), request_id="victim")
        got = [out async for out, _ in zip_n(victim, 3)]
        assert engine.blocks.tables["victim"]
        engine.abort("victim")
        rest = [out async for out in victim]
        assert rest[-1].finished and rest[-1].finish_reason == "abort"
        # Freed as soon as no stage can still be writing them: at most one step later.
        for _ in range(40):
            if "victim" not in engine.blocks.tables:
                break
            await asyncio.sleep(0.05)
        assert "victim" not in engine.blocks.tables
        done = await asyncio.gather(*others)
        return got, done

    got, done = asyncio.run(main())
    assert len(got) == 3
    assert done == alone[:4]
    assert all_blocks_free(engine)
    assert engine.stats().running == 0


async def zip_n(agen, n):
    i = 0
    async for item in agen:
        yield item, i
        i += 1
        if i == n:
            return


def test_closing_the_stream_aborts_the_request(tiny_ckpt, prompts):
    engine = make_engine(tiny_ckpt)

    async def main():
        stream = engine.generate(prompts[0], greedy(500))
        await stream.__anext__()
        await stream.aclose()  # what a disconnected HTTP client does
        await asyncio.sleep(0.2)
    asyncio.run(main())
    assert engine.stats().running == 0
    assert all_blocks_free(engine)


def test_sampling_is_seeded_and_stops(tiny_ckpt, prompts, alone):
    engine = make_engine(tiny_ckpt)
    p = prompts[2]
    run = lambda params: asyncio.run(collect(engine, p, params))  # noqa: E731
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=5, ignore_eos=True)
    assert run(sampled) == run(sampled)
    other = SamplingParams(max_tokens=12, temperature=5.0, seed=6, ignore_eos=True)
    assert run(other) != run(SamplingParams(max_tokens=12, temperature=5.0, seed=7, ignore_eos=True))
    assert run(SamplingParams(max_tokens=6, top_k=1, ignore_eos=True)) == alone[2][:6]
    stop_at = alone[2][3]
    stopped = run(SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[stop_at], ignore_eos=True))
    assert stopped == alone[2][: alone[2].index(stop_at) + 1]


def test_logprobs_and_finish_reasons(tiny_ckpt, prompts):
    engine = make_engine(tiny_ckpt)

    async def main():
        return [o async for o in engine.generate(prompts[1], SamplingParams(
            max_tokens=5, temperature=0, logprobs=True, ignore_eos=True))]
    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 5
    assert all(o.new_logprobs and o.new_logprobs[0] <= 0 for o in outs)


def test_bad_requests_and_a_full_queue(tiny_ckpt, prompts):
    engine = make_engine(tiny_ckpt, max_queue=0)

    async def first(prompt, params):
        async for out in engine.generate(prompt, params):
            return out
    with pytest.raises(UserError, match=r"prompt \(50 tokens\) \+ max_tokens \(5000\) = 5050 exceeds the context length 2048"):
        asyncio.run(first(prompts[-1], greedy(5000)))
    with pytest.raises(UserError, match="outside the vocabulary"):
        asyncio.run(first([10**6], greedy(2)))
    with pytest.raises(QueueFullError):
        asyncio.run(first(prompts[0], greedy(2)))
