"""Paged KV-cache block allocation (the driver's view; workers only see block tables).

Every worker of the pipeline allocates the same number of blocks for its own
layers and heads, so one allocator in the driver serves them all: a block id
means the same slots on every stage and every TP rank.
"""
from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """More blocks `seq_id` needs to hold `num_tokens` tokens."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def allocate(self, seq_id: str, num_tokens: int) -> bool:
        """Grow the sequence's table to hold `num_tokens`; False (and no change) if blocks ran out."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            return False
        table = self.tables.setdefault(seq_id, [])
        table.extend(self._free.pop() for _ in range(need))
        return True

    def free(self, seq_id: str) -> None:
        self._free.extend(reversed(self.tables.pop(seq_id, [])))
