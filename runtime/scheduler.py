"""Continuous batching: which requests run in the next step, and how many tokens each.

Every step has a token budget (max_num_tokens) and a sequence budget (max_batch_size).
Running requests go first, oldest first: a decoding one takes 1 token, one still in prefill
takes the next chunk of its prompt. Waiting requests then join, oldest first, while budget and
free KV blocks last. When a running request cannot get the block it needs, the newest running
request is preempted: its blocks are freed and it goes back to the head of the queue, to be
recomputed from its tokens later (its output so far is kept, so its result does not change).
A request joining the batch first takes whatever prefix of its tokens the prefix cache holds.

A step can also be scheduled ahead, while the previous one is still on the device
(overlap scheduling, executor.py): the requests whose next token that step is sampling each
decode it, its id still on the device. Nothing is preempted then: if blocks run short,
scheduling ahead gives up (returns None) and the step is scheduled once the tokens are read.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Container
from dataclasses import dataclass

import torch

from .kv_cache_manager import KVCacheManager
from .request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """Requests of one step with the number of new tokens each, decodes (1 token) first.
    A step scheduled ahead (executor.py) starts with num_ahead decodes whose token is not yet
    in their `tokens`: the executor sets next_ids [num_ahead], those ids on the device."""

    requests: list[Request]
    num_tokens: list[int]
    num_ahead: int = 0
    next_ids: torch.Tensor | None = None

    @property
    def num_decodes(self) -> int:
        return self.num_tokens.count(1)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_batch_size: int, max_num_tokens: int):
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request, front: bool = False) -> None:
        """Queue a request; front=True puts it ahead of everything waiting."""
        if front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, ahead: Container[int] | None = None) -> ScheduledBatch | None:
        """The next step. ahead: scheduling ahead, the id()s of the running requests whose
        next token is being sampled on the device (a running request not among them whose
        tokens are all computed is ending with that token: it is left out). Then None when KV
        blocks run short, for a running request or a waiting one that fits the step: the
        requests that end with the tokens being read free theirs."""
        budget = self.max_num_tokens
        page = self.kv.page_size
        # Decodes (1 token) first, those with their token on the device first of all; the
        # order otherwise kept.
        on_device: list[Request] = []
        decodes: list[Request] = []
        others: list[tuple[Request, int]] = []
        idle = 0  # running requests without a token this step (ending ahead, or out of budget)
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            # min(req.num_pending, budget), spelled out: this runs for every request every step.
            on_dev = ahead is not None and id(req) in ahead
            n = len(req.tokens) - req.num_computed + on_dev
            if n > budget:
                n = budget
            if n == 0:
                idle += 1
                continue
            end = req.num_computed + n
            # Most steps stay inside the request's last block: no new block, nothing to check.
            if end > len(self.kv.block_table(req.request_id)) * page:
                if ahead is not None and not self.kv.can_grow(req.request_id, end):
                    return None
                while not self.kv.can_grow(req.request_id, end):
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is req:
                        break
                if req.status is not RequestStatus.RUNNING:
                    continue
                self.kv.grow(req.request_id, end)
            if n == 1:
                (on_device if on_dev else decodes).append(req)
            else:
                others.append((req, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) - idle < self.max_batch_size:
            req = self.waiting[0]
            cached = self.kv.match_prefix(req.tokens)
            computed = len(cached) * self.kv.page_size
            n = min(len(req.tokens) - computed, budget)
            if not self.kv.can_admit(cached, computed + n):
                if ahead is not None:  # the blocks of requests that end with the tokens being read may let it in
                    return None
                break
            self.waiting.popleft()
            self.kv.acquire(req.request_id, cached, req.tokens)
            req.num_computed = computed
            self.kv.grow(req.request_id, computed + n)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if n == 1:
                decodes.append(req)
            else:
                others.append((req, n))
            budget -= n
        decodes = on_device + decodes
        return ScheduledBatch(decodes + [r for r, _ in others], [1] * len(decodes) + [n for _, n in others],
                              num_ahead=len(on_device))

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_computed = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def abort(self, request_id: str) -> bool:
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self.kv.free(request_id)
                    req.status = RequestStatus.FINISHED
                    req.finish_reason = "abort"
                    return True
        return False

    def finish(self, req: Request, reason: str) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.running.remove(req)
        self.kv.free(req.request_id)
