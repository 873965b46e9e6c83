"""Tensor parallelism applied to a plain model from outside (Megatron-style).

Column-parallel q/k/v and gate/up (each rank owns a slice of heads or of the
intermediate dimension), row-parallel o and down (each rank owns the matching
input slice and produces a partial sum), so one all-reduce after attention and
one after the MLP restore the full activations.  The lm_head is split by vocabulary
(each rank computes the logits of its slice of the vocabulary); one more
all-reduce of the zero-padded slices gathers the whole row, exactly (x + 0 = x),
on the existing collective.  Replicated, the head of a 32k vocabulary is a quarter
of a 160M model's weight bytes, read by every rank on every step.  KV heads are split when there
are at least as many as ranks and replicated otherwise (rank r then uses the KV
head its query heads are grouped with).

Sharding happens on the meta device before loading: each parameter is replaced
by one of the local shape, tagged `.shard = (dim, start, stop)` so the loader
reads just that slice from the checkpoint.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from raypp.model.llama import Transformer

AllReduce = Callable[[torch.Tensor], None]


def _narrow(linear: nn.Linear, dim: int, start: int, stop: int) -> nn.Linear:
    out_f, in_f = linear.weight.shape
    shape = (stop - start, in_f) if dim == 0 else (out_f, stop - start)
    new = nn.Linear(shape[1], shape[0], bias=linear.bias is not None, device="meta")
    new.weight.shard = (dim, start, stop)
    if new.bias is not None:
        new.bias.shard = (0, start, stop) if dim == 0 else None
    return new


def _all_reduce_hook(all_reduce: AllReduce):
    def hook(_module, _inputs, output):
        all_reduce(output)
        return output
    return hook


def _gather_vocab(local: torch.Tensor, all_reduce: AllReduce, vocab: int, start: int) -> torch.Tensor:
    """This rank's logits [rows, its slice] -> every rank's [rows, vocab]."""
    full = local.new_zeros(local.shape[0], vocab)
    full[:, start:start + local.shape[1]] = local
    all_reduce(full)
    return full


def apply_tp(model: Transformer, rank: int, size: int, all_reduce: AllReduce | None = None) -> Transformer:
    """Shards `model` for TP rank `rank` of `size`; `all_reduce` sums a tensor in place over the TP
    group (torch.distributed's, or parallel/shm_allreduce.py's on one host)."""
    cfg, hd = model.cfg, model.cfg.head_dim
    q_per_rank = cfg.num_heads // size
    if cfg.num_kv_heads >= size:
        kv_per_rank, kv_first = cfg.num_kv_heads // size, rank * (cfg.num_kv_heads // size)
    else:
        kv_per_rank, kv_first = 1, rank * q_per_rank // (cfg.num_heads // cfg.num_kv_heads)
    inter = cfg.intermediate_size // size
    for block in model.layers.values():
        attn, mlp = block.self_attn, block.mlp
        q = (rank * q_per_rank * hd, (rank + 1) * q_per_rank * hd)
        kv = (kv_first * hd, (kv_first + kv_per_rank) * hd)
        attn.q_proj = _narrow(attn.q_proj, 0, *q)
        attn.k_proj = _narrow(attn.k_proj, 0, *kv)
        attn.v_proj = _narrow(attn.v_proj, 0, *kv)
        attn.o_proj = _narrow(attn.o_proj, 1, *q)
        mlp.gate_proj = _narrow(mlp.gate_proj, 0, rank * inter, (rank + 1) * inter)
        mlp.up_proj = _narrow(mlp.up_proj, 0, rank * inter, (rank + 1) * inter)
        mlp.down_proj = _narrow(mlp.down_proj, 1, rank * inter, (rank + 1) * inter)
        if size > 1:
            attn.register_forward_hook(_all_reduce_hook(all_reduce))
            mlp.register_forward_hook(_all_reduce_hook(all_reduce))
    if model.lm_head is not None and size > 1:
        start, stop = rank * cfg.vocab_size // size, (rank + 1) * cfg.vocab_size // size
        model.lm_head = _narrow(model.lm_head, 0, start, stop)
        model.gather_vocab = functools.partial(_gather_vocab, all_reduce=all_reduce, vocab=cfg.vocab_size,
                                               start=start)
    return model
