"""Turn a scheduled batch into the model's input tensors, run the model, return logits."""
from __future__ import annotations

import torch

from trtllm_kernels.engine.model import AttentionMetadata, LlamaModel

from .kv_cache_manager import KVCacheManager
from .scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCacheManager, kv_scales: tuple[float, float] = (1.0, 1.0)):
        self.model = model
        self.kv = kv
        self.kv_scales = kv_scales
        self.device = model.device

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Run one step. Returns (logits [N, vocab] float32, indices into batch.requests of the
        N requests whose new tokens reach their end and so sample a next token)."""
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
