"""Pick the next token of every sampling request in a step, in one batch on the logits' device.

Greedy rows take the argmax. The others are scaled by their temperature, cut to their top-k
and top-p sets, and sampled by the exponential-race trick: argmax(p / E) with E ~ Exp(1) is a
draw from p, and lets each seeded request draw E from its own generator, so its tokens do not
depend on what it was batched with.
"""
from __future__ import annotations

import torch

from .request import Request


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """logits: [N, vocab] float32, one row per request. Returns N token ids."""
    greedy = logits.argmax(dim=-1)
    sampled_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if not sampled_rows:
        return greedy.tolist()
    rows = torch.tensor(sampled_rows, device=logits.device)
    params = [requests[i].params for i in sampled_rows]
    probs = _filtered_probs(logits[rows], params)
    noise = torch.stack([
        torch.empty(probs.shape[1], device="cpu").exponential_(generator=requests[i].generator)
        for i in sampled_rows
    ]).to(probs.device)
    greedy[rows] = (probs / noise).argmax(dim=-1)
    return greedy.tolist()


def _filtered_probs(logits: torch.Tensor, params) -> torch.Tensor:
    dev = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    top_k = torch.tensor([p.top_k or logits.shape[1] for p in params], device=dev)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    sorted_logits, order = (logits / temperature).sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=dev)[None, :]
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass before it is under top_p: the most likely token always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (rank >= top_k) | (mass_before >= top_p)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.empty_like(logits).scatter_(1, order, sorted_logits.softmax(dim=-1))
    return probs
