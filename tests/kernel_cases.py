"""Inputs shared by the kernel tests (CPU extension and Triton/CUDA)."""
from __future__ import annotations

import torch


def paged_cache(lens, kv_heads, head_dim, block_size, dtype, seed, device="cpu"):
    """k/v caches of random data (unused slots too) and int32 block tables of shuffled blocks,
    one row per context."""
    widest = max((n + block_size - 1) // block_size for n in lens)
    num_blocks = widest * len(lens) + 3
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    tables = torch.zeros(len(lens), widest, dtype=torch.int32)
    for i, n in enumerate(lens):
        used = (n + block_size - 1) // block_size
        tables[i, :used] = order[i * widest: i * widest + used].int()
    k, v = (torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=torch.Generator().manual_seed(s))
            .to(dtype=dtype, device=device) for s in (seed + 1, seed + 2))
    return k, v, tables.to(device)
