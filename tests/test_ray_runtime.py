"""The engine over real Ray actors: TP x PP layouts, placement, failures, bubbles."""
import asyncio
import time

import pytest
import ray

from raypp.config import DeploymentConfig
from raypp.errors import PlacementError
from raypp.model.config import ModelConfig
from raypp.model.sampling_params import SamplingParams
from raypp.runtime.engine import EngineDeadError, Engine
from tests.reference import greedy, random_prompts, run_all

PROMPT_LENGTHS = [4, 12, 7, 30, 18, 9, 25, 2]


def config(ckpt, **parallel):
    scheduler = parallel.pop("scheduler", {})
    return DeploymentConfig.model_validate({
        "model": {"path": str(ckpt)}, "parallel": {"device": "cpu", "placement_timeout_s": 120, **parallel},
        "scheduler": {"num_kv_blocks": 128, **scheduler}})


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    return random_prompts(ModelConfig.from_dir(tiny_ckpt).vocab_size, PROMPT_LENGTHS, seed=11)


@pytest.fixture(scope="module")
def expected(tiny_ckpt, prompts):
    engine = Engine.from_config(config(tiny_ckpt))
    out = run_all(engine, prompts, greedy(6))
    engine.shutdown()
    return out


def live_actors():
    return [a for a in ray._private.state.actors().values() if a["State"] != "DEAD"]


def live_groups():
    return [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]


@pytest.mark.parametrize("tp,pp", [(2, 2), (1, 4)])
def test_layouts_on_ray_match_single_process(local_ray, tiny_ckpt, prompts, expected, tp, pp):
    engine = Engine.from_config(config(tiny_ckpt, tp=tp, pp=pp))
    try:
        assert run_all(engine, prompts, greedy(6)) == expected
        stats = engine.stats()
        assert len(stats.stages) == pp and all(s.steps > 0 for s in stats.stages)
    finally:
        engine.shutdown()
    assert not live_actors() and not live_groups()


def test_tp_ranks_of_one_stage_each_sample_what_one_process_samples(local_ray, tiny_ckpt, prompts):
    """At PP = 1 every TP rank samples for itself instead of receiving rank 0's ids
    (runtime/token_return.py): random sampling over TP=2 draws what one process draws, and a
    rank that drew otherwise would feed its own token and corrupt the next steps."""
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    one = Engine.from_config(config(tiny_ckpt))
    try:
        ref = run_all(one, prompts, params)
    finally:
        one.shutdown()
    engine = Engine.from_config(config(tiny_ckpt, tp=2))
    try:
        assert run_all(engine, prompts, params) == ref
    finally:
        engine.shutdown()


def test_too_many_gpus_fails_within_timeout_naming_the_shortfall(local_ray, tiny_ckpt):
    start = time.monotonic()
    with pytest.raises(PlacementError, match=r"each stage needs one node with CPU=8, GPU=8 free.*GPU=0") as err:
        Engine.from_config(config(tiny_ckpt, tp=8, pp=2, device="cuda", placement_timeout_s=3))
    assert time.monotonic() - start < 30
    assert "placement timed out after 3s" in str(err.value)
    assert not live_actors() and not live_groups()


def test_a_dead_worker_with_no_rebuild_left_fails_requests_instead_of_hanging(local_ray, tiny_ckpt, prompts):
    engine = Engine.from_config(config(tiny_ckpt, tp=1, pp=2, max_rebuilds=0))
    try:
        async def main():
            # The kill comes with the first token, not after a fixed sleep: the tiny model's 400
            # tokens can all stream within a second, and the request then ends before the kill.
            stream = engine.generate(prompts[0], greedy(400))
            await asyncio.wait_for(anext(stream), 60)
            ray.kill(engine.executor.actors[1])

            async def rest():
                async for _ in stream:
                    pass
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(rest(), 60)
        asyncio.run(main())
        with pytest.raises(EngineDeadError):
            asyncio.run(engine.check_health())
    finally:
        engine.shutdown()
    assert not live_actors() and not live_groups()


def bubble_under_load(ckpt, prompts, micro_batches):
    engine = Engine.from_config(config(ckpt, tp=1, pp=2, scheduler={"micro_batches": micro_batches}))
    try:
        run_all(engine, prompts * 2, greedy(16))
        return [s.bubble_ratio for s in engine.stats().stages]
    finally:
        engine.shutdown()


def test_bubble_ratio_reads_half_with_one_micro_batch_and_drops_with_two(local_ray, small_ckpt):
    # The `small` model, so that a stage's step (tens of ms) outweighs the driver's turnaround
    # between micro-batches (a few ms), which no number of micro-batches in flight can hide at m = pp.
    prompts = random_prompts(ModelConfig.from_dir(small_ckpt).vocab_size, PROMPT_LENGTHS, seed=11)
    one = bubble_under_load(small_ckpt, prompts, 1)
    two = bubble_under_load(small_ckpt, prompts, 2)
    assert all(0.3 < b < 0.75 for b in one), one
    assert max(two) < min(one) - 0.1, (one, two)
