"""The paged KV cache: device memory for every layer's keys and values, the blocks each
request owns, and the prefix cache.

Memory: k and v caches of [num_layers, num_blocks, num_kv_heads, page_size, head_dim] (each
layer gets a view; layout in docs/formats.md). Bookkeeping is host-side.

Prefix caching: once a block is full and computed, it is registered under a hash of its
tokens chained with its prefix's hash, so a later request whose prompt starts with the same
tokens reuses the block instead of recomputing it. Blocks are reference-counted; a cached block
whose last user is gone stays cached ("evictable") until its memory is needed, and the least
recently released is evicted first.

Each request's block table is a list, mirrored as a row of one zero-padded int64 array, from
which the model runner packs a step's tables with one gather (`block_table_array`), not a
Python loop over every block of every request.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from trtllm_kernels.engine.config import ModelConfig


class KVCacheManager:
    def __init__(self, config: ModelConfig, num_blocks: int, page_size: int,
                 dtype: torch.dtype, device: torch.device, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        shape = (config.num_hidden_layers, num_blocks, config.num_key_value_heads, page_size, config.head_dim)
        self.k_cache = torch.empty(shape, dtype=dtype, device=device)
        self.v_cache = torch.empty(shape, dtype=dtype, device=device)
        self.layer_caches = list(zip(self.k_cache.unbind(0), self.v_cache.unbind(0)))
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[str, list[int]] = {}
        self._refs = [0] * num_blocks
        self._cached: dict[int, int] = {}  # prefix hash -> block
        self._block_hash: dict[int, int] = {}  # block -> its prefix hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self._registered: dict[str, tuple[int, int | None]] = {}  # request -> (blocks, last hash)
        # The tables' mirror: _row_tables[_rows[r], :len(table)] is r's table; zeros elsewhere.
        self._rows: dict[str, int] = {}
        self._free_rows: list[int] = []
        self._row_tables = np.zeros((0, 0), dtype=np.int64)
        self._row_lens = np.zeros(0, dtype=np.int64)
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request can get now (free, or cached but unused and so evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.page_size

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def block_table_array(self, request_ids: list[str]) -> np.ndarray:
        """The block tables of request_ids (each with at least one block) as one int64 array
        [len(request_ids), longest table], zero-padded."""
        rows = [self._rows[r] for r in request_ids]
        return self._row_tables[rows, :int(self._row_lens[rows].max())]

    def _mirror(self, request_id: str, table: list[int], start: int) -> None:
        """Copy table[start:] (new blocks) into the request's row, taking a row if it has none."""
        row = self._rows.get(request_id)
        if row is None:
            if not self._free_rows:  # double the rows (8 at first)
                n, more = len(self._row_lens), max(len(self._row_lens), 8)
                self._row_tables = np.concatenate(
                    [self._row_tables, np.zeros((more, self._row_tables.shape[1]), dtype=np.int64)])
                self._row_lens = np.concatenate([self._row_lens, np.zeros(more, dtype=np.int64)])
                self._free_rows += range(n + more - 1, n - 1, -1)
            row = self._rows[request_id] = self._free_rows.pop()
        width = self._row_tables.shape[1]
        if len(table) > width:  # widen: at least double
            extra = np.zeros((len(self._row_lens), max(len(table), 2 * width) - width), dtype=np.int64)
            self._row_tables = np.concatenate([self._row_tables, extra], axis=1)
        self._row_tables[row, start:len(table)] = table[start:]
        self._row_lens[row] = len(table)

    # -- allocation ----------------------------------------------------------------------

    def can_grow(self, request_id: str, num_tokens: int) -> bool:
        """Whether the request's blocks can be extended to hold `num_tokens` positions."""
        return self.blocks_for(num_tokens) - len(self.block_table(request_id)) <= self.num_free_blocks

    def grow(self, request_id: str, num_tokens: int) -> None:
        table = self._tables.setdefault(request_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free_blocks:
            raise RuntimeError(f"KV cache out of blocks: need {need}, {self.num_free_blocks} free")
        if need > 0:
            for _ in range(need):
                table.append(self._take_block())
            self._mirror(request_id, table, len(table) - need)

    def _take_block(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._block_hash.pop(block)]
        self._refs[block] = 1
        return block

    def free(self, request_id: str) -> None:
        # The tail goes first so that, under LRU, a prompt's last blocks are evicted before
        # the shared prefix blocks that more requests are likely to reuse.
        self._registered.pop(request_id, None)
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._row_tables[row] = 0
            self._row_lens[row] = 0
            self._free_rows.append(row)
        for block in reversed(self._tables.pop(request_id, [])):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._block_hash:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # -- prefix cache ----------------------------------------------------------------------

    def _chain(self, tokens: list[int], num_blocks: int):
        """(block index, prefix hash) of the first num_blocks full blocks of tokens."""
        h = None
        for i in range(num_blocks):
            h = hash((h, tuple(tokens[i * self.page_size:(i + 1) * self.page_size])))
            yield i, h

    def match_prefix(self, tokens: list[int]) -> list[int]:
        """Cached blocks holding the longest prefix of `tokens` (whole blocks, leaving at least
        one token to compute, since the last one's logits are needed)."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for _, h in self._chain(tokens, (len(tokens) - 1) // self.page_size):
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        self.prefix_queried_tokens += len(tokens)
        self.prefix_hit_tokens += len(blocks) * self.page_size
        return blocks

    def can_admit(self, cached: list[int], num_tokens: int) -> bool:
        """Whether a new request reusing `cached` blocks can hold num_tokens positions."""
        unreferenced = sum(1 for b in cached if self._refs[b] == 0)
        return self.blocks_for(num_tokens) - len(cached) <= self.num_free_blocks - unreferenced

    def acquire(self, request_id: str, cached: list[int], tokens: list[int]) -> None:
        """Start a request's block table with the cached blocks of its prefix."""
        assert request_id not in self._tables
        for block in cached:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        self._tables[request_id] = list(cached)
        if cached:
            self._mirror(request_id, cached, 0)
        h = None
        for _, h in self._chain(tokens, len(cached)):
            pass
        self._registered[request_id] = (len(cached), h)

    def register_computed(self, request_id: str, tokens: list[int], num_computed: int) -> None:
        """Put the request's newly full and computed blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        done, h = self._registered.get(request_id, (0, None))
        table = self._tables[request_id]
        for i in range(done, num_computed // self.page_size):
            h = hash((h, tuple(tokens[i * self.page_size:(i + 1) * self.page_size])))
            block = table[i]
            if block not in self._block_hash and h not in self._cached:
                self._cached[h] = block
                self._block_hash[block] = h
        self._registered[request_id] = (max(done, num_computed // self.page_size), h)
