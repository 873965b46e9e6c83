"""Model shapes: from a Hugging Face `config.json` or a named preset.

Only the Llama family's shape matters here (GQA attention, gated MLP, RMSNorm):
parameter count, bytes of KV cache per token and FLOPs per token all follow
from eight integers.  Presets copy the published `config.json` of each model;
raypp's own (`tiny`, `small`, `1b`) and local checkpoints go through the model's
own parser (`raypp.model.config.ModelConfig`), so there is one reading of a config.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from raypp.errors import UserError
from raypp.model import tiny
from raypp.model.config import ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    head_dim: int = 0          # 0: hidden // heads
    max_position: int = 4096
    qkv_bias: bool = False     # Qwen2 has biases on q/k/v

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer: q,k,v,o projections, gated MLP, two norms."""
        q, kv = self.heads * self.hd, self.kv_heads * self.hd
        attn = self.hidden * (q + 2 * kv) + q * self.hidden + ((q + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """lm_head (+ final norm).  Tied weights still cost a matmul, and a copy on
        the last stage when it is not also the first."""
        return self.vocab * self.hidden + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embed_params + (
            self.hidden if self.tied else self.head_params)

    def kv_bytes_per_token(self, kv_bytes: float) -> float:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.hd * kv_bytes

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs for one token attending to `context` earlier tokens:
        2 per weight of every matmul (embedding lookup is free) + QK^T and AV."""
        matmul = self.layers * (self.layer_params - 2 * self.hidden) + self.vocab * self.hidden
        return 2 * matmul + 4 * self.layers * self.heads * self.hd * context


PRESETS: dict[str, ModelSpec] = {m.name: m for m in [
    # meta-llama/Llama-2-*-hf config.json
    ModelSpec("llama-2-7b", 4096, 32, 32, 32, 11008, 32000),
    ModelSpec("llama-2-13b", 5120, 40, 40, 40, 13824, 32000),
    ModelSpec("llama-2-70b", 8192, 80, 64, 8, 28672, 32000),
    # meta-llama/Meta-Llama-3-* and Llama-3.1-* config.json (3.1 only raises max_position)
    ModelSpec("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, max_position=8192),
    ModelSpec("llama-3-70b", 8192, 80, 64, 8, 28672, 128256, max_position=8192),
    ModelSpec("llama-3.1-8b", 4096, 32, 32, 8, 14336, 128256, max_position=131072),
    ModelSpec("llama-3.1-70b", 8192, 80, 64, 8, 28672, 128256, max_position=131072),
    ModelSpec("llama-3.1-405b", 16384, 126, 128, 8, 53248, 128256, max_position=131072),
    # mistralai/Mistral-7B-v0.1, Qwen/Qwen2-72B config.json
    ModelSpec("mistral-7b", 4096, 32, 32, 8, 14336, 32000, max_position=32768),
    ModelSpec("qwen2-72b", 8192, 80, 64, 8, 29568, 152064, max_position=32768, qkv_bias=True),
]}

_ALIASES = {"llama-3-405b": "llama-3.1-405b", "llama-3.3-70b": "llama-3.1-70b",
            "llama-3.2-8b": "llama-3.1-8b", "mistral-7b-v0.1": "mistral-7b", "mistral-7b-v0.2": "mistral-7b",
            "mistral-7b-v0.3": "mistral-7b", "qwen-2-72b": "qwen2-72b", "qwen2.5-72b": "qwen2-72b"}


def normalize_name(name: str) -> str:
    """'meta-llama/Meta-Llama-3-70B-Instruct' -> 'llama-3-70b'; 'Llama3.1_405B' -> 'llama-3.1-405b'."""
    n = name.strip().lower().split("/")[-1].replace("_", "-").replace(" ", "-")
    n = re.sub(r"^meta-", "", n)
    n = re.sub(r"-(instruct|chat|hf|base)\b", "", n)
    n = re.sub(r"^llama(\d)", r"llama-\1", n)
    return _ALIASES.get(n, n)


def from_hf_config(path: str | Path) -> ModelSpec:
    """Shapes of a local checkpoint, read by the model's own parser (`raypp.model.config`), so
    the planner accepts exactly the configs the runtime runs and rejects the rest alike."""
    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read model config {cfg_path}: {e}") from None
    try:
        c = ModelConfig.from_hf(raw, source=str(cfg_path))
    except KeyError as e:
        raise UserError(f"{cfg_path} lacks {e}: only Llama-family configs are understood") from None
    return _spec(p.name if p.is_dir() else p.parent.name, c)


def _spec(name: str, c: ModelConfig) -> ModelSpec:
    return ModelSpec(name=name, hidden=c.hidden_size, layers=c.num_layers, heads=c.num_heads,
                     kv_heads=c.num_kv_heads, intermediate=c.intermediate_size, vocab=c.vocab_size,
                     tied=c.tie_word_embeddings, head_dim=c.head_dim, max_position=c.max_position_embeddings,
                     qkv_bias=c.qkv_bias)


# raypp's own deterministic checkpoints: the config.json `raypp make-tiny` writes, through the same parser.
PRESETS.update({name: _spec(name, ModelConfig.from_hf(tiny.make_config(name, p["vocab_size"])))
                for name, p in tiny.PRESETS.items()})


def get_model(name_or_path: str) -> ModelSpec:
    """A preset by (any usual spelling of) its name, or a local HF checkpoint dir / config.json."""
    if Path(name_or_path).exists():
        return from_hf_config(name_or_path)
    key = normalize_name(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    raise UserError(f"unknown model {name_or_path!r}; known: {', '.join(PRESETS)}, "
                    f"or a path to a Hugging Face config.json / checkpoint directory")
