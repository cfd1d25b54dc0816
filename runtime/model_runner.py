"""Turn a scheduled batch into the model's input tensors, run the model, return logits.

On CUDA, decode-only steps replay CUDA graphs: one graph per batch size of a ladder
(1, 2, 4, 8, then multiples of 16), the batch padded up to the next size. Graph inputs live in
persistent buffers that each step overwrites; padding rows have seq_len 0 and slot -1, so
they read nothing and write nothing. A step that prefills one sequence (a prompt or a chunk of
one, on one rank) replays a graph too, one per token count of PREFILL_GRAPH_TOKENS, its tokens
padded up to the next: padding tokens have slot -1 and lie past the sequence's query range, so
they write nothing and attention leaves their rows alone (every other op is row-wise). Other
steps with prefill tokens run eagerly.

A step is two halves: rank 0 packs the batch into a command header (a few ints) and one int64
payload on the host (`_pack_eager`, `_pack_decode`); `execute` unpacks it on the device and
runs the model. Under tensor parallelism (runtime/distributed.py) the model carries a `comm`
and rank 0 broadcasts header and payload in between, so the other ranks run `execute` on the
same inputs; with one rank the payload is just copied to the device.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from trtllm_kernels.engine.model import AttentionMetadata, LlamaModel

from .kv_cache_manager import KVCacheManager
from .scheduler import ScheduledBatch


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


def prefill_graph_sizes(max_tokens: int, max_num_tokens: int, max_seq_len: int) -> list[int]:
    """Token counts of the prefill graphs: PREFILL_GRAPH_TOKENS within max_tokens, the step
    budget and the longest prompt (max_seq_len - 1)."""
    return [n for n in PREFILL_GRAPH_TOKENS if n <= min(max_tokens, max_num_tokens, max_seq_len - 1)]


CMD_EAGER, CMD_GRAPH, CMD_CAPTURE, CMD_STOP, CMD_PREFILL_GRAPH = 1, 2, 3, 4, 5
# header: [command, T tokens, S sequences, block-table width, num_decodes, num_samplers, graph batch
#          (CMD_GRAPH) or graph tokens (CMD_PREFILL_GRAPH)]

# Token counts of the one-sequence prefill graphs. Eagerly, the host launches ~300 kernels a
# step: 22 ms for a 128-token prompt at Llama-3.1-8B shape on an H100, whose GPU work takes a
# few ms (benchmarks/prefill_host_profile.py), so a short prompt's first token waited on Python.
# Past ~1-2K tokens the GPU work outlasts the launches and a graph gains little. Their cost,
# measured but not understood: with them captured, batch-1 decode steps ran 3% slower on an
# H100 (benchmarks/results/h100-2026-11-27/prefill_graphs/README.md); LLM(prefill_graph_tokens=0)
# turns them off.
PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def payload_size(header: list[int]) -> int:
    """int64 count of a step's payload. Eager (and prefill graph): ids, positions, slots [T]; seq_lens [S];
    query starts [S+1]; sampled rows [num_samplers]; block tables [S, width]. Graph replay of
    batch b: ids, positions, slots, seq_lens [b]; block tables [b, width]."""
    cmd, t, s, w, _, n_samp, b = header[:7]
    if cmd in (CMD_EAGER, CMD_PREFILL_GRAPH):
        return 3 * t + 2 * s + 1 + n_samp + s * w
    if cmd == CMD_GRAPH:
        return 4 * b + b * w
    return 0


def warmup_steps(max_num_tokens: int, max_batch_size: int, max_seq_len: int) -> list[tuple[int, list[int]]]:
    """ModelRunner.warmup's steps as (decodes, prompt lengths), within the step budgets."""
    longest = min(max_num_tokens, max_seq_len - 1)
    steps = [(0, [longest])] + [(0, [n]) for n in (7, 16, 61, 256, 2048) if n < longest]
    steps += [(0, [min(longest, max_num_tokens // s)] * s) for s in (16, 64, 256)
              if s <= max_batch_size and max_num_tokens >= s]
    # A few short prompts together: a prefill call below GLUON_PREFILL_MIN_TOKENS goes to the
    # Triton kernel, whose binary search over 2-16 or 17-256 sequences is a variant of its own
    # (the steps above give the Gluon kernel those counts): an H200 throughput run compiled it
    # mid-run, 0.34 s of its 5.7.
    short = min(longest, 7)
    steps += [(0, [short] * s) for s in (3, 17) if s <= max_batch_size and short * s <= max_num_tokens]
    decodes = min(max_batch_size - 8, 128, max_num_tokens // 2)
    if decodes > 0 and max_num_tokens - decodes >= 8:
        steps.append((decodes, [min(longest, (max_num_tokens - decodes) // 8)] * 8))
    return steps


def eager_payload(ids: list[int], computed: list[int], num: list[int], tables: np.ndarray, samplers: list[int],
                  num_decodes: int, page: int, write: bool = True) -> tuple[list[int], torch.Tensor]:
    """An eager step's header and payload (layout: `payload_size`). Sequence i has computed[i]
    tokens in the cache and brings num[i] new ones (their ids concatenated in `ids`); tables
    [S, width] are the block tables; the rows in `samplers` sample. write=False gives every
    token slot -1, so nothing is written to the cache (the warm-up's dummy steps)."""
    s = len(num)
    lo, num = np.array(computed, dtype=np.int64), np.array(num, dtype=np.int64)
    starts = np.zeros(s + 1, dtype=np.int64)
    np.cumsum(num, out=starts[1:])
    seq = np.repeat(np.arange(s), num)  # each token's sequence
    positions = lo[seq] + np.arange(len(ids)) - starts[seq]
    slots = tables[seq, positions // page] * page + positions % page if write else np.full(len(ids), -1, dtype=np.int64)
    last = starts[np.array(samplers, dtype=np.int64) + 1] - 1
    payload = np.concatenate([np.array(ids, dtype=np.int64), positions, slots, lo + num, starts, last,
                              tables.ravel()])
    return [CMD_EAGER, len(ids), s, tables.shape[1], num_decodes, len(samplers), 0], torch.from_numpy(payload)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCacheManager, kv_scales: tuple[float, float] = (1.0, 1.0)):
        self.model = model
        self.kv = kv
        self.kv_scales = kv_scales
        self.device = model.device
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # token count -> graph, ascending
        self.num_prefill_replays = 0
        self._pool = None  # the graphs' shared memory pool: they replay one at a time on one stream
        # A tensor-parallel rank's collectives (engine/parallel.py); None on one rank.
        self.comm = getattr(model, "comm", None)

    # -- rank 0: pack a step -------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Run one step. Returns (logits [N, vocab] float32, indices into batch.requests of the
        N requests whose new tokens reach their end and so sample a next token)."""
        if self.graphs and batch.num_decodes == len(batch) <= max(self.graphs):
            header, payload = self._pack_decode(batch)
            return self._dispatch(header, payload, batch.next_ids)[: len(batch)], list(range(len(batch)))
        header, payload, samplers = self._pack_eager(batch)
        if len(batch) == 1 and batch.num_tokens[0] > 1:
            size = next((n for n in self.prefill_graphs if n >= batch.num_tokens[0]), None)
            if size is not None:
                header[0], header[6] = CMD_PREFILL_GRAPH, size
                self.num_prefill_replays += 1
                return self._dispatch(header, payload)[: len(samplers)], samplers
        return self._dispatch(header, payload, batch.next_ids), samplers

    def _dispatch(self, header: list[int], payload: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.comm is not None:  # the other ranks run the same step on the same inputs
            assert ids is None, "ids on the device reach no other rank"
            return self.execute(header, self.comm.send_step(header, payload))
        if self.device.type == "cuda":
            # From pinned memory the copy is truly asynchronous: a large pageable one can make
            # the host wait for the step still running on the GPU (overlap, executor.py).
            payload = payload.pin_memory()
        return self.execute(header, payload.to(self.device, non_blocking=True), ids)

    # Packing works on numpy arrays: a step has a few thousand ints (tens of thousands with long
    # block tables), too many for per-element Python lists and torch.tensor(list).

    def _pack_eager(self, batch: ScheduledBatch):
        page = self.kv.page_size
        reqs, counts = batch.requests, batch.num_tokens
        # The first num_ahead rows decode a token whose id is on the device (next_ids; a
        # placeholder here) and sample.
        k = batch.num_ahead
        ids, computed, samplers = [0] * k, [req.num_computed for req in reqs[:k]], list(range(k))
        for i in range(k, len(reqs)):
            req, n = reqs[i], counts[i]
            c = req.num_computed
            ids += req.tokens[c:c + n]
            computed.append(c)
            if c + n == len(req.tokens):
                samplers.append(i)
        tables = self.kv.block_table_array([req.request_id for req in reqs])
        header, payload = eager_payload(ids, computed, counts, tables, samplers, batch.num_decodes, page)
        return header, payload, samplers

    def _pack_decode(self, batch: ScheduledBatch):
        n = len(batch)
        b = next(size for size in sorted(self.graphs) if size >= n)
        page = self.kv.page_size
        reqs = batch.requests
        pos = np.array([req.num_computed for req in reqs], dtype=np.int64)
        tables = self.kv.block_table_array([req.request_id for req in reqs])
        width = tables.shape[1]
        # Rows n..b-1 pad the batch: token 0, position 0, slot -1 (writes nowhere), seq_len 0.
        payload = np.zeros(4 * b + b * width, dtype=np.int64)
        ids, positions, slots, seq_lens = payload[:4 * b].reshape(4, b)
        k = batch.num_ahead  # rows whose ids are on the device already (next_ids)
        ids[k:n] = [req.tokens[req.num_computed] for req in reqs[k:]]
        positions[:n] = pos
        slots[:n] = tables[np.arange(n), pos // page] * page + pos % page
        slots[n:] = -1
        seq_lens[:n] = pos + 1
        payload[4 * b:4 * b + n * width] = tables.ravel()
        return [CMD_GRAPH, n, n, width, n, n, b], torch.from_numpy(payload)

    # -- warm-up ------------------------------------------------------------------------------

    @torch.inference_mode()
    def warmup(self, max_num_tokens: int, max_batch_size: int, max_seq_len: int) -> None:
        """Run the eager path once for each kind of step a run meets, on dummy inputs that
        write nothing to the cache (slot -1), so that Triton compiles those kernel variants
        now rather than in the middle of serving: each costs seconds, and a throughput run on
        an H200 spent 8 of its 18 s compiling in its first prefill steps. The kinds: one long
        prompt; short prompts of a few sizes (the small-M GEMM configs, M a multiple of 16 or
        not); 16, 64 and 256 prompts at once; decodes mixed with prompts. Under tensor
        parallelism every rank runs them. CUDA only (the CPU path compiles nothing)."""
        if self.device.type != "cuda":
            return
        for decodes, prompts in warmup_steps(max_num_tokens, max_batch_size, max_seq_len):
            self._dispatch(*self._dummy_step(decodes, prompts, context=min(256, max_seq_len - 1)))
        torch.cuda.synchronize()

    def _dummy_step(self, decodes: int, prompts: list[int], context: int):
        """An eager step's header and payload: `decodes` sequences at `context` tokens and the
        given prompt lengths from scratch, all in block 0 and writing nowhere."""
        num = [1] * decodes + prompts
        width = self.kv.blocks_for(max(context + 1 if decodes else 0, *prompts))
        tables = np.zeros((len(num), width), dtype=np.int64)
        return eager_payload([0] * sum(num), [context] * decodes + [0] * len(prompts), num, tables,
                             list(range(len(num))), decodes, self.kv.page_size, write=False)

    # -- every rank: run a step ----------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, header: list[int], payload: torch.Tensor, next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Unpack a step's payload (on this rank's device) and run the model: float32 logits of
        the sampled rows (eager) or of the graph's whole padded batch (graph replay).
        next_ids: the first tokens' ids, already on the device (the payload has placeholders there)."""
        cmd, t, s, w, num_decodes, n_samp, b = header[:7]
        if cmd == CMD_GRAPH:
            return self._replay(payload, b, w, next_ids)
        if cmd == CMD_PREFILL_GRAPH:
            return self._replay_prefill(payload, t, w, n_samp, b)
        ids, positions, slots, seq_lens, starts, last, tables = payload.split([t, t, t, s, s + 1, n_samp, s * w])
        if next_ids is not None:  # the first rows' ids (the payload has placeholders there)
            ids[:len(next_ids)].copy_(next_ids)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables.view(s, w).to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            query_start_loc=starts.to(torch.int32),
            num_decodes=num_decodes,
        )
        hidden = self.model.forward(ids, positions, meta, self.kv.layer_caches, self.kv_scales)
        return self.model.compute_logits(hidden[last])

    # -- CUDA graphs -------------------------------------------------------------------------

    def capture_decode_graphs(self, max_batch_size: int, max_seq_len: int) -> bool:
        """Capture decode graphs for every ladder size up to max_batch_size. Returns False (and
        leaves eager decoding on) if an op on the path cannot be captured. Under tensor
        parallelism rank 0 first tells the other ranks to capture the same sizes (the
        all-reduces inside are captured as NCCL kernels; every rank replays together)."""
        if self.device.type != "cuda":
            return False
        if self.comm is not None and self.comm.rank == 0:
            self.comm.send_step([CMD_CAPTURE, max_batch_size, max_seq_len], None)
        sizes = graph_batch_sizes(max_batch_size)
        self._alloc_graph_inputs(sizes[-1], self.kv.blocks_for(max_seq_len))
        pool = self._graph_pool()
        # Other threads (NCCL's watchdog) keep using CUDA during capture: only this thread's
        # calls must be capture-safe.
        mode = "thread_local" if self.comm is not None else "global"
        ok = True
        try:
            with torch.inference_mode():
                for b in reversed(sizes):  # largest first: later graphs reuse its memory
                    self._forward_decode(b)  # warm-up: compiles kernels outside capture
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
                        self._logits[b] = self._forward_decode(b)
                    self.graphs[b] = graph
        except RuntimeError as e:  # an op synchronized or allocated in a way capture refuses
            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {str(e).splitlines()[0]}")
            ok = False
        torch.cuda.synchronize()
        if self.comm is not None:  # graphs on every rank or on none: they replay in lockstep
            ok = bool(self.comm.min_int(int(ok)))
        if not ok:
            self.graphs.clear()
            self._logits.clear()
        return ok

    def _graph_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def capture_prefill_graphs(self, max_num_tokens: int, max_seq_len: int, max_tokens: int = 2048) -> bool:
        """Capture the one-sequence prefill graphs of up to max_tokens tokens that fit the step
        and sequence budgets. One rank only (the other ranks' steps come as broadcast
        payloads). Returns False (prefill steps stay eager) if there are none or capture fails."""
        sizes = prefill_graph_sizes(max_tokens, max_num_tokens, max_seq_len)
        if self.device.type != "cuda" or self.comm is not None or not sizes:
            return False
        self._alloc_prefill_inputs(sizes[-1], self.kv.blocks_for(max_seq_len))
        buf = self._pbuf
        try:
            with torch.inference_mode():
                for n in reversed(sizes):  # largest first: later graphs reuse its memory
                    # The capture-time run reads n tokens' worth of block 0 and writes nothing.
                    buf["seq_lens"].fill_(n)
                    buf["starts"][1] = n
                    buf["last"].fill_(n - 1)
                    self._forward_prefill(n)  # warm-up: compiles kernels outside capture
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._graph_pool()):
                        self._prefill_logits[n] = self._forward_prefill(n)
                    self.prefill_graphs[n] = graph
        except RuntimeError as e:
            warnings.warn(f"CUDA graph capture of prefill failed, prefilling eagerly: {str(e).splitlines()[0]}")
            self.prefill_graphs.clear()
            self._prefill_logits.clear()
        torch.cuda.synchronize()
        self.prefill_graphs = dict(sorted(self.prefill_graphs.items()))
        return bool(self.prefill_graphs)

    def _alloc_prefill_inputs(self, n: int, width: int) -> None:
        """The prefill graphs' persistent inputs: one sequence of up to n new tokens."""
        dev = self.device
        self._pbuf = {
            "ids": torch.zeros(n, dtype=torch.int64, device=dev),
            "positions": torch.zeros(n, dtype=torch.int64, device=dev),
            "slots": torch.full((n,), -1, dtype=torch.int64, device=dev),
            "tables": torch.zeros(1, width, dtype=torch.int32, device=dev),
            "seq_lens": torch.full((1,), n, dtype=torch.int32, device=dev),
            "starts": torch.tensor([0, n], dtype=torch.int32, device=dev),
            "last": torch.full((1,), n - 1, dtype=torch.int64, device=dev),
        }
        self._prefill_logits: dict[int, torch.Tensor] = {}

    def _forward_prefill(self, n: int) -> torch.Tensor:
        buf = self._pbuf
        meta = AttentionMetadata(buf["slots"][:n], buf["tables"], buf["seq_lens"], buf["starts"], num_decodes=0)
        hidden = self.model.forward(buf["ids"][:n], buf["positions"][:n], meta, self.kv.layer_caches, self.kv_scales)
        return self.model.compute_logits(hidden[buf["last"]])

    def _replay_prefill(self, payload: torch.Tensor, t: int, width: int, n_samp: int, n: int) -> torch.Tensor:
        """Copy a one-sequence eager payload of t tokens into the inputs of the graph of n >= t
        tokens and replay: tokens t..n-1 get slot -1 (their ids and positions are stale, and
        harmless). Returns the logits of the last token (read only when it samples)."""
        buf = self._pbuf
        ids, positions, slots, seq_lens, starts, last, tables = payload.split([t, t, t, 1, 2, n_samp, width])
        buf["ids"][:t].copy_(ids)
        buf["positions"][:t].copy_(positions)
        buf["slots"][t:n].fill_(-1)
        buf["slots"][:t].copy_(slots)
        buf["seq_lens"].copy_(seq_lens)
        buf["starts"].copy_(starts)
        if n_samp:
            buf["last"].copy_(last)
        buf["tables"][:, :width].copy_(tables.view(1, width))
        self.prefill_graphs[n].replay()
        return self._prefill_logits[n]

    def _alloc_graph_inputs(self, n: int, width: int) -> None:
        """The persistent input buffers that graphs read, for batches up to n."""
        self._buf = {
            "ids": torch.zeros(n, dtype=torch.int64, device=self.device),
            "positions": torch.zeros(n, dtype=torch.int64, device=self.device),
            "slots": torch.full((n,), -1, dtype=torch.int64, device=self.device),
            "tables": torch.zeros(n, width, dtype=torch.int32, device=self.device),
            "seq_lens": torch.zeros(n, dtype=torch.int32, device=self.device),
            "starts": torch.arange(n + 1, dtype=torch.int32, device=self.device),
        }
        # Every decode graph writes its logits into the head of this one buffer: kept per
        # graph, they would hold 17 GB at max batch 1024 with a 128K vocabulary (the sum of
        # the ladder's sizes). Sharing is safe: graphs replay one at a time on one stream,
        # and a step's sampling is queued before the next step's replay.
        vocab = getattr(self.model, "full_config", self.model.config).vocab_size
        self._logits_buf = torch.empty(n, vocab, dtype=torch.float32, device=self.device)
        self._logits: dict[int, torch.Tensor] = {}

    def _forward_decode(self, b: int) -> torch.Tensor:
        buf = self._buf
        meta = AttentionMetadata(buf["slots"][:b], buf["tables"][:b], buf["seq_lens"][:b],
                                 buf["starts"][: b + 1], num_decodes=b)
        hidden = self.model.forward(buf["ids"][:b], buf["positions"][:b], meta, self.kv.layer_caches, self.kv_scales)
        return self.model.compute_logits(hidden, out=self._logits_buf[:b])

    def _replay(self, payload: torch.Tensor, b: int, width: int, next_ids: torch.Tensor | None) -> torch.Tensor:
        """Copy a packed decode step (batch padded to graph size b) into the graph's input
        buffers and replay. Table columns past `width` keep stale ids: no row reads them."""
        buf = self._buf
        ids, positions, slots, seq_lens, tables = payload.split([b, b, b, b, b * width])
        buf["ids"][:b].copy_(ids)
        if next_ids is not None:
            buf["ids"][:len(next_ids)].copy_(next_ids)
        buf["positions"][:b].copy_(positions)
        buf["slots"][:b].copy_(slots)
        buf["seq_lens"][:b].copy_(seq_lens)
        buf["tables"][:b, :width].copy_(tables.view(b, width))
        self.graphs[b].replay()
        return self._logits[b]
