"""The pipeline on real Ray actors: sampled ids return from the last stage to stage 0 without
the driver, and each sequence's next step is queued before its token is seen.

Every run is checked against the in-process engine (each request alone, or the same seeded
batch), so a token taken from the wrong step, a placeholder filled from the wrong row, or a
token emitted after its sequence finished shows up as a difference."""
import asyncio
import json
import shutil

import pytest
import torch

from raypp.config import DeploymentConfig
from raypp.model.config import ModelConfig
from raypp.model.sampling_params import SamplingParams
from raypp.runtime.engine import Engine
from tests.reference import all_blocks_free, collect, greedy, hf_model, random_prompts, run_each

N = 64


def max_tokens(i: int) -> int:
    return 3 + i % 9   # requests finish at different steps, while others' steps are in flight


def sampled(i: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=100 + i, **kw)


def config(ckpt, pp=1, **scheduler):
    return DeploymentConfig.model_validate({
        "model": {"path": str(ckpt)}, "parallel": {"device": "cpu", "pp": pp, "placement_timeout_s": 120},
        "scheduler": {"num_kv_blocks": 512, **scheduler}})


def gather(engine, prompts, params):
    async def main():
        return await asyncio.gather(*[collect(engine, p, q) for p, q in zip(prompts, params)])
    return asyncio.run(main())


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    lengths = torch.randint(1, 40, (N,), generator=torch.Generator().manual_seed(5)).tolist()
    return random_prompts(ModelConfig.from_dir(tiny_ckpt).vocab_size, lengths, seed=21)


@pytest.fixture(scope="module")
def reference(tiny_ckpt, prompts):
    """In process: each greedy request alone, and the seeded sampled batch."""
    engine = Engine.from_config(config(tiny_ckpt))
    try:
        alone = [asyncio.run(collect(engine, p, greedy(max_tokens(i)))) for i, p in enumerate(prompts)]
        samples = gather(engine, prompts[:16], [sampled(i) for i in range(16)])
    finally:
        engine.shutdown()
    return alone, samples


@pytest.fixture(scope="module", params=[2, 4], ids=["pp2", "pp4"])
def engine(request, local_ray, tiny_ckpt):
    engine = Engine.from_config(config(tiny_ckpt, pp=request.param))
    steps = []
    submit = engine.executor.submit

    def spy(step):
        steps.append(step)
        return submit(step)
    engine.executor.submit = spy
    engine.steps_seen = steps
    yield engine
    engine.shutdown()


def test_64_concurrent_requests_match_one_at_a_time(engine, prompts, reference):
    alone, _ = reference
    assert gather(engine, prompts, [greedy(max_tokens(i)) for i in range(N)]) == alone
    assert all_blocks_free(engine) and engine.stats().running == 0
    # Most decode steps went out before the driver had seen their input tokens.
    with_placeholders = [s for s in engine.steps_seen if s.placeholders]
    assert len(with_placeholders) > len(engine.steps_seen) / 2


def test_seeded_sampling_matches_the_in_process_engine(engine, prompts, reference):
    _, samples = reference
    assert gather(engine, prompts[:16], [sampled(i) for i in range(16)]) == samples


def test_stop_ids_and_max_tokens_hit_while_later_steps_are_in_flight(engine, prompts, reference):
    alone, _ = reference
    params, expect = [], []
    for i, ref in enumerate(alone[:24]):
        stop = ref[1]   # the second token ends the request; its next step is already queued
        params.append(SamplingParams(max_tokens=max_tokens(i), temperature=0, stop_token_ids=[stop], ignore_eos=True))
        expect.append(ref[: ref.index(stop) + 1])
    assert gather(engine, prompts[:24], params) == expect
    assert all_blocks_free(engine)


def test_abort_while_the_next_step_is_queued_leaves_others_intact(engine, prompts, reference):
    alone, _ = reference

    async def main():
        others = [asyncio.ensure_future(collect(engine, p, greedy(max_tokens(i)))) for i, p in enumerate(prompts[:12])]
        victim = engine.generate(prompts[20], greedy(300), request_id="victim")
        seen = [await victim.__anext__() for _ in range(3)]
        engine.abort("victim")
        rest = [out async for out in victim]
        return seen, rest, await asyncio.gather(*others)

    seen, rest, others = asyncio.run(main())
    assert [o.new_token_ids for o in seen] == [[t] for t in alone[20][:3]]
    assert len(rest) == 1 and rest[0].finish_reason == "abort" and rest[0].new_token_ids == []
    assert others == alone[:12]
    assert "victim" not in engine.blocks.tables


def test_logprobs_are_transformers_log_softmax(engine, tiny_ckpt, prompts):
    prompt = prompts[3]

    async def main():
        return [o async for o in engine.generate(prompt, SamplingParams(
            max_tokens=5, temperature=0, logprobs=True, ignore_eos=True))]
    outs = asyncio.run(main())
    ids = outs[-1].token_ids
    got = [lp for o in outs for lp in o.new_logprobs]
    with torch.inference_mode():
        logits = hf_model(tiny_ckpt)(torch.tensor([prompt + ids])).logits[0].float()
    expect = torch.log_softmax(logits, -1)[len(prompt) - 1: -1].gather(1, torch.tensor(ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(got), expect, atol=1e-4)


@pytest.fixture(scope="module")
def eos_ckpt(tmp_path_factory, tiny_ckpt, prompts, reference):
    """The tiny checkpoint with EOS set to the third token greedy decoding of prompt 0 emits."""
    alone, _ = reference
    path = tmp_path_factory.mktemp("ckpt") / "tiny-eos"
    shutil.copytree(tiny_ckpt, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = alone[0][2]
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("pp", [1, 2])
def test_eos_ends_the_request_and_the_step_behind_it_is_dropped(local_ray, eos_ckpt, prompts, reference, pp):
    alone, _ = reference
    eos = alone[0][2]
    engine = Engine.from_config(config(eos_ckpt, pp=pp))
    try:
        async def main():
            return [o async for o in engine.generate(prompts[0], SamplingParams(max_tokens=8, temperature=0))]
        outs = asyncio.run(main())
        assert outs[-1].token_ids == alone[0][: alone[0].index(eos) + 1]
        assert outs[-1].finish_reason == "stop" and sum(len(o.new_token_ids) for o in outs) == len(outs[-1].token_ids)
        assert all_blocks_free(engine)
    finally:
        engine.shutdown()


def test_every_stage_runs_each_step_once_in_order(engine, prompts):
    before = [st.steps for st in engine.stats().stages]
    sent = len(engine.steps_seen)
    run_each(engine, prompts[:2], greedy(4))
    ids = [s.step_id for s in engine.steps_seen[sent:]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [st.steps - b for st, b in zip(engine.stats().stages, before)] == [len(ids)] * len(before)


def test_an_unbalanced_split_logs_the_stage_layers_that_balance_it(local_ray, small_ckpt, caplog):
    engine = Engine.from_config(DeploymentConfig.model_validate({
        "model": {"path": str(small_ckpt)}, "scheduler": {"num_kv_blocks": 64},
        "parallel": {"device": "cpu", "pp": 2, "stage_layers": [1, 7], "placement_timeout_s": 120}}))
    try:
        prompts = random_prompts(ModelConfig.from_dir(small_ckpt).vocab_size, [16] * 8, seed=2)
        gather(engine, prompts, [greedy(8)] * 8)
        with caplog.at_level("WARNING", logger="raypp"):
            engine._check_stage_balance()
        assert "pipeline stages are unbalanced" in caplog.text
        split = engine._suggested_split
        assert split is not None and sum(split) == 8 and max(split) - min(split) <= 2, split
    finally:
        engine.shutdown()
