"""Triton kernels for paged attention over the KV cache (decode and ragged causal prefill).

The cache layout, argument meanings and the reference implementations are in
`trtllm_kernels.attention` and `trtllm_kernels.kv_cache`: k_cache / v_cache are
[num_blocks, Hkv, block_size, D] (one head's page is a contiguous block_size x D tile),
block_tables int32 [S, max_blocks], seq_lens int32 [S] (whole length, new tokens included),
query_start_loc int32 [S + 1]; an FP8 (float8_e4m3fn) cache carries one fp32 k_scale / v_scale.

Decode (`triton_paged_decode`), one query token per sequence
-----------------------------------------------------------
One program per (sequence, kv head, KV split). All GROUP = Hq // Hkv query heads of a kv
head are one [GROUP_PAD (>= 16), D] tile, so each K/V page is read once per group:
scores = q @ k^T is a [GROUP_PAD, D] x [D, BLOCK_N] tl.dot, then acc += p @ v. Keys are
gathered through the block table: when BLOCK_N divides the page size one page per tile
(scalar lookup), otherwise one lookup per key row (any page size). Online softmax in fp32 in
the exp2 domain (log2(e), the softmax scale and k_scale are folded into one multiplier;
v_scale is applied once at the end). FP8 pages are loaded as fp8 and converted in registers.

Split-KV (flash-decoding): the context is cut into `num_splits` chunks of `split_tokens`
(a multiple of BLOCK_N); each program writes its unnormalised fp32 accumulator and its
(max, sum) to scratch, and `_decode_reduce_kernel` merges the splits that hold tokens
(cdiv(seq_len, split_tokens) of them: splits past a sequence's end exit at once and are never
read). `decode_num_splits` picks num_splits from static shapes only (batch * Hkv against the
SM count, and the largest possible context block_tables.shape[1] * block_size), so no host
sync on seq_lens happens and the launch is CUDA-graph safe.

Prefill (`triton_paged_prefill`), ragged and causal
---------------------------------------------------
Flash-attention forward: a program owns BLOCK_M queries of one sequence and one query head
and streams BLOCK_N-key tiles from the paged cache (same gather as decode). Queries are the
last q_len tokens of their sequence (positions seq_len - q_len ...), so earlier tokens of the
cache (prefix reuse, chunked prefill) are attended without a mask; only the tiles that cross
the diagonal are masked and tiles past the tile's last query are never visited. Grid:
(Hq, T // BLOCK_M + S) where T = q.shape[0] and S = number of sequences; both are static.
Sequence i owns the query tiles starting at query_start_loc[i] // BLOCK_M + i (an upper bound
on sum_i cdiv(q_len_i, BLOCK_M)); a program finds its sequence by a fixed-length binary search
over query_start_loc and exits if it has no queries. Tile ids run backwards so the most
expensive (last, longest-context) tiles are dispatched first, heads fastest so the heads of a
GQA group share K/V tiles in L2.

Both kernels accumulate in fp32; fp32 inputs use IEEE (not TF32) dots. Head dims must be
powers of two in [16, 256] and the last dim of q and the caches contiguous; other inputs fall
back to the reference implementation in the registered op.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..attention import _decode_ref, _prefill_ref

LOG2E = 1.4426950408889634
DEFAULT_NUM_SMS = 132  # H100 SXM
MAX_SPLITS = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fix_interpreter_scalar_index() -> None:
    """Let a loaded scalar bound a `range()` under the interpreter with numpy >= 2.4.

    The interpreter holds every scalar as a 1-element array and converts it with
    `int(array)`, which numpy 2.4 refuses for arrays of ndim > 0. Compiled kernels are
    unaffected; this only touches the interpreter, and only when it is on.
    """
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover
        return
    original = getattr(_interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_trtllm_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._trtllm_fixed = True
    _interp._patch_lang_tensor = patched


if _interpreting():
    _fix_interpreter_scalar_index()


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _paged_decode_kernel(
    Q, K, V, BT, SL, Out, PartAcc, PartM, PartL,
    qk_scale, v_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bt, stride_ob, stride_oh,
    split_tokens, num_splits,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // NUM_KV_HEADS
    kvh = pid % NUM_KV_HEADS
    seq_len = tl.load(SL + b)
    lo = split * split_tokens
    hi = tl.minimum(seq_len, lo + split_tokens)
    if SPLIT:
        if lo >= seq_len:  # this split holds no tokens; the reduce never reads it
            return

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = BT + b.to(tl.int64) * stride_bt
    k_head = K + kvh.to(tl.int64) * stride_kh
    v_head = V + kvh.to(tl.int64) * stride_vh

    for start in range(lo, hi, BLOCK_N):
        tok = start + offs_n
        mask_n = tok < hi
        if PAGE % BLOCK_N == 0:  # the whole tile sits in one page
            page = tl.load(bt_row + start // PAGE).to(tl.int64)
            k_rows = page * stride_kb + (tok % PAGE) * stride_kt
            v_rows = page * stride_vb + (tok % PAGE) * stride_vt
        else:  # one page lookup per key
            page = tl.load(bt_row + tok // PAGE, mask=mask_n, other=0).to(tl.int64)
            k_rows = page * stride_kb + (tok % PAGE) * stride_kt
            v_rows = page * stride_vb + (tok % PAGE) * stride_vt
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        k = k.to(q.dtype)
        v = v.to(q.dtype)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    if not SPLIT:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc * (v_scale / l_safe)[:, None]
        o_ptrs = Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_g[:, None])
    else:
        # scratch is [B, Hq, num_splits] (+ [D]) contiguous; acc keeps v_scale, not 1 / l
        row = (b * (NUM_KV_HEADS * GROUP) + heads).to(tl.int64) * num_splits + split
        tl.store(PartAcc + row[:, None] * HEAD_DIM + offs_d[None, :], acc * v_scale,
                 mask=mask_g[:, None])
        tl.store(PartM + row, m_i, mask=mask_g)
        tl.store(PartL + row, l_i, mask=mask_g)


@triton.jit
def _decode_reduce_kernel(
    PartAcc, PartM, PartL, SL, Out,
    stride_ob, stride_oh, split_tokens, num_splits,
    NUM_HEADS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NUM_HEADS
    h = pid % NUM_HEADS
    seq_len = tl.load(SL + b)
    n_active = tl.cdiv(seq_len, split_tokens)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_s = (offs_s < n_active) & (offs_s < num_splits)
    row = pid.to(tl.int64) * num_splits + offs_s
    m = tl.load(PartM + row, mask=mask_s, other=float("-inf"))
    l = tl.load(PartL + row, mask=mask_s, other=0.0)
    acc = tl.load(PartAcc + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_s[:, None],
                  other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(mask_s, tl.math.exp2(m - m_max), 0.0)
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    out = num / tl.where(den > 0.0, den, 1.0)
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


@triton.jit
def _paged_prefill_kernel(
    Q, K, V, BT, SL, QSL, Out,
    qk_scale, v_scale,
    stride_qt, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bt, stride_ot, stride_oh,
    num_seqs,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEARCH_ITERS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    h = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest tiles first

    # Sequence i owns tiles [QSL[i] // BLOCK_M + i, QSL[i+1] // BLOCK_M + i + 1): find the
    # largest i whose first tile is <= tile (fixed-length binary search, no host sync).
    lo = tl.program_id(1) * 0  # an int32 tensor even when SEARCH_ITERS == 0
    hi = num_seqs
    for _ in tl.static_range(SEARCH_ITERS):
        mid = (lo + hi) // 2
        first = tl.load(QSL + mid) // BLOCK_M + mid
        right = first <= tile
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    seq = lo
    q_start = tl.load(QSL + seq)
    q_len = tl.load(QSL + seq + 1) - q_start
    local = tile - (q_start // BLOCK_M + seq)
    if local * BLOCK_M >= q_len:
        return
    seq_len = tl.load(SL + seq)
    ctx = seq_len - q_len  # tokens before this sequence's first query

    offs_m = local * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < q_len
    q_pos = ctx + offs_m
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)

    kvh = h // GROUP
    bt_row = BT + seq.to(tl.int64) * stride_bt
    k_head = K + kvh.to(tl.int64) * stride_kh
    v_head = V + kvh.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    first_pos = ctx + local * BLOCK_M
    end = tl.minimum(first_pos + BLOCK_M, seq_len)  # one past the last query's position
    full_end = (first_pos // BLOCK_N) * BLOCK_N  # keys below are visible to every query

    # 1) key tiles visible to every query in the tile: no masks at all
    for start in range(0, full_end, BLOCK_N):
        tok = start + offs_n
        if PAGE % BLOCK_N == 0:
            page = tl.load(bt_row + start // PAGE).to(tl.int64)
        else:
            page = tl.load(bt_row + tok // PAGE).to(tl.int64)
        k = tl.load(k_head + (page * stride_kb + (tok % PAGE) * stride_kt)[:, None] + offs_d[None, :])
        v = tl.load(v_head + (page * stride_vb + (tok % PAGE) * stride_vt)[:, None] + offs_d[None, :])
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    # 2) tiles that cross the diagonal: causal mask, and never past `end`
    for start in range(full_end, end, BLOCK_N):
        tok = start + offs_n
        mask_n = tok < end
        if PAGE % BLOCK_N == 0:
            page = tl.load(bt_row + start // PAGE).to(tl.int64)
        else:
            page = tl.load(bt_row + tok // PAGE, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(k_head + (page * stride_kb + (tok % PAGE) * stride_kt)[:, None] + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0)
        v = tl.load(v_head + (page * stride_vb + (tok % PAGE) * stride_vt)[:, None] + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(tok[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    out = acc * (v_scale / l_i)[:, None]
    tl.store(Out + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask_m[:, None])


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def decode_config(head_dim: int, cache_dtype: torch.dtype, q_dtype: torch.dtype) -> dict:
    """BLOCK_N / num_warps / num_stages for decode: one K tile is ~16 KB in the compute dtype.

    At num_stages 2-4 Triton 3.6 keeps one K/V tile in flight per program (page lookup
    pipelined one iteration ahead, ~39 KB smem at D=128 bf16, so ~5 programs share an SM and
    overlap each other's loads); num_stages=5 double-buffers K/V (~72 KB). Sweep both.
    """
    if _interpreting():
        return dict(BLOCK_N=32, num_warps=4, num_stages=1)
    # sized by the compute dtype: FP8 pages are converted to q's dtype in registers
    block_n = max(16, min(128, 16384 // (head_dim * q_dtype.itemsize)))
    if q_dtype == torch.float32:
        return dict(BLOCK_N=min(block_n, 32), num_warps=4, num_stages=2)
    return dict(BLOCK_N=block_n, num_warps=4, num_stages=3)


def prefill_config(head_dim: int, q_dtype: torch.dtype) -> dict:
    """Tiles for prefill on H100; one small config under the interpreter.

    num_stages counts the block-table load as a stage of its own: with the gather chain
    (page index -> K/V tile -> wgmma) Triton 3.6 keeps K/V tiles two iterations ahead
    (3 smem buffers each) only from num_stages=5; at 3 or 4 the copy of the next tile is
    issued after the current tile's dots and waited for at once.
    """
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    if q_dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=5)
    if head_dim <= 128:  # smem: Q 32 KB + 3 x (K 16 KB + V 16 KB) = 128 KB
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=5)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=5)


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int,
                      sms: int = DEFAULT_NUM_SMS, min_split_tokens: int = 512) -> int:
    """How many KV splits for decode, from static sizes only (CUDA-graph safe).

    Aim for ~8 programs per SM (decode programs are small: several fit an SM at once and,
    being memory bound, share its bandwidth, so a few waves balance well), never cut a split
    below `min_split_tokens` of the largest possible context, and cap at MAX_SPLITS. With
    block_n=64 on 132 SMs: B64 x 4096 (8 kv heads) -> 3, B256 x 512 -> 1, B4 x 32768 -> 32.
    Splits past a sequence's actual end cost one early-exiting program each.
    """
    programs = batch * num_kv_heads
    target = 8 * sms
    if programs >= target:
        return 1
    tiles = triton.cdiv(max_context, block_n)
    min_tiles = max(1, min_split_tokens // block_n)
    splits = min(triton.cdiv(target, programs), tiles // min_tiles, MAX_SPLITS)
    if splits <= 1:
        return 1
    tiles_per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, tiles_per_split)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the Triton kernels take these inputs (else the op uses the reference)."""
    d = q.shape[-1]
    return (
        _pow2(d) and 16 <= d <= 256
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k_cache.dtype in (q.dtype, torch.float8_e4m3fn)
        and k_cache.stride(-1) == 1
    )


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # only fp32 operands look at it


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def triton_paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
    *, out: torch.Tensor | None = None, num_splits: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, poison_scratch: bool = False,
) -> torch.Tensor:
    """Paged decode attention (see `trtllm_kernels.attention.paged_attention_decode`).

    q [B, Hq, D]; returns (or writes `out`) [B, Hq, D]. Keyword-only knobs override the
    launch config (for tests and tuning); `poison_scratch` fills the split-KV scratch with NaN.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()  # no-ops as a rule
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else scale
    cfg = decode_config(head_dim, k_cache.dtype, q.dtype)
    block_n = block_n or cfg["BLOCK_N"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    max_context = block_tables.shape[1] * page
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, max_context, block_n, num_sms(q.device))
    tiles = triton.cdiv(max_context, block_n)
    num_splits = max(1, min(num_splits, tiles))
    split_tokens = triton.cdiv(tiles, num_splits) * block_n
    num_splits = triton.cdiv(max_context, split_tokens)

    if num_splits > 1:
        part_acc = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((2, batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
        if poison_scratch:
            part_acc.fill_(float("nan"))
            part_ml.fill_(float("nan"))
        part_m, part_l = part_ml[0], part_ml[1]
    else:
        part_acc = part_m = part_l = out  # unused

    _paged_decode_kernel[(batch * num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_m, part_l,
        float(scale) * LOG2E * float(k_scale), float(v_scale),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        split_tokens, num_splits,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, PAGE=page, BLOCK_N=block_n, SPLIT=num_splits > 1,
        DOT_PREC=_dot_prec(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch * num_heads,)](
            part_acc, part_m, part_l, seq_lens, out,
            out.stride(0), out.stride(1), split_tokens, num_splits,
            NUM_HEADS=num_heads, SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
            HEAD_DIM=head_dim,
            num_warps=4 if head_dim * num_splits <= 8192 else 8, num_stages=1,
        )
    return out


def triton_paged_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0, *, out: torch.Tensor | None = None,
    block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Paged causal prefill attention (see `trtllm_kernels.attention.paged_attention_prefill`).

    q [T, Hq, D]; returns (or writes `out`) [T, Hq, D]. Rows of q that belong to no sequence
    (past query_start_loc[-1]) are left unwritten.
    """
    total, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    num_seqs = block_tables.shape[0]
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()  # no-ops as a rule
    query_start_loc = query_start_loc.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if total == 0 or num_seqs == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else scale
    cfg = prefill_config(head_dim, q.dtype)
    block_m = block_m or cfg["BLOCK_M"]
    block_n = block_n or cfg["BLOCK_N"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    num_tiles = total // block_m + num_seqs
    search_iters = max(0, math.ceil(math.log2(num_seqs))) if num_seqs > 1 else 0

    _paged_prefill_kernel[(num_heads, num_tiles)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        float(scale) * LOG2E * float(k_scale), float(v_scale),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        num_seqs,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, SEARCH_ITERS=search_iters,
        DOT_PREC=_dot_prec(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out


# --------------------------------------------------------------------------------------------
# op registration: the CUDA kernels of trtllm_kernels::paged_attention_{decode,prefill}
# --------------------------------------------------------------------------------------------


def paged_attention_decode_cuda(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale):
    if not supported(q, k_cache) or v_cache.stride(-1) != 1:
        return _decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)
    return triton_paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)


def paged_attention_prefill_cuda(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                 scale, k_scale, v_scale):
    if not supported(q, k_cache) or v_cache.stride(-1) != 1:
        return _prefill_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                            scale, k_scale, v_scale)
    out = triton_paged_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                               scale, k_scale, v_scale)
    return out


def register() -> None:
    from .._library import register_cuda_kernel

    register_cuda_kernel("paged_attention_decode", paged_attention_decode_cuda)
    register_cuda_kernel("paged_attention_prefill", paged_attention_prefill_cuda)


# --------------------------------------------------------------------------------------------
# tuning sweep on the GPU: python -m trtllm_kernels.kernels.triton_attention [--sweep] [--out F]
# --------------------------------------------------------------------------------------------


def _paged_copy(k: torch.Tensor, v: torch.Tensor, page: int, cache_dtype: torch.dtype, scale: float = 1.0):
    """Contiguous k, v [B, Hkv, S, D] -> shuffled paged caches, block table, seq_lens."""
    b, hkv, s, d = k.shape
    n = triton.cdiv(s, page)
    pad = n * page - s

    def pages(x):
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(b, hkv, n, page, d).permute(0, 2, 1, 3, 4)
        x = (x.float() / scale).to(cache_dtype) if cache_dtype == torch.float8_e4m3fn else x.to(cache_dtype)
        return x.reshape(b * n, hkv, page, d)

    perm = torch.randperm(b * n, device=k.device)
    kc = torch.empty((b * n, hkv, page, d), dtype=cache_dtype, device=k.device)
    vc = torch.empty_like(kc)
    kc[perm] = pages(k)
    vc[perm] = pages(v)
    bt = perm.view(b, n).to(torch.int32)
    sl = torch.full((b,), s, dtype=torch.int32, device=k.device)
    return kc, vc, bt, sl


# (batch, context, page) for decode at 32 / 8 heads, D 128; (batch, seq, Hq, Hkv, D) for prefill
BENCH_DECODE = [(64, 4096, 16), (256, 512, 16), (4, 32768, 16), (64, 4096, 64)]
BENCH_PREFILL = (4, 4096, 32, 8, 128)


def _bench_main(argv=None, device="cuda") -> None:  # pragma: no cover - GPU only
    import argparse
    import itertools
    import json

    from triton.testing import do_bench_cudagraph

    ap = argparse.ArgumentParser(description="time / tune the Triton paged attention kernels")
    ap.add_argument("--sweep", action="store_true", help="sweep tile configs and num_splits")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--only", choices=("decode", "prefill"), help="time one kernel only")
    args = ap.parse_args(argv)
    dev, bf16 = device, torch.bfloat16
    rows = []

    def timed(fn):
        try:
            return do_bench_cudagraph(fn, rep=100) * 1e-3  # seconds
        except Exception as e:  # out of resources, ...
            return repr(e)[:120]

    def record(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)
        save()  # partial results survive a timeout

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)

    def copy_bandwidth():  # bytes read + written per second, 1 GiB copied
        x = torch.empty(2 ** 29 if dev == "cuda" else 2 ** 20, dtype=torch.int16, device=dev)
        y = torch.empty_like(x)
        return 2 * x.numel() * x.element_size() / timed(lambda: y.copy_(x))

    copy_bw = copy_bandwidth()
    record(what="copy", GBps=copy_bw / 1e9)

    # ---- decode ----
    for batch, ctx, page in [] if args.only == "prefill" else BENCH_DECODE:
        hq, hkv, d = 32, 8, 128
        q = torch.randn(batch, hq, d, device=dev, dtype=bf16)
        k = torch.randn(batch, hkv, ctx, d, device=dev, dtype=bf16)
        v = torch.randn_like(k)
        base = None
        if page == 16:
            qs = q.view(batch, hq, 1, d)
            base = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qs, k, v, enable_gqa=True))
        for cache_dtype in (bf16, torch.float8_e4m3fn):
            kc, vc, bt, sl = _paged_copy(k, v, page, cache_dtype)
            nbytes = 2 * kc.numel() * kc.element_size() + 2 * q.numel() * q.element_size()
            cfg = decode_config(d, cache_dtype, bf16)
            auto = decode_num_splits(batch, hkv, ctx, cfg["BLOCK_N"], num_sms(q.device))
            cands = [dict()]
            if args.sweep and page == 16:
                grid = ((32, 64, 128), (4, 8), (2, 3, 5)) if cache_dtype == bf16 else ((64, 128), (4, 8), (3, 5))
                cands += [dict(block_n=bn, num_warps=w, num_stages=st) for bn, w, st in itertools.product(*grid)]
                cands += [dict(num_splits=sp) for sp in (1, 2, 3, 4, 8, 16, 32, 64) if sp != auto]
            for kw in cands:
                t = timed(lambda: triton_paged_decode(q, kc, vc, bt, sl, **kw))
                r = dict(what="decode", batch=batch, ctx=ctx, page=page, kv=str(cache_dtype), cfg=kw,
                         auto_splits=auto, default=cfg)
                if isinstance(t, float):
                    r.update(us=t * 1e6, GBps=nbytes / t / 1e9, frac_copy=nbytes / t / copy_bw)
                    if isinstance(base, float):
                        r.update(sdpa_us=base * 1e6, sdpa_GBps=nbytes / base / 1e9 if cache_dtype == bf16 else None,
                                 speedup_vs_sdpa=base / t)
                else:
                    r.update(error=t)
                record(**r)
        del q, k, v, kc, vc

    # ---- prefill ----
    if args.only == "decode":
        return save()
    b, s, hq, hkv, d = BENCH_PREFILL
    flops = 4 * b * hq * s * s * d / 2  # causal
    q = torch.randn(b, hq, s, d, device=dev, dtype=bf16)
    k = torch.randn(b, hkv, s, d, device=dev, dtype=bf16)
    v = torch.randn_like(k)
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        base = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True))
    qt = q.transpose(1, 2).reshape(b * s, hq, d).contiguous()
    qsl = torch.arange(0, b * s + 1, s, dtype=torch.int32, device=dev)
    for page in (16, 64):
        for cache_dtype in (bf16, torch.float8_e4m3fn):
            kc, vc, bt, sl = _paged_copy(k, v, page, cache_dtype)
            cands = [dict()]
            if args.sweep and page == 16 and cache_dtype == bf16:
                cands += [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st) for bm, bn, w, st in
                          [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 5), (128, 64, 8, 6), (128, 128, 8, 3),
                           (128, 128, 8, 5), (128, 32, 8, 5), (128, 32, 4, 5), (64, 64, 4, 5), (64, 64, 4, 3),
                           (64, 128, 4, 4), (128, 64, 4, 5)]]
            for kw in cands:
                t = timed(lambda: triton_paged_prefill(qt, kc, vc, bt, sl, qsl, **kw))
                r = dict(what="prefill", batch=b, seq=s, page=page, kv=str(cache_dtype), cfg=kw,
                         default=prefill_config(d, bf16), sdpa_flash=base)
                if isinstance(base, float):
                    r.update(sdpa_flash_us=base * 1e6, sdpa_TFLOPs=flops / base / 1e12)
                if isinstance(t, float):
                    r.update(us=t * 1e6, TFLOPs=flops / t / 1e12)
                    if isinstance(base, float):
                        r.update(speedup_vs_sdpa=base / t)
                else:
                    r.update(error=t)
                record(**r)
    save()


if __name__ == "__main__":  # pragma: no cover
    _bench_main()
