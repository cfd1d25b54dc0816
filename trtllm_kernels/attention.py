"""Paged attention over the KV cache: decode (one query per sequence) and prefill (ragged,
causal, with part of each sequence possibly already in the cache).

Both read keys and values from the paged cache described in `kv_cache` (written there first by
`write_kv_cache`, so the new tokens are in the cache too). For sequence i:
- `seq_lens[i]` is its whole length in the cache, the new tokens included;
- its queries are its last q_len_i tokens, at positions seq_lens[i] - q_len_i ... seq_lens[i] - 1,
  and the query at position p attends to cached positions 0..p (causal);
- `block_tables[i, j]` is the cache block holding its positions j*block_size ... (j+1)*block_size-1;
  entries past ceil(seq_lens[i] / block_size) are never read.
Grouped-query attention: query head h reads kv head h // (Hq // Hkv).
"""
from __future__ import annotations

import torch

from ._library import define_op
from .fp8 import FP8, _quantize_per_token_ref
from .kv_cache import check_kv_cache, dequantize_from_cache


def _gather_kv(cache: torch.Tensor, block_row: torch.Tensor, length: int, scale: float) -> torch.Tensor:
    """The first `length` positions of one sequence, as float32 [Hkv, length, D]."""
    block_size = cache.shape[2]
    num_blocks = (length + block_size - 1) // block_size
    pages = cache[block_row[:num_blocks].long()]  # [n, Hkv, bs, D]
    kv = pages.permute(1, 0, 2, 3).reshape(cache.shape[1], num_blocks * block_size, cache.shape[3])
    return dequantize_from_cache(kv[:, :length], scale)


def _attend_one(q, k_cache, v_cache, block_row, seq_len, scale, k_scale, v_scale):
    """q: [q_len, Hq, D], the last q_len tokens of a sequence of seq_len. Returns float32."""
    q_len, num_heads, _ = q.shape
    k = _gather_kv(k_cache, block_row, seq_len, k_scale)
    v = _gather_kv(v_cache, block_row, seq_len, v_scale)
    group = num_heads // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    scores = torch.einsum("qhd,hkd->hqk", q.float(), k) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
    k_pos = torch.arange(seq_len, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.einsum("hqk,hkd->qhd", scores.softmax(dim=-1), v)


def _prefill_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale):
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = starts[i], starts[i + 1]
        if hi > lo:
            out[lo:hi] = _attend_one(
                q[lo:hi], k_cache, v_cache, block_tables[i], seq_len, scale, k_scale, v_scale
            ).to(q.dtype)
    return out


def _decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale):
    # All sequences at once: gather every block-table row (padding rows included) and mask
    # positions at or past each sequence's length.
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    width = block_tables.shape[1] * block_size

    def gather(cache, scale_):
        pages = cache[block_tables.long()]  # [B, n, Hkv, bs, D]
        kv = pages.permute(0, 2, 1, 3, 4).reshape(num_seqs, num_kv_heads, width, head_dim)
        return dequantize_from_cache(kv, scale_).repeat_interleave(num_heads // num_kv_heads, dim=1)

    k, v = gather(k_cache, k_scale), gather(v_cache, v_scale)  # [B, Hq, width, D]
    scores = torch.einsum("bhd,bhkd->bhk", q.float(), k) * scale
    past_end = torch.arange(width, device=q.device)[None, :] >= seq_lens[:, None]
    scores = scores.masked_fill(past_end[:, None, :], float("-inf"))
    # Padding blocks may hold anything (NaN too): zero their values so 0 * NaN cannot leak.
    v = v.masked_fill(past_end[:, None, :, None], 0.0)
    return torch.einsum("bhk,bhkd->bhd", scores.softmax(dim=-1), v).to(q.dtype)


_paged_attention_decode = define_op(
    "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
    "Tensor seq_lens, float scale, float k_scale, float v_scale) -> Tensor",
    _decode_ref,
    lambda q, *args: torch.empty_like(q),
)


def _decode_quant_fp8_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale):
    out = _decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)
    return _quantize_per_token_ref(out.reshape(out.shape[0], -1), 0)


def _decode_quant_fp8_fake(q, *args):
    return (q.new_empty(q.shape[0], q.shape[1] * q.shape[2], dtype=FP8),
            q.new_empty(q.shape[0], 1, dtype=torch.float32))


_paged_attention_decode_quant_fp8 = define_op(
    "paged_attention_decode_quant_fp8(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
    "Tensor seq_lens, float scale, float k_scale, float v_scale) -> (Tensor, Tensor)",
    _decode_quant_fp8_ref,
    _decode_quant_fp8_fake,
)
_paged_attention_prefill = define_op(
    "paged_attention_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
    "Tensor seq_lens, Tensor query_start_loc, float scale, float k_scale, float v_scale) -> Tensor",
    _prefill_ref,
    lambda q, *args: torch.empty_like(q),
)


def paged_attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """One query token per sequence against its whole cached context.

    q: [B, Hq, D] (fp32/fp16/bf16); k_cache, v_cache: [num_blocks, Hkv, block_size, D] in q's
    dtype or float8_e4m3fn (with k_scale / v_scale); block_tables: [B, max_blocks] int32;
    seq_lens: [B] int32, each >= 1. scale defaults to D ** -0.5. Returns [B, Hq, D].
    """
    _check_attention(q, k_cache, v_cache, block_tables, seq_lens)
    if block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"decode takes one query per sequence: q has {q.shape[0]}, block_tables {block_tables.shape[0]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)


def paged_attention_decode_quant_fp8(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`paged_attention_decode` with its output quantized to fp8 per token, ready to be the A
    operand of an FP8 GEMM (the o projection): the same as
    `quantize_fp8_per_token(paged_attention_decode(...).reshape(B, -1))`, bit for bit (the output
    is rounded to q's dtype before it is quantized), but on the GPU the attention kernel does the
    quantization in its epilogue (no launch of its own between attention and o).
    Returns (fp8 [B, Hq * D], fp32 scales [B, 1]).
    """
    _check_attention(q, k_cache, v_cache, block_tables, seq_lens)
    if block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"decode takes one query per sequence: q has {q.shape[0]}, block_tables {block_tables.shape[0]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _paged_attention_decode_quant_fp8(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)


def paged_attention_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention for a ragged batch of query chunks (prefill, chunked prefill, prefix reuse).

    q: [T, Hq, D], the sequences' new tokens back to back; query_start_loc: [S + 1] int32,
    sequence i's queries are q[query_start_loc[i]:query_start_loc[i+1]] (a length of 1 is a
    decode); other arguments as in `paged_attention_decode`, with S sequences. Returns [T, Hq, D].
    """
    _check_attention(q, k_cache, v_cache, block_tables, seq_lens)
    if query_start_loc.shape != (block_tables.shape[0] + 1,):
        raise ValueError(f"query_start_loc must be [{block_tables.shape[0] + 1}], got {tuple(query_start_loc.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _paged_attention_prefill(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale
    )


def _check_attention(q, k_cache, v_cache, block_tables, seq_lens):
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, Hq, D], got {tuple(q.shape)}")
    check_kv_cache(k_cache, v_cache, k_cache.shape[1], q.shape[2])
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {k_cache.shape[1]} kv heads")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(f"block_tables and seq_lens must be int32, got {block_tables.dtype}, {seq_lens.dtype}")
    if block_tables.dim() != 2 or seq_lens.shape != (block_tables.shape[0],):
        raise ValueError(f"block_tables must be [S, max_blocks] and seq_lens [S], got {tuple(block_tables.shape)}, {tuple(seq_lens.shape)}")
    if k_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise ValueError(f"cache dtype {k_cache.dtype} must be q's ({q.dtype}) or float8_e4m3fn")
