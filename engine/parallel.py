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
FP4 engines (weight-only): the e2m1 codes and their group scales are split exactly like the
weight they encode (rows, or columns in whole groups), NVFP4's global scale is kept whole, so
a rank dequantizes exactly its slice of the one-rank weight. A column split repacks the codes:
the packed layout pairs column j with column K/2 + j (trtllm_kernels/fp4.py), so a slice of
columns is not a slice of bytes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .model import LlamaModel
from .quantize import FP4_FORMATS, GLOBAL_SUFFIX, SCALE_SUFFIX, Fp4LlamaModel, Fp8LlamaModel, fp4_weight_format

FP4_GROUP = {"nvfp4": 16, "mxfp4": 32}  # values per scale along K, by weight format


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
    if kind.endswith(GLOBAL_SUFFIX):  # NVFP4's per-tensor scale
        return -1, []
    if kind.endswith(SCALE_SUFFIX):  # a quantized weight's scales go with its rows or columns
        return shard_pieces(config, plan, name[: -len(SCALE_SUFFIX)])
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


def shard_weight(config: ModelConfig, plan: ShardPlan, name: str, get: Getter,
                 quantization: str | None = None) -> torch.Tensor:
    """One rank's shard of tensor `name` (see shard_pieces), read through `get`;
    `quantization` is the engine's (None, "fp8", "nvfp4", "mxfp4", "mxfp4_w4a8")."""
    dim, pieces = shard_pieces(config, plan, name)
    if dim == 1 and quantization in FP4_FORMATS:
        return _shard_fp4_columns(config, plan, name, get, pieces, FP4_GROUP[fp4_weight_format(quantization)])
    if dim == 1 and name.endswith(SCALE_SUFFIX):  # FP8 per-output-channel scales [N, 1]: all N
        dim = -1
    if dim < 0:
        return get(name, -1, 0, 0)
    parts = [get(name, dim, a, b) for a, b in pieces if b > a]
    w = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].clone()
    kind = name.rsplit(".", 1)[-1]
    if kind in ("embed", "lm_head") and w.shape[0] < plan.vocab_shard:  # the last shard: pad
        w = torch.cat([w, w.new_zeros(plan.vocab_shard - w.shape[0], w.shape[1])])
    if kind == "o":
        _zero_unowned_heads(config, plan, w.view(torch.uint8) if w.element_size() == 1 else w)  # fp8: 0x00 is +0
    return w.contiguous()


def check_fp4_split(config: ModelConfig, size: int, fmt: str) -> None:
    """Raise ValueError, before any rank loads, if some rank's column shard of a row-parallel
    FP4 weight (o, down) would split a scale group (see _shard_fp4_columns)."""
    for rank in range(size):
        plan = shard_plan(config, rank, size)
        for name in ("layers.0.o", "layers.0.down"):
            _fp4_pieces(name, shard_pieces(config, plan, name)[1], FP4_GROUP[fp4_weight_format(fmt)])


def _fp4_pieces(name: str, pieces: list[tuple[int, int]], group: int) -> list[tuple[int, int]]:
    pieces = [(a, b) for a, b in pieces if b > a]
    width = sum(b - a for a, b in pieces)
    if any(a % group or b % group for a, b in pieces) or width % (2 * group):
        raise ValueError(f"{name}: a rank's columns {pieces} do not fall on whole FP4 groups of {group} "
                         f"(and a multiple of {2 * group} in all), which the packed layout needs; "
                         "choose a tensor_parallel_size that splits the heads / intermediate size so")
    return pieces


def _zero_unowned_heads(config: ModelConfig, plan: ShardPlan, o_columns: torch.Tensor) -> None:
    """Zero the o-projection columns of the heads this rank computes but another owns: that
    rank contributes their output."""
    d = config.head_dim
    for j, h in enumerate(plan.q_heads):
        if h not in plan.owned_q_heads:
            o_columns[:, j * d:(j + 1) * d] = 0


def _shard_fp4_columns(config: ModelConfig, plan: ShardPlan, name: str, get: Getter,
                       pieces: list[tuple[int, int]], group: int) -> torch.Tensor:
    """A row-parallel FP4 weight's column shard: its scales' groups, or its codes unpacked,
    sliced, (o: unowned heads zeroed; code 0 is +0) and packed again."""
    from trtllm_kernels.fp4 import pack_fp4, unpack_fp4

    pieces = _fp4_pieces(name, pieces, group)
    if name.endswith(SCALE_SUFFIX):
        parts = [get(name, 1, a // group, b // group) for a, b in pieces]
        return torch.cat(parts, dim=1).contiguous()
    codes = unpack_fp4(get(name, -1, 0, 0))
    codes = torch.cat([codes[:, a:b] for a, b in pieces], dim=1)
    if name.rsplit(".", 1)[-1] == "o":
        _zero_unowned_heads(config, plan, codes)
    return pack_fp4(codes)


def shard_weights(config: ModelConfig, weights: dict[str, torch.Tensor], plan: ShardPlan,
                  quantization: str | None = None) -> dict[str, torch.Tensor]:
    """Full weights (our fused names, and the scales of a quantized engine) -> rank
    plan.rank's shard of each."""
    def get(name, dim, a, b):
        w = weights[name]
        return w if dim < 0 else w.narrow(dim, a, b - a)

    return {n: shard_weight(config, plan, n, get, quantization) for n in weights}


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

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        import trtllm_kernels as tk

        if hidden.shape[0] == 0:  # a step that samples nothing (mid-prompt chunk): same on every rank
            return hidden.new_empty(0, self.full_config.vocab_size, dtype=torch.float32)
        local = tk.linear(hidden, self.lm_head)  # [N, vocab_shard], in the activation dtype
        gathered = self.comm.all_gather(local)  # [size, N, vocab_shard]
        logits = gathered.permute(1, 0, 2).reshape(hidden.shape[0], -1)[:, : self.full_config.vocab_size]
        return logits.float() if out is None else out.copy_(logits)


class TensorParallelFp8LlamaModel(TensorParallelLlamaModel, Fp8LlamaModel):
    """One rank's shard of an FP8 engine: Fp8LlamaModel's forward with the tensor-parallel
    embedding, all-reduces and LM head. Each rank quantizes its own slice of a row-parallel
    layer's input per token, so results differ from one rank's by that rounding too."""


class TensorParallelFp4LlamaModel(TensorParallelLlamaModel, Fp4LlamaModel):
    """One rank's shard of an FP4 (weight-only) engine: Fp4LlamaModel's linears with the
    tensor-parallel embedding, all-reduces and LM head."""


class TensorParallelFp4W4A8LlamaModel(TensorParallelFp4LlamaModel):
    """TensorParallelFp4LlamaModel with its projections in W4A8 (`quantization="mxfp4_w4a8"`)."""

    W4A8 = True
