"""raypp's model == Hugging Face transformers on the same checkpoint (fp32)."""
import pytest
import torch

from raypp.config import DeploymentConfig
from raypp.model.config import ModelConfig
from raypp.parallel.layout import make_layout
from raypp.runtime.engine import Engine
from raypp.runtime.worker import StageWorker, StepInput
from tests.reference import greedy, hf_greedy, hf_model, random_prompts, run_all, run_each

LENGTHS = [5, 17, 33, 64]
NEW_TOKENS = 64


def prefill_logits(path, prompts):
    cfg = ModelConfig.from_dir(path)
    worker = StageWorker(str(path), "float32", make_layout(cfg, 1, 1), 0, 0, num_blocks=64, block_size=16)
    tables = [[i * 16 + j for j in range(16)] for i in range(len(prompts))]
    lens = [len(p) for p in prompts]
    out = worker.execute(StepInput(token_ids=sum(prompts, []), query_lens=lens, seq_lens=lens,
                                   block_tables=tables, sample_rows=[], all_logits=True))
    return out.logits.split(lens)


@pytest.fixture(scope="module", params=["tiny", "small"])
def ckpt(request):
    return request.getfixturevalue(f"{request.param}_ckpt")


@pytest.fixture(scope="module")
def setup(ckpt):
    cfg = ModelConfig.from_dir(ckpt)
    return cfg, hf_model(ckpt), random_prompts(cfg.vocab_size, LENGTHS)


def test_prefill_logits_batched_match_transformers(ckpt, setup):
    _, hf, prompts = setup
    for ours, prompt in zip(prefill_logits(ckpt, prompts), prompts):
        ref = hf(torch.tensor([prompt])).logits[0]
        assert (ours - ref).abs().max().item() < 1e-4


def test_greedy_tokens_match_transformers_alone_and_batched(ckpt, setup):
    _, hf, prompts = setup
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    # A small token budget forces chunked prefill next to other sequences' decodes.
    engine = Engine.from_config(DeploymentConfig.model_validate({
        "model": {"path": str(ckpt)}, "parallel": {"device": "cpu"},
        "scheduler": {"max_tokens_per_micro_batch": 24, "num_kv_blocks": 64}}))
    try:
        assert run_each(engine, prompts, greedy(NEW_TOKENS)) == expected
        assert run_all(engine, prompts, greedy(NEW_TOKENS)) == expected
        assert engine.stats()["kv_blocks_free"] == 64
    finally:
        engine.shutdown()
