"""raypp make-tiny: the deterministic Llama checkpoint every other test runs on.

transformers is the reference reader here: if it loads our files and agrees with the
`tokenizers`-only path the runtime uses, the checkpoint is a real HF Llama checkpoint.
"""
import json
import os

import pytest

from raypp.model import tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def expected_params(p: dict) -> int:
    h, hd, inter, v = p["hidden_size"], p["head_dim"], p["intermediate_size"], p["vocab_size"]
    attn = h * p["num_attention_heads"] * hd * 2 + h * p["num_key_value_heads"] * hd * 2  # q, o + k, v
    layer = attn + 3 * h * inter + 2 * h  # + gate, up, down and two norms
    return v * h * (1 if p["tie_word_embeddings"] else 2) + p["num_hidden_layers"] * layer + h


def test_param_counts_of_presets():
    assert expected_params(tiny.PRESETS["tiny"]) == 6_820_096
    assert 95e6 < expected_params(tiny.PRESETS["small"]) < 110e6
    for p in tiny.PRESETS.values():  # TP up to 8 must split heads, KV heads and the MLP evenly
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            assert p[key] % 8 == 0


def test_files_and_config(tiny_ckpt):
    names = sorted(os.listdir(tiny_ckpt))
    assert names == ["config.json", "generation_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    for key, value in tiny.PRESETS["tiny"].items():
        assert cfg[key] == value, key
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["torch_dtype"], cfg["dtype"], cfg["rope_theta"]) == ("float32", "float32", 10000.0)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    assert json.loads((tiny_ckpt / "generation_config.json").read_text())["do_sample"] is False


def test_safetensors_names_and_dtype(tiny_ckpt):
    from safetensors import safe_open

    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
        assert {str(f.get_tensor(n).dtype) for n in names} == {"torch.float32"}
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    want = {f"model.layers.{i}.{n}.weight" for i in range(8) for n in per_layer}
    assert names == want | {"model.embed_tokens.weight", "model.norm.weight"}  # tied: no lm_head


def test_loads_in_transformers(tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == expected_params(tiny.PRESETS["tiny"])
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 8
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_logits_are_peaked_and_prompt_dependent(tiny_ckpt):
    """Greedy tests across shardings need clear argmax winners, and varied outputs."""
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_ckpt).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_ckpt)
    gaps, continuations = [], set()
    with torch.no_grad():
        for prompt in ["Hello, my name is", "The scheduler retries", "Bread needs flour", "1 2 3"]:
            ids = tok(prompt, return_tensors="pt").input_ids
            for _ in range(12):  # greedy, no KV cache: plain forwards are quicker than generate() here
                logits = model(ids).logits[0]
                ids = torch.cat([ids, logits[-1].argmax().view(1, 1)], dim=1)
            top2 = logits.topk(2, dim=-1).values
            # Relative to the logits' spread: what float error is compared against.
            gaps.append((top2[:, 0] - top2[:, 1]) / logits.std(dim=-1))
            continuations.add(tuple(ids[0, -12:].tolist()))
    gaps = torch.cat(gaps)
    assert gaps.median() > 0.12 and (gaps > 0.05).float().mean() > 0.7
    assert len(continuations) == 4


def test_tokenizer_round_trip_and_specials(tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_ckpt)
    assert len(tok) == tiny.PRESETS["tiny"]["vocab_size"]
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    for text in ["Hello world", "  two  spaces\nand a newline\t", "naïve café — 42 ✓", "KV-cache blocks: 16"]:
        ids = tok(text).input_ids
        assert ids[0] == 1 and ids[1] != 1  # one <s>, from the post-processor
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("the scheduler", add_special_tokens=False).input_ids != []


def test_chat_template_in_transformers_and_tokenizers_jinja(tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    import jinja2
    from tokenizers import Tokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    want = "<s><|system|>\nBe brief.</s>\n<|user|>\nHi!</s>\n<|assistant|>\n"
    tok = transformers.AutoTokenizer.from_pretrained(tiny_ckpt)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    # The runtime path: tokenizers + jinja2, no transformers; both must give the same ids.
    cfg = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    rendered = jinja2.Environment().from_string(cfg["chat_template"]).render(
        messages=messages, add_generation_prompt=True, bos_token=cfg["bos_token"], eos_token=cfg["eos_token"])
    assert rendered == want
    fast = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    ids = fast.encode(rendered, add_special_tokens=False).ids
    assert ids == tok(want, add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids.count(2) == 2  # <s> and </s> are matched as special tokens in text


def test_same_seed_same_bytes_other_seed_other_weights(tiny_ckpt, tmp_path):
    again = tiny.make_checkpoint(tmp_path / "again", preset="tiny", seed=0)
    other = tiny.make_checkpoint(tmp_path / "other", preset="tiny", seed=1)
    assert again == tmp_path / "again"
    for name in os.listdir(tiny_ckpt):
        assert (again / name).read_bytes() == (tiny_ckpt / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_ckpt / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_ckpt / "tokenizer.json").read_bytes()


def test_cli_make_tiny(tmp_path, capsys):
    from raypp.cli import main

    assert main(["make-tiny", "--preset", "tiny", "--out", str(tmp_path / "ck")]) == 0
    assert (tmp_path / "ck" / "model.safetensors").is_file()
    assert str(tmp_path / "ck") in capsys.readouterr().out


@pytest.mark.parametrize("argv, field", [
    (["--preset", "huge"], "preset"),
    (["--seed", "-3"], "seed"),
    (["--out-is-file"], "out"),
])
def test_cli_bad_arguments_one_line(tmp_path, capsys, argv, field):
    from raypp.cli import main

    out = tmp_path / "dir"
    if argv == ["--out-is-file"]:
        out, argv = tmp_path / "a_file", []
        out.write_text("not a directory")
    assert main(["make-tiny", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("raypp make-tiny: error:") and field in err
    assert "tiny" in err or field != "preset"  # the fix: the presets that exist
