"""The Llama-family transformer: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

It knows nothing of Ray, HTTP or distribution.  Parallelism is applied from
outside (raypp/parallel): tensor parallelism narrows the projections and hooks an
all-reduce on `self_attn` and `mlp`; a pipeline stage deletes the layers and
ends it does not own.  So forward() tolerates a missing embedding (it is then
given hidden states) and a missing head (it then returns hidden states).
Layers live in a ModuleDict keyed by their global index, so parameter names stay
those of the checkpoint whatever the stage owns.  Module names follow Hugging
Face's, which makes checkpoint names a fixed prefix away from ours.
"""
from __future__ import annotations

import torch
from torch import nn

from raypp.model import ops
from raypp.model.attention import AttentionMetadata, paged_attention
from raypp.model.config import ModelConfig
from raypp.model.rope import inv_frequencies, rope_cos_sin


def fuse_linears(*linears: nn.Linear) -> tuple:
    """(weight, bias, output sizes) of one product computing several projections of the same
    input.  The originals' parameters become views of the fused weight: no extra memory, and
    their names still serve checkpoints and sharding."""
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    sizes, start = [], 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        sizes.append(n)
        start += n
    return weight, bias, sizes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor):
        """(norm(residual + x), residual + x) in one pass (CUDA and CPU kernels)."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.kv_cache: torch.Tensor | None = None  # [2, slots, local kv heads, head_dim], set by the runner
        self.qkv: tuple | None = None  # fuse_linears(q, k, v), on CUDA (Transformer.fuse_projections)

    @property
    def local_kv_heads(self) -> int:
        # Derived from the weight, so it is right after tensor-parallel sharding too.
        return self.k_proj.weight.shape[0] // self.head_dim

    def forward(self, x, cos, sin, meta: AttentionMetadata):
        t, hd = x.shape[0], self.head_dim
        if self.qkv is None:
            q, k, v = (ops.linear(x, proj.weight, proj.bias) for proj in (self.q_proj, self.k_proj, self.v_proj))
        else:
            weight, bias, sizes = self.qkv
            q, k, v = ops.linear(x, weight, bias).split(sizes, dim=-1)
        q, k, v = (y.view(t, -1, hd) for y in (q, k, v))
        q = ops.rope_and_cache(q, k, v, cos, sin, self.kv_cache, meta.slot_mapping)
        out = paged_attention(q, self.kv_cache, meta, scale=hd ** -0.5)
        return ops.linear(out.reshape(t, -1), self.o_proj.weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: tuple | None = None  # fuse_linears(gate, up), on CUDA

    def forward(self, x):
        if self.gate_up is None:
            return ops.mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        weight, _, sizes = self.gate_up
        gate, up = ops.linear(x, weight).split(sizes, dim=-1)
        return ops.linear(ops.silu_and_mul(gate, up), self.down_proj.weight)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, delta, cos, sin, meta):
        """h: the residual stream; delta: the previous layer's MLP output, not yet added to it
        (None for a stage's first layer).  Returns (h, this layer's MLP output): each residual
        add happens inside the next RMSNorm, one fused kernel."""
        if delta is None:
            normed = self.input_layernorm(h)
        else:
            normed, h = self.input_layernorm.add_forward(delta, h)
        normed, h = self.post_attention_layernorm.add_forward(self.self_attn(normed, cos, sin, meta), h)
        return h, self.mlp(normed)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # A plain attribute, not a buffer: it is not in checkpoints and must stay
        # real even when the module is built on the meta device.
        self.inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # Set by tensor parallelism (raypp/parallel/tp.py) when lm_head holds a slice of the
        # vocabulary: turns this rank's logits into the whole rows.
        self.gather_vocab = None

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> int:
        """Give every owned layer a zeroed cache; returns the bytes allocated."""
        total = 0
        for layer in self.layers.values():
            attn = layer.self_attn
            w = attn.k_proj.weight
            attn.kv_cache = torch.zeros(2, num_blocks * block_size, attn.local_kv_heads, attn.head_dim,
                                        dtype=w.dtype, device=w.device)
            total += attn.kv_cache.numel() * attn.kv_cache.element_size()
        # Picking the kernels builds (or loads) the CPU ones: here at setup, not in the first step.
        ops.backend(next(self.parameters()).device)
        return total

    def fuse_projections(self) -> None:
        """q/k/v and gate/up each as one product: a decode step launches 3 GEMVs fewer per
        layer.  For CUDA, after loading; the CPU keeps the separate products that its tests pin."""
        for layer in self.layers.values():
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
            mlp.gate_up = fuse_linears(mlp.gate_proj, mlp.up_proj)

    def pack_linears(self) -> None:
        """The CPU's products read weights packed once (ops.pack_linears); an MLP's gate and up
        are packed together, for its SwiGLU."""
        mlps = [m for m in self.modules() if isinstance(m, MLP)]
        paired = {id(w) for m in mlps for w in (m.gate_proj.weight, m.up_proj.weight)}
        ops.pack_linears([m.weight for m in self.modules() if isinstance(m, nn.Linear) and id(m.weight) not in paired],
                         [(m.gate_proj.weight, m.up_proj.weight) for m in mlps])

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x: token ids [T] (if this module embeds) or hidden states [T, d].

        Returns logits [len(meta.logits_rows), vocab] in fp32 if this module has
        the head, else hidden states [T, d] for the next stage.
        """
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        meta = meta.to(h.device)
        if self.inv_freq.device != h.device:  # once: a per-step copy would also break CUDA graph capture
            self.inv_freq = self.inv_freq.to(h.device)
        cos, sin = rope_cos_sin(meta.positions, self.inv_freq, h.dtype)
        delta = None
        for layer in self.layers.values():
            h, delta = layer(h, delta, cos, sin, meta)
        if delta is not None:
            h = h + delta
        if self.lm_head is None:
            return h
        logits = ops.linear(self.norm(h[meta.logits_rows]), self.lm_head.weight)
        if self.gather_vocab is not None:
            logits = self.gather_vocab(logits)
        return logits.float()
