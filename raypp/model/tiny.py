"""`raypp make-tiny`: a deterministic Llama checkpoint in Hugging Face format, made offline.

No model can be downloaded where raypp is tested, so raypp makes its own: a byte-level
BPE tokenizer trained on the corpus shipped in `raypp/model/corpus/`, and random fp32
weights drawn from one seeded `torch.Generator`.  Same preset and seed give
byte-identical files.  The weights are random but deliberately *peaked*: greedy tests
compare tokens across shardings and against transformers, and near-tied logits would
flip under float reordering.  transformers is not imported here (it is a test-only
dependency); the files follow its Llama layout so that it loads them as they are.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib

from raypp.errors import UserError

CORPUS_DIR = pathlib.Path(__file__).parent / "corpus"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: the trainer adds them first, in this order
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
PAD_ID = UNK_ID  # not eos, so padding can never be mistaken for the end of a sequence
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MAX_POSITIONS = 2048

# HF config names, so a preset can be compared with config.json key by key.  vocab_size is
# the BPE target; the corpus is big enough that the trained tokenizer reaches it exactly.
PRESETS: dict[str, dict] = {
    # Tests: TP up to 8 divides the 16 heads, 8 KV heads and 768 intermediate; ~6.8M params.
    "tiny": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=16, intermediate_size=768, tie_word_embeddings=True, vocab_size=2048),
    # Benchmarks: ~103M params, enough that weight reads (not Python) dominate a decode step.
    "small": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=64, intermediate_size=2816, tie_word_embeddings=False, vocab_size=4096),
    # GPU benchmarks: Llama-3.2-1B's layer shapes (the corpus caps the vocabulary); ~0.99B params.
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               head_dim=64, intermediate_size=8192, tie_word_embeddings=False, vocab_size=4096),
}
DTYPES = ("float32", "bfloat16")

# Init scales, tuned against transformers.  Two forces pull apart: greedy comparisons across
# shardings need clear argmax winners, and the 1e-4 logit comparisons need float error
# (which grows with the logits' size and with how sharply each layer amplifies it) to stay
# small.  RESIDUAL_GAIN scales o_proj/down_proj so attention and MLP outweigh the input
# embedding: else a tied model echoes its input and a broken layer goes unnoticed.  QK_GAIN
# sharpens attention (broad random attention averages the context into one direction and
# greedy text loops on one token); beyond ~2 it amplifies fp32 error past 1e-4 at 64 tokens.
# EMBED_STD and LOGIT_STD set the logits' spread (tied logits are final_hidden . embedding):
# median top-1/top-2 gap ~0.15 of that spread, fp32 error vs transformers <= 4e-5.
# Norm weights are 1 + 0.1*N(0,1) so that a kernel ignoring one changes tokens.
RESIDUAL_GAIN = 6.0
QK_GAIN = 2.0
NORM_JITTER = 0.1
EMBED_STD = 0.25
LOGIT_STD = 8.0


def train_tokenizer(vocab_size: int):
    """Byte-level BPE on the shipped corpus.  Deterministic: files are read in sorted order and
    the full byte alphabet is seeded, so symbol ids never depend on hash-map iteration order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    files = sorted(CORPUS_DIR.glob("*.txt"))
    if not files:
        raise UserError(f"no corpus files in {CORPUS_DIR}; reinstall raypp (package-data model/corpus/*.txt)")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((f.read_text(encoding="utf-8") for f in files), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", BOS_ID)])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID]
    return tok


def make_config(preset: str, vocab_size: int, dtype: str = "float32") -> dict:
    p = PRESETS[preset]
    return {
        **p, "vocab_size": vocab_size,
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "max_position_embeddings": MAX_POSITIONS,
        # rope_theta for transformers 4.x, rope_parameters for 5.x; both say the same.
        "rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
        "torch_dtype": dtype, "dtype": dtype, "initializer_range": 0.02,
        "pretraining_tp": 1, "use_cache": True,
    }


def make_weights(cfg: dict, seed: int, bar=None) -> dict:
    """HF Llama tensor names -> fp32 tensors, drawn in a fixed order from one seeded generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def linear(out_f: int, in_f: int, gain: float = 1.0):  # N(0, gain^2/fan_in): unit-scale outputs
        return torch.randn(out_f, in_f, generator=g) * (gain / math.sqrt(in_f))

    def norm():
        return 1.0 + NORM_JITTER * torch.randn(h, generator=g)

    t = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], h, generator=g) * EMBED_STD}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        t[pre + "input_layernorm.weight"] = norm()
        t[pre + "self_attn.q_proj.weight"] = linear(q_out, h, QK_GAIN)
        t[pre + "self_attn.k_proj.weight"] = linear(kv_out, h)
        t[pre + "self_attn.v_proj.weight"] = linear(kv_out, h)
        t[pre + "self_attn.o_proj.weight"] = linear(h, q_out, RESIDUAL_GAIN)
        t[pre + "post_attention_layernorm.weight"] = norm()
        t[pre + "mlp.gate_proj.weight"] = linear(inter, h)
        t[pre + "mlp.up_proj.weight"] = linear(inter, h)
        t[pre + "mlp.down_proj.weight"] = linear(h, inter, RESIDUAL_GAIN)
        if bar is not None:
            bar.update()
    t["model.norm.weight"] = norm()
    if not cfg["tie_word_embeddings"]:
        # Own rows (no echo bias), scaled so logits spread ~LOGIT_STD: wide enough for clear
        # greedy margins, small enough that fp32 reordering stays far below 1e-4.
        t["lm_head.weight"] = linear(cfg["vocab_size"], h, LOGIT_STD)
    return t


def _write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_checkpoint(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0,
                    progress: bool = False, dtype: str = "float32") -> pathlib.Path:
    """Write the checkpoint into out_dir (created) and return out_dir as a Path.

    The weights are drawn in fp32 whatever `dtype`; "bfloat16" rounds them when writing.
    """
    if preset not in PRESETS:
        raise UserError(f"preset {preset!r} is unknown; use one of: {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is unknown; use one of: {', '.join(DTYPES)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"seed {seed!r} must be an integer >= 0")
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"out {str(out)!r} is a file; give a directory path (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(PRESETS[preset]["vocab_size"])
    cfg = make_config(preset, tok.get_vocab_size(), dtype)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    _write_json(out / "special_tokens_map.json", specials)
    _write_json(out / "tokenizer_config.json", {
        **specials, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False, "add_bos_token": True, "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE})
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", {
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False})

    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    # One step per layer plus one for the write, which takes about as long for `small`.
    with tqdm(total=cfg["num_hidden_layers"] + 1, desc=f"make-tiny {preset}", unit="step",
              disable=not progress) as bar:
        weights = make_weights(cfg, seed, bar)
        if dtype != "float32":
            weights = {name: t.to(getattr(torch, dtype)) for name, t in weights.items()}
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        bar.update()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # No argparse `choices`: a bad preset is reported by make_checkpoint as a one-line UserError.
    parser.add_argument("--preset", default="tiny",
                        help="tiny (~7M params, tests), small (~100M params, CPU benchmarks) or "
                             "1b (~1B params, GPU benchmarks); default tiny")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16 weights")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write (created)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; same seed, same bytes")


def run(args) -> int:
    out = make_checkpoint(args.out, preset=args.preset, seed=args.seed, progress=True, dtype=args.dtype)
    print(f"wrote {args.preset} {args.dtype} checkpoint (seed {args.seed}) to {out}")
    return 0
