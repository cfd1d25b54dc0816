"""The step loop: schedule, run the model, sample, retire finished requests.

A step is launched (inputs packed, the model and the sampler queued on the device) and later
completed (the sampled tokens read back, stop conditions checked). With overlap on, `step()`
launches the next step before it completes the current one whenever it can be scheduled
without the current one's tokens (`_launch_next`): each request sampling in step N decodes
that token in step N+1, its id still on the device and copied there into N+1's input ids,
beside the next prompt chunks of other requests and waiting requests that join. So while the
GPU runs step N+1, the host reads step N's tokens, checks stops, builds outputs, detokenizes
and returns to the caller, instead of the GPU waiting for all of that (about 1.6 ms of an
8.4 ms decode step at batch 256 on an H200, benchmarks/results/h200-2026-11-27/README.md).
A request that ends with step N's token (end-of-sequence, a stop token or string, an abort)
wastes its row of step N+1, whose result is dropped; one that ends by length is left out of
step N+1, being known in advance. A block filled by a step enters the prefix cache when the
step is launched (its tokens known then), so the step after can reuse it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trtllm_kernels.engine.model import LlamaModel

from .kv_cache_manager import KVCacheManager
from .model_runner import ModelRunner
from .request import Request, RequestStatus
from .sampler import PendingSample, Sampler
from .scheduler import ScheduledBatch, Scheduler


@dataclass
class LaunchedStep:
    """A step whose model and sampling work is queued on the device; tokens not read yet."""

    batch: ScheduledBatch
    computed: list[int]  # each request's num_computed once this step is done
    sampling: list[Request]  # the requests that sample a token, in the sampler's row order
    sample: PendingSample | None


class Executor:
    def __init__(self, model: LlamaModel, kv: KVCacheManager, *, max_batch_size: int,
                 max_num_tokens: int, max_seq_len: int, eos_token_ids: set[int], seed: int = 0,
                 overlap: bool = False):
        self.kv = kv
        self.sampler = Sampler(seed, eos_token_ids)
        self.scheduler = Scheduler(kv, max_batch_size, max_num_tokens)
        self.runner = ModelRunner(model, kv)
        self.max_seq_len = max_seq_len
        self.eos_token_ids = eos_token_ids
        if overlap and self.runner.comm is not None:
            raise ValueError("overlap scheduling needs a single rank (tensor parallelism broadcasts each "
                             "step's input ids from the host)")
        self.overlap = overlap
        self._inflight: LaunchedStep | None = None
        self.num_launched_ahead = 0  # steps launched before the previous one's tokens were read

    def add(self, request: Request) -> None:
        self.scheduler.add(request)

    def has_unfinished(self) -> bool:
        # A step in flight holds only running requests (still in the scheduler) or ended ones.
        return self.scheduler.has_unfinished()

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its blocks; False if it is not here.
        (A step in flight that holds it still runs; its row's result is dropped.)"""
        self.sampler.release(request_id)
        return self.scheduler.abort(request_id)

    def finish(self, req: Request, reason: str) -> None:
        """Retire a running request now (eos, stop token, length, or a stop string found by
        the LLM in its text): its blocks and sampler state are freed."""
        self.scheduler.finish(req, reason)
        self.sampler.release(req.request_id)

    def step(self) -> list[Request]:
        """Complete one step; returns the requests that got a new token in it (finished ones
        have status FINISHED and a finish_reason). With overlap, the next step may already be
        on the device when this returns."""
        cur, self._inflight = self._inflight, None
        if cur is not None and all(req.status is not RequestStatus.RUNNING for req in cur.batch.requests):
            cur = None  # every request in it ended meanwhile: nothing to read
        if cur is None:
            batch = self.scheduler.schedule()
            if not len(batch):
                if self.scheduler.has_unfinished():
                    raise RuntimeError("scheduler made no progress with requests pending")  # a bug if seen
                return []
            cur = self._launch(batch)
        if self.overlap:
            self._inflight = self._launch_next(cur)
        return self._complete(cur)

    def _launch(self, batch: ScheduledBatch) -> LaunchedStep:
        logits, samplers = self.runner.run(batch)
        page = self.kv.page_size
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_tokens)):
            req.num_computed += n
            # A block that became full goes into the prefix cache now, not once this step is
            # read: a step that reuses it runs after this one on the device. Most decode steps
            # fill none. The rows decoding a token still on the device wait for _complete.
            if i >= batch.num_ahead and req.num_computed // page > (req.num_computed - n) // page:
                self.kv.register_computed(req.request_id, req.tokens, req.num_computed)
        sampling = [batch.requests[i] for i in samplers]
        sample = self.sampler.launch(logits, sampling) if sampling else None
        return LaunchedStep(batch, [req.num_computed for req in batch.requests], sampling, sample)

    def _launch_next(self, cur: LaunchedStep) -> LaunchedStep | None:
        """Launch the step after `cur` before cur's tokens are read, when it can be scheduled
        without them: none of cur's sampling requests needs its token on the host to sample
        the next one (penalties count it, min_tokens' mask depends on the count), and no
        running request needs another's blocks (scheduling ahead preempts nobody). Each of
        cur's sampling requests then decodes the token cur is sampling, its id read on the
        device, unless that token is its last (max_tokens or max_seq_len): it is left out.
        Other running requests take their next prompt chunk and waiting ones join as usual.
        Otherwise None, and the next step() schedules after reading cur's tokens."""
        if cur.sample is None:
            return None  # nothing is being sampled: the next step() schedules without waiting
        ahead: dict[int, int] = {}  # id(request) -> its row of cur's sampled tokens
        for i, req in enumerate(cur.sampling):
            if req.status is not RequestStatus.RUNNING:  # aborted or stopped meanwhile
                continue
            p = req.params
            if p.has_penalties or req.num_output_tokens < p.min_tokens:
                return None
            if req.num_output_tokens + 1 < p.max_tokens and len(req.tokens) + 1 < self.max_seq_len:
                ahead[id(req)] = i
        batch = self.scheduler.schedule(ahead)
        if batch is None or not len(batch):
            return None
        rows = [ahead[id(req)] for req in batch.requests[:batch.num_ahead]]
        if rows:
            ids = cur.sample.tokens
            if rows != list(range(len(cur.sampling))):
                ids = ids[torch.tensor(rows, dtype=torch.int64).to(ids.device, non_blocking=True)]
            batch.next_ids = ids
        self.num_launched_ahead += 1
        return self._launch(batch)

    def _complete(self, step: LaunchedStep) -> list[Request]:
        page = self.kv.page_size
        k = step.batch.num_ahead  # rows whose token was on the device at launch: it is on the host now
        for req, after in zip(step.batch.requests[:k], step.computed):
            if after % page == 0 and req.status is RequestStatus.RUNNING:  # its one token filled a block
                self.kv.register_computed(req.request_id, req.tokens, after)
        if step.sample is None:
            return []
        out = step.sample.result()
        advanced = []
        for req, token, lp in zip(step.sampling, out.tokens, out.logprobs):
            if req.status is not RequestStatus.RUNNING:  # ended while this step was in flight
                continue
            req.tokens.append(token)
            if lp is not None:
                req.logprobs.append(lp)
                req.cumulative_logprob += lp[token]
            reason = self._stop_reason(req, token)
            if reason:
                self.finish(req, reason)
            advanced.append(req)
        return advanced

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        n = req.num_output_tokens
        if n > p.min_tokens and (
                (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids):
            return "stop"
        if n >= p.max_tokens or len(req.tokens) >= self.max_seq_len:
            return "length"
        return None
