"""Checkpoint loading: sharded == single file, per-rank slices, and clear errors."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raypp.errors import CheckpointError, LayoutError
from raypp.model.checkpoint import load_weights
from raypp.model.config import ModelConfig
from raypp.parallel.layout import make_layout
from raypp.parallel.pipeline import build_stage_module
from raypp.runtime.step import StepInput
from raypp.runtime.worker import StageWorker
from tests.reference import random_prompts


def logits_of(path, prompt):
    cfg = ModelConfig.from_dir(path)
    worker = StageWorker(str(path), "float32", make_layout(cfg, 1, 1), 0, 0, num_blocks=8, block_size=16)
    n = len(prompt)
    return worker.execute(StepInput(prompt, [n], [n], [[0, 1, 2, 3]], [], all_logits=True)).logits


def copy_without_weights(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def tensors_of(path):
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_sharded(tensors, dst, parts=3):
    names = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[i::parts]}
        save_file(chunk, dst / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_checkpoint_gives_same_logits(tiny_ckpt, tmp_path):
    dst = copy_without_weights(tiny_ckpt, tmp_path / "sharded")
    write_sharded(tensors_of(tiny_ckpt), dst)
    prompt = random_prompts(ModelConfig.from_dir(tiny_ckpt).vocab_size, [12])[0]
    assert torch.equal(logits_of(dst, prompt), logits_of(tiny_ckpt, prompt))


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_each_tp_rank_reads_its_share_of_layer_weights(tiny_ckpt, tp):
    cfg = ModelConfig.from_dir(tiny_ckpt)
    layout = make_layout(cfg, tp, 1)

    def layer_bytes(model):
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if n.startswith("layers.") and "layernorm" not in n)

    full = build_stage_module(cfg, make_layout(cfg, 1, 1), 0, 0)
    load_weights(full, tiny_ckpt, torch.float32)
    for rank in range(tp):
        shard = build_stage_module(cfg, layout, 0, rank)
        load_weights(shard, tiny_ckpt, torch.float32)
        assert layer_bytes(shard) == pytest.approx(layer_bytes(full) / tp, rel=0.01)


def test_pipeline_stage_reads_only_its_layers(tiny_ckpt):
    cfg = ModelConfig.from_dir(tiny_ckpt)
    layout = make_layout(cfg, 1, 2)
    stage1 = build_stage_module(cfg, layout, 1, 0)
    read = load_weights(stage1, tiny_ckpt, torch.float32)
    assert sorted(int(k) for k in stage1.layers) == list(layout.layers_of(1))
    assert stage1.embed_tokens is None and stage1.lm_head is not None
    assert read == sum(p.numel() * 4 for p in stage1.parameters())


@pytest.mark.parametrize("tp,pp,fragment", [
    (3, 1, "tp=3 does not divide num_attention_heads=16"),
    (32, 1, "tp values that work for this model: [1, 2, 4, 8, 16]"),
    (1, 9, "pp=9 is more stages than the model's 8 layers"),
])
def test_bad_layouts_are_rejected_with_what_works(tiny_ckpt, tp, pp, fragment):
    with pytest.raises(LayoutError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        make_layout(ModelConfig.from_dir(tiny_ckpt), tp, pp)


def test_stage_layers_must_cover_the_model(tiny_ckpt):
    with pytest.raises(LayoutError, match="summing to the model's 8 layers"):
        make_layout(ModelConfig.from_dir(tiny_ckpt), 1, 2, [3, 3])


def test_balanced_split_counts_the_lm_head(small_ckpt):
    # small: vocab x hidden lm_head costs about a third of a layer, so the last stage gets fewer layers
    cfg = ModelConfig.from_dir(small_ckpt)
    layout = make_layout(cfg, 1, 3)
    assert sum(layout.stage_layers) == cfg.num_layers
    assert layout.stage_layers[-1] <= layout.stage_layers[0]


def edited(tiny_ckpt, tmp_path, config_edit=None, tensor_edit=None):
    dst = copy_without_weights(tiny_ckpt, tmp_path / "bad")
    cfg = json.loads((dst / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = tensors_of(tiny_ckpt)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def load(path):
    cfg = ModelConfig.from_dir(path)
    load_weights(build_stage_module(cfg, make_layout(cfg, 1, 1), 0, 0), path, torch.float32)


@pytest.mark.parametrize("config_edit,tensor_edit,fragment", [
    (None, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"), r"missing tensors \['model.layers.3.mlp.up_proj.weight'\]"),
    (None, lambda t: t.update({"model.layers.8.mlp.up_proj.weight": torch.zeros(1)}), "unexpected tensors"),
    (lambda c: c.update(architectures=["GPT2LMHeadModel"]), None, "not supported"),
    (lambda c: c.update(hidden_act="gelu"), None, "hidden_act='gelu' cannot be honoured"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), None, "rope_scaling type 'yarn'"),
    (lambda c: c.update(intermediate_size=1024), None, "has shape"),
    (lambda c: c.update(architectures=["MistralForCausalLM"], sliding_window=512), None, "sliding_window=512"),
])
def test_bad_checkpoints_fail_with_the_name(tiny_ckpt, tmp_path, config_edit, tensor_edit, fragment):
    with pytest.raises(CheckpointError, match=fragment):
        load(edited(tiny_ckpt, tmp_path, config_edit, tensor_edit))


def test_missing_directory_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelConfig.from_dir(tmp_path / "nowhere")


def test_llama3_mistral_qwen2_configs_are_read():
    base = {"vocab_size": 32, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}
    llama3 = ModelConfig.from_hf({**base, "architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0,
                                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                  "eos_token_id": [128001, 128009]})
    assert llama3.rope_scaling["rope_type"] == "llama3" and llama3.eos_token_ids == (128001, 128009)
    qwen2 = ModelConfig.from_hf({**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096,
                                 "use_sliding_window": False})
    assert qwen2.qkv_bias
    mistral = ModelConfig.from_hf({**base, "architectures": ["MistralForCausalLM"], "sliding_window": None})
    assert mistral.architecture == "mistral" and not mistral.qkv_bias
