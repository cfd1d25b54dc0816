"""Turn a scheduled batch into the model's input tensors, run the model, return logits.

On CUDA, decode-only steps replay CUDA graphs: one graph per batch size of a ladder
(1, 2, 4, 8, then multiples of 16), the batch padded up to the next size. Graph inputs live in
persistent buffers that each step overwrites; padding rows have seq_len 0 and slot -1, so
they read nothing and write nothing. Steps with prefill tokens run eagerly.
"""
from __future__ import annotations

import warnings

import torch

from trtllm_kernels.engine.model import AttentionMetadata, LlamaModel

from .kv_cache_manager import KVCacheManager
from .scheduler import ScheduledBatch


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCacheManager, kv_scales: tuple[float, float] = (1.0, 1.0)):
        self.model = model
        self.kv = kv
        self.kv_scales = kv_scales
        self.device = model.device
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    # -- eager -----------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Run one step. Returns (logits [N, vocab] float32, indices into batch.requests of the
        N requests whose new tokens reach their end and so sample a next token)."""
        if self.graphs and batch.num_decodes == len(batch) <= max(self.graphs):
            return self._replay(batch), list(range(len(batch)))
        page = self.kv.page_size
        ids, positions, slots, seq_lens, starts, tables, samplers = [], [], [], [], [0], [], []
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_tokens)):
            lo, hi = req.num_computed, req.num_computed + n
            table = self.kv.block_table(req.request_id)
            ids += req.tokens[lo:hi]
            positions += range(lo, hi)
            slots += [table[p // page] * page + p % page for p in range(lo, hi)]
            seq_lens.append(hi)
            starts.append(starts[-1] + n)
            tables.append(table)
            if hi == len(req.tokens):
                samplers.append(i)
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)

        def dev(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=dev(slots, torch.int64),
            block_tables=block_tables.to(self.device, non_blocking=True),
            seq_lens=dev(seq_lens, torch.int32),
            query_start_loc=dev(starts, torch.int32),
            num_decodes=batch.num_decodes,
        )
        hidden = self.model.forward(
            dev(ids, torch.int64), dev(positions, torch.int64), meta, self.kv.layer_caches, self.kv_scales
        )
        last = dev([starts[i + 1] - 1 for i in samplers], torch.int64)
        return self.model.compute_logits(hidden[last]), samplers

    # -- CUDA graphs -------------------------------------------------------------------------

    def capture_decode_graphs(self, max_batch_size: int, max_seq_len: int) -> bool:
        """Capture decode graphs for every ladder size up to max_batch_size. Returns False (and
        leaves eager decoding on) if an op on the path cannot be captured."""
        if self.device.type != "cuda":
            return False
        width = self.kv.blocks_for(max_seq_len)
        sizes = graph_batch_sizes(max_batch_size)
        n = sizes[-1]
        self._buf = {
            "ids": torch.zeros(n, dtype=torch.int64, device=self.device),
            "positions": torch.zeros(n, dtype=torch.int64, device=self.device),
            "slots": torch.full((n,), -1, dtype=torch.int64, device=self.device),
            "tables": torch.zeros(n, width, dtype=torch.int32, device=self.device),
            "seq_lens": torch.zeros(n, dtype=torch.int32, device=self.device),
            "starts": torch.arange(n + 1, dtype=torch.int32, device=self.device),
        }
        self._host = torch.zeros(4, n, dtype=torch.int64).pin_memory()
        self._host_tables = torch.zeros(n, width, dtype=torch.int32).pin_memory()
        self._logits: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        try:
            with torch.inference_mode():
                for b in reversed(sizes):  # largest first: later graphs reuse its memory
                    self._forward_decode(b)  # warm-up: compiles kernels outside capture
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._logits[b] = self._forward_decode(b)
                    self.graphs[b] = graph
        except RuntimeError as e:  # an op synchronized or allocated in a way capture refuses
            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {str(e).splitlines()[0]}")
            self.graphs.clear()
            self._logits.clear()
            torch.cuda.synchronize()
            return False
        torch.cuda.synchronize()
        return True

    def _forward_decode(self, b: int) -> torch.Tensor:
        buf = self._buf
        meta = AttentionMetadata(buf["slots"][:b], buf["tables"][:b], buf["seq_lens"][:b],
                                 buf["starts"][: b + 1], num_decodes=b)
        hidden = self.model.forward(buf["ids"][:b], buf["positions"][:b], meta, self.kv.layer_caches, self.kv_scales)
        return self.model.compute_logits(hidden)

    def _replay(self, batch: ScheduledBatch) -> torch.Tensor:
        n = len(batch)
        b = next(s for s in sorted(self.graphs) if s >= n)
        page = self.kv.page_size
        host, tables = self._host, self._host_tables
        host[:, :b] = 0
        host[2, :b] = -1  # padding rows write nowhere
        tables[:b] = 0
        for i, req in enumerate(batch.requests):
            pos = req.num_computed
            table = self.kv.block_table(req.request_id)
            host[0, i] = req.tokens[pos]
            host[1, i] = pos
            host[2, i] = table[pos // page] * page + pos % page
            host[3, i] = pos + 1
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        buf = self._buf
        buf["ids"][:b].copy_(host[0, :b], non_blocking=True)
        buf["positions"][:b].copy_(host[1, :b], non_blocking=True)
        buf["slots"][:b].copy_(host[2, :b], non_blocking=True)
        buf["seq_lens"][:b].copy_(host[3, :b], non_blocking=True)
        buf["tables"][:b].copy_(tables[:b], non_blocking=True)
        self.graphs[b].replay()
        return self._logits[b][:n]
