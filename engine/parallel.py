"""Tensor parallelism: how a Llama model's weights are split over N ranks, and the model that
runs one rank's shard.

The split (Megatron-style; every rank holds 1/N of each large matrix):
- qkv and gate_up are column-parallel: each rank computes some attention heads and a slice of
  the MLP's intermediate features, with no communication;
- o and down are row-parallel: each rank multiplies its slice of the inputs by the matching
  columns of the weight and the partial outputs are summed over ranks (one all-reduce after
  attention and one after the MLP in each layer);
- the embedding and the LM head are vocab-parallel: each rank holds ceil(vocab / N) rows (the
  last shard padded with zero rows); embedding rows outside a rank's range are zero there and
  the all-reduce fills them in; the LM head's logits are all-gathered along the vocabulary;
- norms are replicated, and so is everything between the all-reduces (residual, RMSNorm),
  which sees bitwise the same all-reduced values on every rank.

Attention heads. Query heads are split into N contiguous, near-equal ranges (the first
num_q % N ranks get one more): each rank *owns* its range, meaning only its o-projection
columns for those heads are kept. A rank needs every KV head its owned query heads attend with
(GQA: query head h uses KV head h // (num_q // num_kv)); a KV head needed by two ranks is
replicated, i.e. both compute and cache it. The paged-attention kernels want the same number of
query heads per KV head, so when a rank's owned heads cover its KV heads unevenly, the rank
computes the *whole* query groups of its KV heads and zeroes the o columns of the heads it does
not own (their output is computed and multiplied by zero: wasted but exact). Example, the
default model (9 query / 3 KV heads) on 2 ranks: rank 0 owns q0-q4 and computes q0-q5 with KV
heads 0-1; rank 1 owns q5-q8 and computes q3-q8 with KV heads 1-2. With 32/8 heads on 2 or 4
ranks nothing is replicated or wasted.

Numerics: the all-reduce sums N partial products in the activation dtype, so results differ
from one rank's by rounding only (in float32, greedy tokens agree; in bfloat16 they can drift).
FP8 engines: a weight's per-output-channel scales are split with its rows (column-parallel)
or kept whole (row-parallel); the per-token scale of a row-parallel layer's input is taken
over this rank's slice, so logits differ from one rank's by a second FP8 rounding.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .model import LlamaModel
from .quantize import SCALE_SUFFIX, Fp8LlamaModel


def _split(n: int, size: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's part when n items are split into `size` contiguous near-equal
    parts, the first n % size parts one longer."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `size` holds. Head and feature indices are global."""

    rank: int
    size: int
    q_heads: tuple[int, ...]  # query heads computed here (whole GQA groups where needed)
    owned_q_heads: tuple[int, ...]  # those whose output this rank contributes
    kv_heads: tuple[int, ...]
    intermediate: tuple[int, int]  # [start, end) of the MLP's intermediate features
    vocab: tuple[int, int]  # [start, end) of real vocabulary rows; the shard has vocab_shard rows
    vocab_shard: int
    local_config: ModelConfig  # the shard's shapes: what the rank's LlamaModel is built with


def shard_plan(config: ModelConfig, rank: int, size: int) -> ShardPlan:
    """The split of `config` for rank `rank` of `size` (see the module docstring)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside [0, {size})")
    nq, nkv = config.num_attention_heads, config.num_key_value_heads
    if nq % nkv:
        raise ValueError(f"{nq} query heads are not a multiple of {nkv} KV heads")
    if size > nq:
        raise ValueError(f"tensor_parallel_size {size} exceeds the model's {nq} query heads")
    if size > config.intermediate_size:
        raise ValueError(f"tensor_parallel_size {size} exceeds intermediate_size {config.intermediate_size}")
    group = nq // nkv
    lo, hi = _split(nq, size, rank)
    owned = tuple(range(lo, hi))
    kv = tuple(sorted({h // group for h in owned}))
    per_kv = [sum(1 for h in owned if h // group == k) for k in kv]
    if len(set(per_kv)) == 1:  # an even number of owned heads per KV head: compute just those
        q_heads = owned
    else:  # uneven: compute the KV heads' whole groups, keep only the owned heads' output
        q_heads = tuple(h for k in kv for h in range(k * group, (k + 1) * group))
    vocab_shard = -(-config.vocab_size // size)
    v0 = min(rank * vocab_shard, config.vocab_size)
    v1 = min(v0 + vocab_shard, config.vocab_size)
    i0, i1 = _split(config.intermediate_size, size, rank)
    local = dataclasses.replace(
        config, num_attention_heads=len(q_heads), num_key_value_heads=len(kv),
        intermediate_size=i1 - i0, vocab_size=vocab_shard)
    return ShardPlan(rank, size, q_heads, owned, kv, (i0, i1), (v0, v1), vocab_shard, local)


def _runs(indices) -> list[tuple[int, int]]:
    """Sorted indices -> [start, end) runs of consecutive values."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, i + 1])
    return [tuple(r) for r in runs]


# A getter returns weight `name` restricted to rows (dim 0) or columns (dim 1) [start, end);
# with safetensors' get_slice it reads just those bytes from disk.
Getter = Callable[[str, int, int, int], torch.Tensor]


def shard_pieces(config: ModelConfig, plan: ShardPlan, name: str) -> tuple[int, list[tuple[int, int]]]:
    """(dim, [start, end) ranges to concatenate along dim) that make weight `name`'s shard;
    dim -1 means the weight is replicated."""
    d, nq, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    kind = name.rsplit(".", 1)[-1]
    if kind.endswith(SCALE_SUFFIX):  # an FP8 weight's per-output-channel scale [N, 1]
        dim, pieces = shard_pieces(config, plan, name[: -len(SCALE_SUFFIX)])
        return (0, pieces) if dim == 0 else (-1, [])  # split with its rows; row-parallel: all N
    if kind in ("embed", "lm_head"):
        return 0, [plan.vocab]
    if kind in ("norm", "attn_norm", "mlp_norm"):
        return -1, []
    if kind == "qkv":
        q = [(a * d, b * d) for a, b in _runs(plan.q_heads)]
        kv = _runs(plan.kv_heads)
        k = [(nq * d + a * d, nq * d + b * d) for a, b in kv]
        v = [((nq + nkv) * d + a * d, (nq + nkv) * d + b * d) for a, b in kv]
        return 0, q + k + v
    if kind == "o":
        return 1, [(a * d, b * d) for a, b in _runs(plan.q_heads)]
    i0, i1 = plan.intermediate
    if kind == "gate_up":
        inter = config.intermediate_size
        return 0, [(i0, i1), (inter + i0, inter + i1)]
    if kind == "down":
        return 1, [(i0, i1)]
    raise ValueError(f"no tensor-parallel rule for weight {name!r}")


def shard_weight(config: ModelConfig, plan: ShardPlan, name: str, get: Getter) -> torch.Tensor:
    """One rank's shard of weight `name` (see shard_pieces), read through `get`."""
    dim, pieces = shard_pieces(config, plan, name)
    if dim < 0:
        return get(name, -1, 0, 0)
    parts = [get(name, dim, a, b) for a, b in pieces if b > a]
    w = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].clone()
    kind = name.rsplit(".", 1)[-1]
    if kind in ("embed", "lm_head") and w.shape[0] < plan.vocab_shard:  # the last shard: pad
        w = torch.cat([w, w.new_zeros(plan.vocab_shard - w.shape[0], w.shape[1])])
    if kind == "o" and plan.q_heads != plan.owned_q_heads:
        d = config.head_dim
        zero = w.view(torch.uint8) if w.element_size() == 1 else w  # fp8 has no fill; 0x00 is +0
        for j, h in enumerate(plan.q_heads):
            if h not in plan.owned_q_heads:
                zero[:, j * d:(j + 1) * d] = 0  # another rank contributes this head's output
    return w.contiguous()


def shard_weights(config: ModelConfig, weights: dict[str, torch.Tensor], plan: ShardPlan) -> dict[str, torch.Tensor]:
    """Full weights (our fused names, and FP8 scales if any) -> rank plan.rank's shard of each."""
    def get(name, dim, a, b):
        w = weights[name]
        return w if dim < 0 else w.narrow(dim, a, b - a)

    return {n: shard_weight(config, plan, n, get) for n in weights}


class Communicator(Protocol):
    """The collectives a rank's model needs (runtime/distributed.py implements them over
    torch.distributed; tests use an in-process stand-in)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...  # sum over ranks, in place

    def all_gather(self, x: torch.Tensor) -> torch.Tensor: ...  # [size, *x.shape]


class TensorParallelLlamaModel(LlamaModel):
    """One rank's shard of a Llama model: LlamaModel over the shard's shapes, plus the
    vocab-parallel embedding and LM head and the all-reduces after o and down.

    `config` is the full model's config; the shard's own (plan.local_config) is what
    `self.config` holds, so attention and the KV cache see this rank's head counts.
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], plan: ShardPlan, comm: Communicator):
        super().__init__(plan.local_config, weights)
        self.full_config = config
        self.plan = plan
        self.comm = comm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        v0 = self.plan.rank * self.plan.vocab_shard
        local = input_ids - v0
        outside = (local < 0) | (local >= self.plan.vocab_shard)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weights["embed"])
        return self.comm.all_reduce(hidden.masked_fill(outside[:, None], 0))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        import trtllm_kernels as tk

        if hidden.shape[0] == 0:  # a step that samples nothing (mid-prompt chunk): same on every rank
            return hidden.new_empty(0, self.full_config.vocab_size, dtype=torch.float32)
        local = tk.linear(hidden, self.lm_head)  # [N, vocab_shard], in the activation dtype
        gathered = self.comm.all_gather(local)  # [size, N, vocab_shard]
        logits = gathered.permute(1, 0, 2).reshape(hidden.shape[0], -1)
        return logits[:, : self.full_config.vocab_size].float()


class TensorParallelFp8LlamaModel(TensorParallelLlamaModel, Fp8LlamaModel):
    """One rank's shard of an FP8 engine: Fp8LlamaModel's forward with the tensor-parallel
    embedding, all-reduces and LM head. Each rank quantizes its own slice of a row-parallel
    layer's input per token, so results differ from one rank's by that rounding too."""
