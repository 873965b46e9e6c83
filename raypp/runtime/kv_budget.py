"""How many KV-cache blocks each worker allocates.

One block id means the same slots on every worker (the driver allocates for
all), so the count is set by the worker that pays most per block: the stage
with the most layers.
"""
from __future__ import annotations

from raypp.config import DeploymentConfig
from raypp.model.checkpoint import resolve_dtype
from raypp.model.config import ModelConfig
from raypp.layout import Layout


def bytes_per_block(cfg: ModelConfig, layout: Layout, block_size: int, dtype_bytes: int) -> int:
    local_kv_heads = max(1, cfg.num_kv_heads // layout.tp)
    return 2 * block_size * local_kv_heads * cfg.head_dim * dtype_bytes * max(layout.stage_layers)


def kv_block_count(cfg: ModelConfig, layout: Layout, config: DeploymentConfig, max_model_len: int) -> int:
    sched = config.scheduler
    if sched.num_kv_blocks:
        return sched.num_kv_blocks
    dtype_bytes = resolve_dtype(config.model.dtype, cfg, config.parallel.device).itemsize
    wanted = sched.max_num_seqs * -(-max_model_len // sched.block_size)
    affordable = int(sched.kv_memory_gb * 2**30 // bytes_per_block(cfg, layout, sched.block_size, dtype_bytes))
    return max(1, min(wanted, affordable))
