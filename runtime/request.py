"""A request's state inside the runtime, and what the API returns for it."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence being generated.

    `tokens` is the prompt followed by the tokens generated so far; `num_computed` counts those
    whose keys and values are in the cache. Each step computes the next chunk of the rest, so
    a prefill, a chunked prefill, a decode and a recompute after preemption are one mechanism:
    the computed count catching up with the token count.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None  # unused by the sampler; kept for old callers
    num_preemptions: int = 0
    # Sampling: the seed of this sequence's noise (None: params.seed, else unseeded) and how
    # many draws it made, which keys its next noise (see sampler.py).
    seed: int | None = None
    num_draws: int = 0
    # n > 1: this sequence is completion `index` of the request `parent_id`.
    parent_id: str | None = None
    index: int = 0
    logprobs: list[dict[int, float]] | None = None  # filled when params.logprobs is set
    cumulative_logprob: float = 0.0
    detok: "object | None" = None  # the LLM's incremental detokenizer state

    def __post_init__(self):
        self.tokens = list(self.prompt_token_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:  # without output_token_ids' copy: checked every step
        return len(self.tokens) - len(self.prompt_token_ids)

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (eos, a stop token or stop string), "length", "abort", or None while running
    # With SamplingParams.logprobs=k: per generated token, {token id: logprob} of the sampled
    # token and the k most likely ones (k+1 entries, or k when the sampled one is among them).
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs (with logprobs)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
