"""The step loop: schedule, run the model, sample, retire finished requests."""
from __future__ import annotations

from trtllm_kernels.engine.model import LlamaModel

from .kv_cache_manager import KVCacheManager
from .model_runner import ModelRunner
from .request import Request
from .sampler import Sampler
from .scheduler import Scheduler


class Executor:
    def __init__(self, model: LlamaModel, kv: KVCacheManager, *, max_batch_size: int,
                 max_num_tokens: int, max_seq_len: int, eos_token_ids: set[int], seed: int = 0):
        self.kv = kv
        self.sampler = Sampler(seed, eos_token_ids)
        self.scheduler = Scheduler(kv, max_batch_size, max_num_tokens)
        self.runner = ModelRunner(model, kv)
        self.max_seq_len = max_seq_len
        self.eos_token_ids = eos_token_ids

    def add(self, request: Request) -> None:
        self.scheduler.add(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its blocks; False if it is not here."""
        self.sampler.release(request_id)
        return self.scheduler.abort(request_id)

    def finish(self, req: Request, reason: str) -> None:
        """Retire a running request now (eos, stop token, length, or a stop string found by
        the LLM in its text): its blocks and sampler state are freed."""
        self.scheduler.finish(req, reason)
        self.sampler.release(req.request_id)

    def step(self) -> list[Request]:
        """Run one step; returns the requests that got a new token in it (finished ones have
        status FINISHED and a finish_reason)."""
        batch = self.scheduler.schedule()
        if not len(batch):
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress with requests pending")  # a bug if seen
            return []
        logits, samplers = self.runner.run(batch)
        page = self.kv.page_size
        for req, n in zip(batch.requests, batch.num_tokens):
            before = req.num_computed
            req.num_computed = before + n
            # Only a block that became full goes into the prefix cache: most decode steps fill none.
            if (before + n) // page > before // page:
                self.kv.register_computed(req.request_id, req.tokens, req.num_computed)
        sampling = [batch.requests[i] for i in samplers]
        if not sampling:
            return []
        out = self.sampler(logits, sampling)
        for req, token, lp in zip(sampling, out.tokens, out.logprobs):
            req.tokens.append(token)
            if lp is not None:
                req.logprobs.append(lp)
                req.cumulative_logprob += lp[token]
            reason = self._stop_reason(req, token)
            if reason:
                self.finish(req, reason)
        return sampling

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        n = req.num_output_tokens
        if n > p.min_tokens and (
                (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids):
            return "stop"
        if n >= p.max_tokens or len(req.tokens) >= self.max_seq_len:
            return "length"
        return None
