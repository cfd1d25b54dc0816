"""The paged KV cache: device memory for every layer's keys and values, and the blocks each
request owns.

Memory: k and v caches of [num_layers, num_blocks, num_kv_heads, page_size, head_dim] (each
layer gets a view; layout in docs/formats.md). Bookkeeping is host-side: a free list of block
ids and, per request, the list of blocks holding its positions in order.
"""
from __future__ import annotations

import torch

from trtllm_kernels.engine.config import ModelConfig


class KVCacheManager:
    def __init__(self, config: ModelConfig, num_blocks: int, page_size: int,
                 dtype: torch.dtype, device: torch.device):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.page_size = page_size
        shape = (config.num_hidden_layers, num_blocks, config.num_key_value_heads, page_size, config.head_dim)
        self.k_cache = torch.empty(shape, dtype=dtype, device=device)
        self.v_cache = torch.empty(shape, dtype=dtype, device=device)
        self.layer_caches = list(zip(self.k_cache.unbind(0), self.v_cache.unbind(0)))
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.page_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def can_grow(self, request_id: str, num_tokens: int) -> bool:
        """Whether the request's blocks can be extended to hold `num_tokens` positions."""
        return self.blocks_for(num_tokens) - len(self.block_table(request_id)) <= len(self._free)

    def grow(self, request_id: str, num_tokens: int) -> None:
        table = self._tables.setdefault(request_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            raise RuntimeError(f"KV cache out of blocks: need {need}, {len(self._free)} free")
        for _ in range(need):
            table.append(self._free.pop())

    def free(self, request_id: str) -> None:
        self._free.extend(reversed(self._tables.pop(request_id, [])))
