"""Llama-family architecture hyper-parameters, read from a Hugging Face config.json.

Llama, Llama-3 (rope_scaling "llama3"), Mistral and Qwen2 share one computation
graph; they differ only in the fields below (Qwen2 adds biases to q/k/v; Mistral
may set a sliding window).  A field raypp cannot honour is an error naming it,
never silently ignored: a silently wrong model is the worst kind of bug.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from raypp.errors import CheckpointError

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_ROPE = {None, "default", "llama3", "linear"}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: no config.json; point model.path at a Hugging Face checkpoint "
                                  f"directory (or set model.make_tiny_if_missing)")
        return cls.from_hf(json.loads(cfg_file.read_text()), source=str(cfg_file))

    @classmethod
    def from_hf(cls, c: dict, source: str = "config.json") -> "ModelConfig":
        archs = c.get("architectures") or []
        arch = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
        if arch is None:
            raise CheckpointError(f"{source}: architectures={archs} is not supported; raypp runs "
                                  f"{sorted(SUPPORTED)}")
        if c.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act={c['hidden_act']!r} cannot be honoured; raypp's MLP is SwiGLU (silu)")
        # transformers >= 5 writes `rope_parameters` (theta + scaling in one dict).
        rope_params = c.get("rope_parameters") or {}
        rope_scaling = c.get("rope_scaling") or (rope_params if rope_params.get("rope_type") not in (None, "default")
                                                 else None)
        rope_type = rope_scaling and (rope_scaling.get("rope_type") or rope_scaling.get("type"))
        if rope_type not in SUPPORTED_ROPE:
            raise CheckpointError(f"{source}: rope_scaling type {rope_type!r} is not supported; "
                                  f"supported: llama3, linear, or none")
        max_pos = int(c.get("max_position_embeddings", 2048))
        window = c.get("sliding_window") if c.get("use_sliding_window", arch == "mistral") else None
        if window is not None and window < max_pos:
            raise CheckpointError(f"{source}: sliding_window={window} < max_position_embeddings={max_pos} "
                                  f"cannot be honoured (raypp attends to the full context); "
                                  f"set sliding_window to null or at least {max_pos}")
        if c.get("mlp_bias"):
            raise CheckpointError(f"{source}: mlp_bias=true is not supported")
        heads = int(c["num_attention_heads"])
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(c.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
            rope_scaling=rope_scaling if rope_type not in (None, "default") else None,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(c.get("attention_bias", False)),
            dtype=str(c.get("torch_dtype") or c.get("dtype") or "float32"),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
