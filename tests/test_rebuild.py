"""A dead or stalled worker costs a pause, not an error: the engine rebuilds the pipeline and
every unfinished request resumes from its prompt + the tokens already streamed."""
import asyncio
import os
import signal

import pytest
import ray

from raypp.config import DeploymentConfig
from raypp.model.config import ModelConfig
from raypp.model.sampling_params import SamplingParams
from raypp.runtime.engine import Engine, EngineDeadError
from tests.reference import all_blocks_free, greedy, random_prompts
from tests.test_ray_runtime import live_actors, live_groups

LENGTHS = [5, 17, 9, 30, 12, 3]
NEW = 24


def config(ckpt, **parallel):
    return DeploymentConfig.model_validate({
        "model": {"path": str(ckpt)},
        "parallel": {"device": "cpu", "pp": 2, "placement_timeout_s": 120, "max_rebuilds": 2, **parallel},
        "scheduler": {"num_kv_blocks": 128}})


def params(i):
    return greedy(NEW) if i % 2 else SamplingParams(max_tokens=NEW, temperature=0.9, top_k=30, seed=9 + i,
                                                    ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    return random_prompts(ModelConfig.from_dir(tiny_ckpt).vocab_size, LENGTHS, seed=4)


@pytest.fixture(scope="module")
def undisturbed(tiny_ckpt, prompts):
    engine = Engine.from_config(config(tiny_ckpt, pp=1))
    try:
        return run_with_fault(engine, prompts, None)
    finally:
        engine.shutdown()


def run_with_fault(engine, prompts, fault):
    """Every prompt at once; `fault(engine)` once every stream has 4 tokens.  Returns each stream's
    outputs (the list of new ids of every output), so a duplicated or missing token shows."""
    async def main():
        got = [[] for _ in prompts]
        started = asyncio.Event()

        async def one(i):
            async for out in engine.generate(prompts[i], params(i)):
                got[i].append(out.new_token_ids)
                if all(len(g) >= 4 for g in got):
                    started.set()
        tasks = asyncio.gather(*[one(i) for i in range(len(prompts))])
        if fault:
            await asyncio.wait_for(started.wait(), 120)
            fault(engine)
        await asyncio.wait_for(tasks, 300)
        return got
    return asyncio.run(main())


def tokens(streams):
    return [[t for out in s for t in out] for s in streams]


def test_a_killed_worker_is_replaced_and_every_stream_resumes_identically(local_ray, tiny_ckpt, prompts, undisturbed):
    engine = Engine.from_config(config(tiny_ckpt))
    try:
        first = list(engine.executor.actors)
        got = run_with_fault(engine, prompts, lambda e: ray.kill(e.executor.actors[1]))
        assert tokens(got) == tokens(undisturbed)
        assert all(len(t) == NEW for t in tokens(got))
        assert engine.rebuilds == 1 and engine.error is None
        assert not set(engine.executor.actors) & set(first)
        assert all_blocks_free(engine)
        asyncio.run(engine.check_health())
    finally:
        engine.shutdown()
    assert not live_actors() and not live_groups()


def test_a_stalled_worker_hits_the_step_timeout_and_is_replaced(local_ray, tiny_ckpt, prompts, undisturbed):
    engine = Engine.from_config(config(tiny_ckpt, step_timeout_s=5))
    try:
        pid = engine.executor.worker_info[0]["pid"]
        got = run_with_fault(engine, prompts, lambda e: os.kill(pid, signal.SIGSTOP))
        assert tokens(got) == tokens(undisturbed)
        assert engine.rebuilds == 1
    finally:
        engine.shutdown()
    assert not live_actors() and not live_groups()


def test_after_max_rebuilds_the_engine_is_dead_for_good(local_ray, tiny_ckpt, prompts):
    engine = Engine.from_config(config(tiny_ckpt, max_rebuilds=1))
    try:
        def kill_twice(e):
            ray.kill(e.executor.actors[0])

            async def again():
                while e.rebuilds < 1 or e.rebuilding:
                    await asyncio.sleep(0.05)
                ray.kill(e.executor.actors[1])
            asyncio.ensure_future(again())
        with pytest.raises(EngineDeadError):
            run_with_fault(engine, prompts, kill_twice)
        with pytest.raises(EngineDeadError):
            asyncio.run(engine.check_health())
    finally:
        engine.shutdown()
    assert not live_actors() and not live_groups()


def test_a_worker_found_dead_by_the_health_check_is_replaced_while_idle(local_ray, tiny_ckpt, prompts, undisturbed):
    engine = Engine.from_config(config(tiny_ckpt))
    try:
        ray.kill(engine.executor.actors[0])

        async def main():
            await engine.check_health()          # the ping fails: a rebuild starts, health stays up
            for _ in range(600):
                if engine.rebuilds == 1 and not engine.rebuilding:
                    break
                await asyncio.sleep(0.1)
            await engine.check_health()
        asyncio.run(main())
        assert engine.rebuilds == 1
        assert tokens(run_with_fault(engine, prompts, None)) == tokens(undisturbed)
    finally:
        engine.shutdown()
    assert not live_actors() and not live_groups()
