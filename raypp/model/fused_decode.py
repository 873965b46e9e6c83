"""The batch-1 decode step as six kernels a layer, for the batch-1 CUDA graph (cuda_graph.py).

`Transformer.forward` launches ten kernels a layer at batch 1 (RMSNorm + residual, the q/k/v
GEMV, RoPE + cache write, attention and its combine pass, the o GEMV, RMSNorm + residual,
the gate/up GEMV, SiLU-and-mul, the down GEMV); most run for 1-4 us, so their launches, ramps
and tails, not bytes, made up a quarter of the step.  Here the small ops ride on the products
(kernels/fused_gemv.py):

    norm + q/k/v + RoPE + cache write -> attention (+ combine) -> o + residual add
    -> norm + gate/up + SiLU-and-mul -> down + residual add

and, on Hopper, each kernel is a programmatic dependent launch of the one before, so its
start and its first weight tile overlap the previous kernel's drain.  The residual stream is
one [1, d] buffer that the o and down products add into.  Same math and roundings as
`Transformer.forward`; only the products' summation order differs (tests pin both).
"""
from __future__ import annotations

import torch

import kernels
from kernels import fused_gemv, paged_attention
from kernels.fused_gemv import PLAIN, RESIDUAL, ROPE, SILU
from raypp.model.rope import rope_cos_sin


def pdl_available(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled Triton with grid dependency control, sm_90+."""
    if device.type != "cuda" or not kernels.HAS_TRITON or kernels.INTERPRETED:
        return False
    cuda = getattr(getattr(kernels.tl, "extra", None), "cuda", None)
    return hasattr(cuda, "gdc_wait") and torch.cuda.get_device_capability(device)[0] >= 9


def eligible(model) -> bool:
    """True when the model is what this forward computes: fused q/k/v and gate/up (CUDA loads
    fuse them), no tensor-parallel hooks or vocabulary gather, Triton available."""
    if not kernels.HAS_TRITON or getattr(model, "gather_vocab", None) is not None:
        return False
    for layer in model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv is None or mlp.gate_up is None or attn.kv_cache is None:
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in (layer, attn, mlp)):
            return False
    return True


# With pdl, when the next kernel may launch (kernels/fused_gemv.py): 1 once this one's programs
# have waited for the previous kernel, 2 as soon as they start.  2 measured slower on an H200
# (0.89 against 0.80 ms a step, docs/benchmarks.md): the early programs hold the SMs while
# they wait.  A switch for benchmarks.
PDL_TRIGGER = 1


def forward(model, x: torch.Tensor, meta, pdl: bool = False) -> torch.Tensor:
    """Transformer.forward for one decode token (meta of batch 1, on x's device): logits
    [1, vocab] in fp32, or hidden states [1, d] for a stage without the head."""
    pdl = PDL_TRIGGER if pdl else 0
    h = model.embed_tokens(x) if model.embed_tokens is not None else x.clone()  # the residual stream
    h = h.reshape(1, -1).contiguous()
    if model.inv_freq.device != h.device:
        model.inv_freq = model.inv_freq.to(h.device)
    cos, sin = rope_cos_sin(meta.positions, model.inv_freq, h.dtype)
    for layer in model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        hd, kv_heads = attn.head_dim, attn.local_kv_heads
        weight, bias, sizes = attn.qkv
        q_heads = sizes[0] // hd
        cache = attn.kv_cache
        q = fused_gemv.fused_gemv(h, weight, ROPE, norm=(ln1.weight, ln1.eps), bias=bias, pdl=pdl,
                                  rope=(cos, sin, cache[0], cache[1], meta.slot_mapping, q_heads, kv_heads, hd))
        o = paged_attention.paged_decode_attention(
            q.view(1, q_heads, hd), cache[0], cache[1], meta.decode_tables, meta.decode_lens, meta.decode_max_len,
            meta.block_size, hd ** -0.5, pdl=pdl)
        fused_gemv.fused_gemv(o.view(1, -1), attn.o_proj.weight, RESIDUAL, out=h, pdl=pdl)
        gate_up, _, (inter, _) = mlp.gate_up
        act = fused_gemv.fused_gemv(h, gate_up, SILU, norm=(ln2.weight, ln2.eps), pair_offset=inter, pdl=pdl)
        fused_gemv.fused_gemv(act, mlp.down_proj.weight, RESIDUAL, out=h, pdl=pdl)
    if model.lm_head is None:
        return h
    return fused_gemv.fused_gemv(h, model.lm_head.weight, PLAIN, norm=(model.norm.weight, model.norm.eps),
                                 out_dtype=torch.float32, pdl=pdl)
