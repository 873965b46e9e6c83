"""Pipeline stages cut from a plain model, torchtitan-style: delete what the stage does not own.

Stage 0 keeps the embedding, the last stage the final norm and lm_head, every
stage its contiguous range of layers (keyed by global index, so names and KV
caches stay those of the full model).
"""
from __future__ import annotations

import torch

from raypp.model.config import ModelConfig
from raypp.model.llama import Transformer
from raypp.layout import Layout
from raypp.parallel.tp import AllReduce, apply_tp


def keep_stage(model: Transformer, layers: range, first: bool, last: bool) -> Transformer:
    for key in list(model.layers):
        if int(key) not in layers:
            del model.layers[key]
    if not first:
        model.embed_tokens = None
    if not last:
        model.norm = None
        model.lm_head = None
    return model


def build_stage_module(cfg: ModelConfig, layout: Layout, stage: int, tp_rank: int,
                       all_reduce: AllReduce | None = None) -> Transformer:
    """The (stage, tp_rank) shard of the model, on the meta device, ready for `load_weights`."""
    with torch.device("meta"):
        model = Transformer(cfg)
    keep_stage(model, layout.layers_of(stage), first=stage == 0, last=stage == layout.pp - 1)
    return apply_tp(model, tp_rank, layout.tp, all_reduce)
