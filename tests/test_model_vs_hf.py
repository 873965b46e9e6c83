"""raypp's model == Hugging Face transformers on the same checkpoint (fp32)."""
import pytest
import torch

from raypp.config import DeploymentConfig
from raypp.model.config import ModelConfig
from raypp.parallel.layout import make_layout
from raypp.runtime.engine import Engine
from raypp.runtime.step import StepInput
from raypp.runtime.worker import StageWorker
from tests.reference import greedy, hf_greedy, hf_model, random_prompts, run_all, run_each

LENGTHS = [5, 17, 33, 64]
NEW_TOKENS = 64


def prefill_logits(path, prompts):
    cfg = ModelConfig.from_dir(path)
    worker = StageWorker(str(path), "float32", make_layout(cfg, 1, 1), 0, 0, num_blocks=32 * len(prompts), block_size=16)
    tables = [[i * 32 + j for j in range(32)] for i in range(len(prompts))]
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
        # fp32 rounding of two summation orders (oneDNN's packed products, transformers' sgemm):
        # measured up to 5e-6 of the logits' scale at 64 tokens on `small` (2e-6 with sgemm on both).
        assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


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
        assert engine.stats().kv_blocks_free == 64
    finally:
        engine.shutdown()


def _hf_family_checkpoint(kind, out):
    import transformers
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  initializer_range=0.2)
    if kind == "llama3":
        cfg = transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256})
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common, tie_word_embeddings=True), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).float().eval()
    if kind == "qwen2":  # random biases, so that dropping them would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(out, safe_serialization=True)
    return out, model


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "mistral"])
def test_model_families_match_transformers(kind, tmp_path):
    path, hf = _hf_family_checkpoint(kind, tmp_path / kind)
    prompts = random_prompts(300, [40, 300], seed=1)
    for ours, prompt in zip(prefill_logits(path, prompts), prompts):
        ref = hf(torch.tensor([prompt])).logits[0]
        # fp32 rounding of two summation orders (oneDNN's packed products, transformers' sgemm):
        # measured up to 5e-6 of the logits' scale at 64 tokens on `small` (2e-6 with sgemm on both).
        assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
