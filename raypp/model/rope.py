"""Rotary position embedding (RoPE), with Llama-3's frequency scaling.

Positions are explicit per token: a flat batch mixes prefill chunks and decode
tokens of many sequences, so there is no "sequence axis" to infer them from.
The rotation itself is `ops.rope_and_cache` (kernels/rotary.py), fused with the KV-cache write.
"""
from __future__ import annotations

import math

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        return (inv_freq / float(scaling["factor"])).float()
    # "llama3": long wavelengths are slowed by `factor`, short ones kept, and the
    # band between is interpolated smoothly (Llama 3.1 paper, section 3.3 / HF's
    # _compute_llama3_parameters).
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled).float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    angles = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
