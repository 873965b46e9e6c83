"""Load a worker's shard of a Hugging Face safetensors checkpoint.

Each worker reads only the tensors of its pipeline stage and, of those, only the
slice its tensor-parallel rank owns (safetensors `get_slice`, which reads the
bytes of that slice from the memory-mapped file).  The slice a parameter needs
is attached to it by the sharding code as `param.shard = (dim, start, stop)`.
Single-file (`model.safetensors`) and sharded (`model.safetensors.index.json`)
checkpoints read the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from raypp.errors import CheckpointError
from raypp.model.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints saved this buffer; we recompute it


def resolve_dtype(requested: str, cfg: ModelConfig, device: str) -> torch.dtype:
    name = cfg.dtype if requested == "auto" else requested
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    if device == "cpu" and name == "float16" and requested == "auto":
        return torch.float32  # CPU fp16 matmuls are slow and partly missing; bf16/fp32 are not
    if device == "cuda" and name == "float32" and requested == "auto":
        return torch.bfloat16  # decode reads every weight once per token: half the bytes, tensor cores
    return DTYPES[name]


class CheckpointReader:
    """Name -> file map of a checkpoint, with sliced reads and a count of bytes read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            self.files = {name: self.path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise CheckpointError(f"{self.path}: neither model.safetensors nor model.safetensors.index.json "
                                  f"found (raypp reads safetensors only; convert .bin checkpoints first)")
        self._open: dict[Path, object] = {}
        self.bytes_read = 0

    def names(self) -> set[str]:
        return set(self.files)

    def read(self, name: str, shard: tuple[int, int, int] | None = None) -> torch.Tensor:
        file = self.files[name]
        if file not in self._open:
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in the index for {name!r} but missing")
            self._open[file] = safe_open(file, framework="pt")
        sl = self._open[file].get_slice(name)
        if shard is None:
            t = sl[:]
        else:
            dim, start, stop = shard
            t = sl[start:stop] if dim == 0 else sl[:, start:stop]
        self.bytes_read += t.numel() * t.element_size()
        return t


def checkpoint_name(name: str, cfg: ModelConfig) -> str:
    """Our parameter name -> the checkpoint's (Hugging Face's) name."""
    if name == "lm_head.weight":
        return "model.embed_tokens.weight" if cfg.tie_word_embeddings else name
    return "model." + name


def expected_names(cfg: ModelConfig) -> set[str]:
    with torch.device("meta"):
        from raypp.model.llama import Transformer
        names = {checkpoint_name(n, cfg) for n, _ in Transformer(cfg).named_parameters()}
    return names


def check_names(reader: CheckpointReader, cfg: ModelConfig) -> None:
    present = {n for n in reader.names() if not n.endswith(IGNORED_SUFFIXES)}
    expected = expected_names(cfg)
    missing, extra = sorted(expected - present), sorted(present - expected)
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some tied checkpoints store the copy anyway
    if missing:
        raise CheckpointError(f"{reader.path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                              f"({len(missing)} in all) for a {cfg.num_layers}-layer {cfg.architecture} model")
    if extra:
        raise CheckpointError(f"{reader.path}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                              f"({len(extra)} in all): config.json does not describe this checkpoint")


def load_weights(model: nn.Module, path: str | Path, dtype: torch.dtype, device: str = "cpu",
                 progress: bool = False) -> int:
    """Materialise every parameter of `model` (usually built on the meta device); returns bytes read."""
    cfg: ModelConfig = model.cfg
    reader = CheckpointReader(path)
    check_names(reader, cfg)
    params = list(model.named_parameters())
    for name, param in tqdm(params, desc="loading weights", unit="tensor", disable=not progress):
        t = reader.read(checkpoint_name(name, cfg), getattr(param, "shard", None))
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: tensor {checkpoint_name(name, cfg)} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(param.shape)} from config.json")
        owner, _, leaf = name.rpartition(".")
        new = nn.Parameter(t.to(device=device, dtype=dtype).contiguous(), requires_grad=False)
        setattr(model.get_submodule(owner), leaf, new)
    if torch.device(device).type == "cuda":
        model.fuse_projections()
    else:
        model.pack_linears()
    return reader.bytes_read
