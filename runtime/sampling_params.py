"""Sampling parameters of a request, checked when they are made."""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top-n logprobs per token, like OpenAI's cap
MAX_N = 16  # completions per request: each is a full sequence in the batch


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 (or below 1e-5) is greedy (argmax). top_k 0 (or -1) keeps every token; top_p 1.0 keeps the
    whole distribution; min_p keeps the tokens whose probability is at least min_p times the
    most likely one's (0 disables it). seed makes one request's sampling reproducible whatever
    it is batched with (with n > 1, completion i is reproducible too).

    logit_bias ({token id: bias in [-100, 100]}, OpenAI's) is added to those tokens' logits
    first. Penalties, applied to the logits before temperature: repetition_penalty (Hugging Face's:
    a token seen in the prompt or the output has its logit divided by it when positive,
    multiplied when negative; 1 disables), presence_penalty (OpenAI's: subtracted once from the
    logit of every token generated so far) and frequency_penalty (subtracted once per time the
    token was generated). Both OpenAI penalties count generated tokens only, not the prompt.

    Generation stops at max_tokens ("length"), at an end-of-sequence token (unless
    ignore_eos), at any of stop_token_ids, or when the text contains one of the `stop`
    strings ("stop"; the text then ends just before the stop string), or at the engine's
    max_seq_len. min_tokens: no stop (end-of-sequence, stop token or stop string) before that
    many tokens; the stop tokens are masked out of sampling until then. logprobs=k returns, for every generated token, the log-probabilities of the
    sampled token and of the k most likely ones. n > 1 generates n completions of the prompt.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    n: int = 1
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _number(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 0 (0 or -1 disables it), got {self.top_k!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _number(self.repetition_penalty) or not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be a number > 0 (1 disables it), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _number(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        self.stop = list(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) \
                or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        self.logit_bias = dict(self.logit_bias or {})
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 or not _number(b) or not -100 <= b <= 100
               for t, b in self.logit_bias.items()):
            raise ValueError(f"logit_bias must map token ids (integers >= 0) to numbers in [-100, 100], "
                             f"got {self.logit_bias!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or so small (< 1e-5) that 1/T would overflow."""
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
