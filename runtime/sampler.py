"""Pick the next token of every sequence in a step, in one batch on the logits' device.

Per step, for the N rows that sample (logits [N, vocab] float32):

1. penalties, only for the rows that have any: Hugging Face's repetition penalty over the
   tokens of prompt + output, OpenAI's presence and frequency penalties over the output. The
   counts live on the device in a persistent table of one row per penalised sequence
   (`PenaltyState`): each step adds only the tokens generated since the last one (one
   scatter), so the cost does not grow with the sequence length;
2. greedy rows (temperature below 1e-5) take the argmax;
3. the others are divided by their temperature and cut by top-k, then top-p (over the
   renormalised top-k set), then min-p (tokens below min_p times the most likely one's
   probability), Hugging Face's order, and are sampled by the exponential race:
   argmax(p / E), E ~ Exp(1), is a draw from p (the Gumbel-max trick in another dress). It lets
   every row bring its own noise. A seeded sequence's noise is a counter-based hash of (its
   seed, how many draws it has made, the token id), computed in one batch on the device: its
   tokens do not depend on what it is batched with, on preemption, or on CPU versus GPU.
   Unseeded rows draw from the sampler's own device generator in one launch.

Every per-row parameter travels as one small tensor; no Python loop touches the vocabulary.
The only device-to-host transfer is the sampled tokens (one copy, together with the logprobs
when some row asks for them).

Logprobs are those of the model's raw distribution, log_softmax of the logits before
penalties, temperature and truncation (what vLLM V1 returns by default and what OpenAI
reports): they describe the model, so they are comparable across sampling settings, and the
sampled token's logprob is finite even when it was forced by a penalty.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import Request

GREEDY_EPS = 1e-5  # temperatures below this are greedy: 1/T would overflow the logits
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1


# -- pieces, each usable on its own (and tested against plain references) --------------------

def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, repetition: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Penalised copy of logits [R, V] float32.

    seen [R, V] bool: tokens in the prompt or the output (repetition penalty); counts [R, V]
    int: times each token was generated (presence / frequency penalties); repetition,
    presence, frequency [R] float32. A seen token's logit is divided by the repetition penalty
    if positive, multiplied if not; then logit -= frequency * count + presence * (count > 0).
    """
    rep = repetition[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    out = torch.where(seen, penalised, logits)
    counts = counts.to(logits.dtype)
    return out - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, *, max_top_k: int | None = None, use_top_p: bool = True,
                  use_min_p: bool = True) -> torch.Tensor:
    """logits [R, V] float32 divided by temperature [R] (> 0), with the tokens outside each row's
    top-k (top_k [R] int64, 0 = off), top-p (top_p [R] float32, 1 = off, over the renormalised
    top-k set) and min-p (min_p [R] float32, 0 = off) sets at -inf; softmax of the result is
    the distribution sampled from. The most likely token always stays; ties at the k-th logit
    are all kept. max_top_k: the largest top_k on the host (0: no row uses top-k), which
    spares a device sync; use_top_p / use_min_p False let a caller that knows no row uses
    them skip their work."""
    x = logits / temperature[:, None]
    vocab = x.shape[1]
    if max_top_k is None:
        max_top_k = int(top_k.max()) if top_k.numel() else 0
    if use_top_p:
        # One sort serves both cuts: rank >= k, or the kept mass before a token already >= p.
        sorted_x, order = x.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=x.device)[None, :]
        k = torch.where(top_k > 0, top_k, vocab)[:, None]
        sorted_x = sorted_x.masked_fill(rank >= k, float("-inf"))
        sorted_p = sorted_x.softmax(dim=-1)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_x = sorted_x.masked_fill(mass_before >= top_p[:, None], float("-inf"))
        x = torch.empty_like(x).scatter_(1, order, sorted_x)
    elif max_top_k > 0:
        # A partial top-k finds each row's k-th largest logit without sorting the vocabulary.
        kmax = min(max_top_k, vocab)
        k = torch.where(top_k > 0, top_k.clamp(max=kmax), kmax)
        kth = x.topk(kmax, dim=-1).values.gather(1, (k - 1)[:, None])
        x = x.masked_fill((x < kth) & (top_k > 0)[:, None], float("-inf"))
    if use_min_p:
        # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p); renormalising cancels out.
        floor = x.max(dim=-1, keepdim=True).values + torch.log(min_p)[:, None]
        x = x.masked_fill(x < floor, float("-inf"))
    return x


def argmax_rows(x: torch.Tensor, max_rows: int = 32) -> torch.Tensor:
    """x.argmax(-1) of a 2-D x; on the GPU for up to max_rows rows by `argmax_two_pass`: torch
    reduces a row in one pass of few threads (36 us for one row of Llama-3's 128,256 logits on
    an H200, 1% of a batch-1 decode step)."""
    if not x.is_cuda or x.shape[0] > max_rows or x.shape[1] < 1024:
        return x.argmax(dim=-1)
    return argmax_two_pass(x)


def argmax_two_pass(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of a 2-D x in two passes: chunks of a vocabulary divisor near 512 (else -inf
    padding) each give their first maximum, and the first chunk holding the row's maximum gives
    the first index of it overall, as argmax does (NaN included: it is the maximum of both)."""
    n, v = x.shape
    c = next((c for c in range(512, 256, -1) if v % c == 0), 512)
    if v % c:
        x = torch.nn.functional.pad(x, (0, c - v % c), value=float("-inf"))
    best, where = x.view(n, -1, c).max(dim=-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return (chunk * c + where.gather(-1, chunk)).squeeze(-1)


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finaliser with full avalanche (Chris Wellons' "lowbias32" constants),
    # on int64 holding values < 2**32 so that >> is a logical shift; products wrap mod 2**64
    # and only their low 32 bits are kept.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix64(x: int) -> int:
    # splitmix64's finaliser on the host: turns (seed, draw) into well-spread per-row keys.
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def seeded_exponential(seeds: list[int], draws: list[int], vocab: int, device) -> torch.Tensor:
    """Exp(1) noise [R, vocab] float32, a pure function of (seeds[r], draws[r], token id): the
    same on every device and in every batch."""
    keys = [_mix64(_mix64(s & 0xFFFFFFFFFFFFFFFF) ^ d) for s, d in zip(seeds, draws)]
    k = torch.tensor([[kk & _M32, kk >> 32] for kk in keys], dtype=torch.int64).to(device, non_blocking=True)
    idx = torch.arange(vocab, dtype=torch.int64, device=device)[None, :]
    # One finaliser round over a golden-ratio walk from the row's key, then the row's second
    # key XORed in (so no two rows' streams are shifts of each other): ~12 elementwise passes.
    h = _lowbias32(((idx * _GOLDEN) + k[:, :1]) & _M32) ^ k[:, 1:]
    # 24 high bits -> u in (0, 1), never 0 or 1, so -log(u) is finite and positive.
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(u)


def seeded_child(seed: int, index: int) -> int:
    """The seed of completion `index` of a request seeded with `seed` (n > 1): completion 0
    keeps the request's seed, the others get well-spread derived ones."""
    return seed if index == 0 else _mix64(seed ^ _mix64(index)) & 0x7FFFFFFFFFFFFFFF


# -- persistent penalty counts ----------------------------------------------------------------

class PenaltyState:
    """Per-sequence token tables on the device for the sequences with penalties.

    Row r of `prompt` marks the tokens of its sequence's prompt, row r of `counts` counts its
    generated tokens. A sequence gets a row the first step it samples and keeps it until
    `release` (finish or abort; preemption keeps it, its tokens do not change). Rows grow by
    doubling; memory is vocab * 5 bytes per penalised sequence in flight.
    """

    def __init__(self, vocab: int, device):
        self.vocab, self.device = vocab, device
        self.prompt = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self.counts = torch.zeros(0, vocab, dtype=torch.int32, device=device)
        self.slot: dict[str, int] = {}
        self.counted: dict[str, int] = {}
        self.free: list[int] = []

    def _grow(self, need: int) -> None:
        cap = self.prompt.shape[0]
        new = max(need, 2 * cap, 8)
        self.prompt = torch.cat([self.prompt, self.prompt.new_zeros(new - cap, self.vocab)])
        self.counts = torch.cat([self.counts, self.counts.new_zeros(new - cap, self.vocab)])
        self.free += range(new - 1, cap - 1, -1)

    def gather(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen [R, V] bool, counts [R, V] int32) of reqs, brought up to date first."""
        fresh = [r for r in reqs if r.request_id not in self.slot]
        if len(fresh) > len(self.free):
            self._grow(self.prompt.shape[0] + len(fresh) - len(self.free))
        init_rows, init_toks, new_rows, new_toks = [], [], [], []
        for r in fresh:
            s = self.slot[r.request_id] = self.free.pop()
            self.counted[r.request_id] = 0
            init_rows.append(s)
            init_toks.append(r.prompt_token_ids)
        for r in reqs:
            s, done = self.slot[r.request_id], self.counted[r.request_id]
            out = r.tokens[len(r.prompt_token_ids) + done:]
            if out:
                new_rows += [s] * len(out)
                new_toks += out
                self.counted[r.request_id] = done + len(out)

        def dev(values):
            return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

        if init_rows:
            rows = dev(init_rows)
            self.prompt[rows] = False
            self.counts[rows] = 0
            flat = [t for toks in init_toks for t in toks]
            if flat:
                self.prompt[dev([s for s, toks in zip(init_rows, init_toks) for _ in toks]), dev(flat)] = True
        if new_rows:
            self.counts.index_put_((dev(new_rows), dev(new_toks)),
                                   torch.ones(len(new_rows), dtype=torch.int32, device=self.device), accumulate=True)
        rows = dev([self.slot[r.request_id] for r in reqs])
        counts = self.counts[rows]
        return self.prompt[rows] | (counts > 0), counts

    def release(self, request_id: str) -> None:
        s = self.slot.pop(request_id, None)
        if s is not None:
            self.counted.pop(request_id)
            self.free.append(s)


# -- the sampler ------------------------------------------------------------------------------

@dataclass
class SamplerOutput:
    tokens: list[int]
    # Per row: None, or {token: logprob} of the top-n (best first) then the sampled token if
    # it is not among them.
    logprobs: list[dict[int, float] | None]


class Sampler:
    """Samples a step's rows; holds the state that outlives a step (penalty counts, the
    generator of unseeded rows). seed seeds that generator: with it, a whole run is
    reproducible when its batches are."""

    def __init__(self, seed: int = 0, eos_token_ids: set[int] | frozenset[int] = frozenset()):
        self.seed = seed
        self.eos_token_ids = frozenset(eos_token_ids)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._penalties: PenaltyState | None = None

    def _generator(self, device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return g

    def _stops(self, p) -> list[int]:
        """The token ids that would end a sequence with params p."""
        return sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))

    def release(self, request_id: str) -> None:
        """Forget a finished or aborted sequence's state."""
        if self._penalties is not None:
            self._penalties.release(request_id)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: [N, vocab] float32 (not modified), one row per request."""
        return self.launch(logits, requests).result()

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, requests: list[Request]) -> "PendingSample":
        """Queue the step's sampling work on the device without waiting for it; the returned
        object's result() reads the tokens (and logprobs) back, the one synchronisation."""
        n, vocab = logits.shape
        dev = logits.device
        params = [r.params for r in requests]
        x = logits
        bias = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items()]
        if bias:
            x = logits.clone()  # the runner's logits stay as they are
            rows, cols = torch.tensor([(i, t) for i, t, _ in bias], dtype=torch.int64).to(dev, non_blocking=True).T
            x[rows, cols] += torch.tensor([b for _, _, b in bias], dtype=x.dtype).to(dev, non_blocking=True)
        pen = [i for i, p in enumerate(params) if p.has_penalties]
        if pen:
            if self._penalties is None or self._penalties.vocab != vocab or self._penalties.device != dev:
                self._penalties = PenaltyState(vocab, dev)
            seen, counts = self._penalties.gather([requests[i] for i in pen])
            f = torch.tensor([[params[i].repetition_penalty, params[i].presence_penalty, params[i].frequency_penalty]
                              for i in pen], dtype=torch.float32).to(dev, non_blocking=True)
            if len(pen) == n:
                x = apply_penalties(x, seen, counts, f[:, 0], f[:, 1], f[:, 2])
            else:  # a copy: the runner's logits stay as they are (they may be a graph's output)
                rows = _index(pen, n, dev)
                x = x.clone() if x is logits else x
                x[rows] = apply_penalties(x[rows], seen, counts, f[:, 0], f[:, 1], f[:, 2])
        early = [(i, self._stops(p)) for i, p in enumerate(params)
                 if p.min_tokens and requests[i].num_output_tokens < p.min_tokens]
        if early:  # min_tokens: the tokens that would end the sequence cannot be drawn yet
            pairs = torch.tensor([(i, t) for i, ids in early for t in ids if t < vocab], dtype=torch.int64)
            if len(pairs):
                pairs = pairs.to(dev, non_blocking=True)
                x = x.clone() if x is logits else x  # the runner's logits stay as they are
                x[pairs[:, 0], pairs[:, 1]] = float("-inf")
        tokens = argmax_rows(x)
        sampled = [i for i, p in enumerate(params) if p.temperature >= GREEDY_EPS]
        if sampled:
            ps = [params[i] for i in sampled]
            f = torch.tensor([[p.temperature, p.top_p, p.min_p] for p in ps], dtype=torch.float32).to(dev, non_blocking=True)
            top_k = torch.tensor([p.top_k for p in ps], dtype=torch.int64).to(dev, non_blocking=True)
            rows = _index(sampled, n, dev)
            z = filter_logits(x[rows], f[:, 0], top_k, f[:, 1], f[:, 2], max_top_k=max(p.top_k for p in ps),
                              use_top_p=any(p.top_p < 1 for p in ps), use_min_p=any(p.min_p > 0 for p in ps))
            seeds = [_seed_of(requests[i]) for i in sampled]
            seeded = [j for j, s in enumerate(seeds) if s is not None]
            unseeded = [j for j, s in enumerate(seeds) if s is None]
            noise = torch.empty_like(z)
            if unseeded:
                noise[_index(unseeded, len(sampled), dev)] = torch.empty(
                    len(unseeded), vocab, device=dev).exponential_(generator=self._generator(dev))
            if seeded:
                noise[_index(seeded, len(sampled), dev)] = seeded_exponential(
                    [seeds[j] for j in seeded], [requests[sampled[j]].num_draws for j in seeded], vocab, dev)
            # argmax(p / E) = argmax(z - log E): softmax's shared normaliser drops out.
            tokens[rows] = (z - noise.log()).argmax(dim=-1)
            for i in sampled:
                requests[i].num_draws += 1
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not lp_rows:
            return PendingSample.start(tokens, tokens, n, [], 0, [])
        rows = _index(lp_rows, n, dev)
        lp = logits[rows].log_softmax(dim=-1)
        k = max(params[i].logprobs for i in lp_rows)
        parts = [tokens.double(), lp.gather(1, tokens[rows][:, None]).double().flatten()]
        if k:
            top = lp.topk(k, dim=-1)
            parts += [top.values.double().flatten(), top.indices.double().flatten()]
        # One tensor, so one transfer (token ids and indices < 2**53 are exact in float64).
        return PendingSample.start(tokens, torch.cat(parts), n, lp_rows, k, [params[i].logprobs for i in lp_rows])


@dataclass
class PendingSample:
    """A step's sampling, queued on the device; result() waits for it."""

    tokens: torch.Tensor  # [N] int64 on the device: the next step's input ids (overlap, executor.py)
    packed: torch.Tensor  # on the host once `ready`: tokens [N], then with logprobs: sampled [M], top values [M*k], top ids [M*k]
    ready: torch.cuda.Event | None  # None: packed is on the CPU already
    n: int
    lp_rows: list[int]
    k: int
    lp_counts: list[int]

    @classmethod
    def start(cls, tokens: torch.Tensor, packed: torch.Tensor, *rest) -> "PendingSample":
        """Queue packed's copy to the host. Into pinned memory and with an event, not a
        blocking copy: that would also wait for work queued after this step (the next one)."""
        ready = None
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            packed = host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        return cls(tokens, packed, ready, *rest)

    def result(self) -> SamplerOutput:
        if self.ready is not None:
            self.ready.synchronize()
        host = self.packed.tolist()
        n, m, k = self.n, len(self.lp_rows), self.k
        toks = [int(t) for t in host[:n]]
        out: list[dict[int, float] | None] = [None] * n
        chosen, vals, idx = host[n:n + m], host[n + m:n + m + m * k], host[n + m + m * k:]
        for j, (i, kk) in enumerate(zip(self.lp_rows, self.lp_counts)):
            d = {int(idx[j * k + c]): vals[j * k + c] for c in range(kk)}
            d.setdefault(toks[i], chosen[j])  # the sampled token last when not in the top-n
            out[i] = d
        return SamplerOutput(toks, out)


def _index(rows: list[int], n: int, dev):
    """rows as an index: a plain slice when it is all of them (no copy, no transfer)."""
    if len(rows) == n:
        return slice(None)
    return torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)


def _seed_of(req: Request) -> int | None:
    return req.seed if req.seed is not None else req.params.seed


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """One-off sampling of logits [N, vocab] float32, one row per request; N token ids.
    (The runtime keeps a `Sampler`, whose penalty counts persist across steps.)"""
    return Sampler()(logits, requests).tokens
