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
v_scale is applied once at the end). FP8 pages are loaded as fp8 and converted in registers,
to fp16 by default (F16_MATH: one cvt per pair against four for bf16; q is pre-scaled by the
softmax scale and cast to fp16, the dots run in fp16 with fp32 accumulation), with registers
capped at 128 so four programs share an SM. Decode is memory bound and its speed is the bytes
in flight per SM, which come from the programs an SM runs at once (up to 4 stages, Triton issues
a program's next copy after its current tile's math; FP8 pages with long block tables take 6):
`decode_config` records that occupancy (`per_sm`).

Split-KV (flash-decoding): the context is cut into `num_splits` chunks of `split_tokens`
(a multiple of BLOCK_N); each program writes its unnormalised fp32 accumulator and its
(max, sum) to scratch; the last of a (sequence, kv head)'s splits to finish (an arrival
counter, `triton_tiles.last_to_arrive`) merges the splits that hold tokens
(cdiv(seq_len, split_tokens) of them: splits past a sequence's end exit at once and are never
read) in the same launch, with one load of their partials. `decode_num_splits` picks num_splits
from static shapes only (batch * Hkv against the SMs' resident programs, aiming for one full
wave, and the largest possible context block_tables.shape[1] * block_size), so no host sync on
seq_lens happens and the launch is CUDA-graph safe. B64 x 4096 at 32/8 heads is 512 programs,
one wave: no split, no merge.

Quantized output (`quant_out`, `paged_attention_decode_quant_fp8`: the FP8 engine's input to
the o projection): each (sequence, kv head) writes its rows, then the last of a sequence's kv
heads to finish (a second counter) quantizes the whole row per token into fp8, the bits of
`quantize_fp8_per_token` on the unfused output. Batch 1 on an H200 (Llama-3.1-8B shape, FP8):
decode with merge and quantization 7.4 us a layer, against 4.0 + 1.8 + 1.9 us for the decode,
merge and quantization kernels it replaces; TPOT 3.094 -> 3.080 ms for the quantization, the
merge about even (benchmarks/results/h200-2026-11-28-fused-tails). A fence and a round trip to
L2 cost about what a small kernel does.

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
GQA group share K/V tiles in L2. The default tiles (`prefill_config`) cap registers at 128 so
two programs share an SM and one's softmax overlaps the other's wgmma. When BLOCK_N divides
the page size and the caches are contiguous, K/V tiles are loaded through 2-D TMA descriptors
over the caches viewed as [num_blocks * Hkv * page, D] rows (USE_TMA; on the diagonal the V
rows past the sequence's end are zeroed, as they may hold anything).

GQA packing (`pack`, PACK): the PACK query heads of one kv head can share a prefill program,
row r of the tile being position r // PACK of head h0 + r % PACK, so each K/V tile is loaded
once for them and a tile covers BLOCK_M // PACK positions. Measured on H100 (4 x 4096, 32/8
heads, .device/F-1): page 16 1280 us -> 1253 (PACK 2) / 1259 (PACK 4); pages of 64 with TMA
1168 -> 1157; chunked prefill 303 -> 310. Within noise, so bf16 pages keep PACK 1; FP8 pages,
whose tiles are converted in registers, take PACK 4 (1.25-1.59x, see `prefill_config`).

Prefill dispatch: on Hopper, trtllm_kernels::paged_attention_prefill runs the Gluon kernel of
kernels/gluon_attention.py (TMA loader warp, asynchronous wgmma overlapped with the softmax,
persistent programs: H100 4 x 4096 causal 1044 us against this kernel's 1302, chunked 227 against
312) for bf16 / fp16 caches and calls of 512+ query tokens, and this kernel for smaller calls,
FP8 caches, fp32 and other GPUs (`prefill_backend`, override with
TRTLLM_KERNELS_PREFILL_BACKEND=triton|gluon). Triton 3.6 cannot
express the Gluon kernel's overlap: its pipeliner keeps a wgmma in flight only when the result
feeds another wgmma's accumulator (a software-pipelined variant here waited at once), and its
automatic warp specialization did not apply to this loop on sm_90.

Decode dispatch: trtllm_kernels::paged_attention_decode runs this Triton kernel or the CUDA C++
one of csrc/paged_decode.cu (`decode_backend`, rule in `cuda_decode_preferred`, override with
TRTLLM_KERNELS_DECODE_BACKEND=triton|cuda|auto): CUDA for FP8 pages at head dims 64 and 128,
where it measured 0.54-0.85x this kernel's time on H200 (it pays less per key for the FP8
conversion); Triton for bf16 / fp16 pages (as fast) and everything else.

Tuning: `python -m trtllm_kernels.kernels.triton_attention [--sweep] [--warm N] [--out F]
[--best-out F]` times decode / prefill / chunked prefill beside SDPA at the issue's shapes
(--sweep: the SWEEP_* grids, each prefill config checked against SDPA's output).

Both kernels accumulate in fp32; fp32 inputs use IEEE (not TF32) dots. Head dims must be
powers of two in [16, 256] and the last dim of q and the caches contiguous; other inputs fall
back to the reference implementation in the registered op.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..attention import _decode_ref, _prefill_ref
from ..fp8 import FP8
from .triton_fp8 import quantize_dynamic
from .triton_tiles import DEFAULT_NUM_SMS, arrival_counters, last_to_arrive, num_sms, pdl, pdl_trigger

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
# Longest output row (Hq x D values) the decode kernel quantizes in its epilogue: one program
# holds the row in registers (16384 values: 128 heads of 128).
QUANT_ROW_MAX = 16384
# The merge of a (sequence, kv head)'s splits loads its heads' partials at once, in groups of
# heads of up to this many values (heads x splits x D: 64 registers a thread at 4 warps).
MERGE_VALUES = 8192


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
def _decode_pages(bt_row, start, hi, offs_n, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Block ids of the keys start + offs_n (a scalar when the tile sits in one page)."""
    if PAGE % BLOCK_N == 0:
        page = tl.load(bt_row + start // PAGE, mask=start < hi, other=0).to(tl.int64)
    else:
        tok = start + offs_n
        page = tl.load(bt_row + tok // PAGE, mask=tok < hi, other=0).to(tl.int64)
    return page


@triton.jit
def _decode_kv(k_head, v_head, page, start, hi, offs_n, offs_d, stride_kb, stride_kt, stride_vb, stride_vt,
               PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_N, D] K and V tiles of keys start + offs_n (zeros at and past hi)."""
    tok = start + offs_n
    mask = (tok < hi)[:, None]
    if PAGE % BLOCK_N == 0:
        k_rows = page * stride_kb + (tok % PAGE) * stride_kt
        v_rows = page * stride_vb + (tok % PAGE) * stride_vt
    else:
        k_rows = page * stride_kb + (offs_n % PAGE) * stride_kt
        v_rows = page * stride_vb + (offs_n % PAGE) * stride_vt
    k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def _decode_step(q, k, v, acc, l_i, m_i, qk_scale, mask_n, DOT_PREC: tl.constexpr):
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _merge_splits(PartAcc, PartM, PartL, rows, mask_g, n_active, SPLITS_PAD: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    """The output [G, HEAD_DIM] (fp32) of G heads from the partials of their first n_active
    splits, head g's at scratch rows rows[g] .. rows[g] + n_active - 1, all loaded at once (one
    round trip to L2, not one per head). A split with no key (m = -inf: a sequence of length 0,
    as in a padded CUDA-graph batch) weighs nothing; no key at all gives zeros. Loads bypass L1
    (.cg): other programs wrote the scratch during this launch."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    idx = rows[:, None] + offs_s[None, :]
    mask = mask_g[:, None] & (offs_s < n_active)[None, :]
    m = tl.load(PartM + idx, mask=mask, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(PartL + idx, mask=mask, other=0.0, cache_modifier=".cg")
    acc = tl.load(PartAcc + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=mask[:, :, None],
                  other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, 1)
    w = tl.math.exp2(tl.where(m > float("-inf"), m - m_max[:, None], float("-inf")))
    num = tl.sum(acc * w[:, :, None], 1)
    den = tl.sum(l * w, 1)
    return num / tl.where(den > 0.0, den, 1.0)[:, None]


@triton.jit
def _store_rows(out, heads, mask_g, b, Out, stride_ob, stride_oh, HEAD_DIM: tl.constexpr):
    """Writes the heads' output rows out [R, HEAD_DIM] (fp32) of sequence b in Out's dtype."""
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_g[:, None])


@triton.jit
def _quantize_row(Out, QOut, QScale, b, stride_ob, ROW: tl.constexpr, ROW_PAD: tl.constexpr,
                  INTERP: tl.constexpr):
    """Sequence b's whole output row (Hq x D contiguous in Out, written by this launch's
    programs) -> fp8 QOut[b] and its scale QScale[b], as `quantize_fp8_per_token` quantizes it."""
    offs = tl.arange(0, ROW_PAD)
    mask = offs < ROW
    x = tl.load(Out + b.to(tl.int64) * stride_ob + offs, mask=mask, other=0.0, cache_modifier=".cg")
    q, scale = quantize_dynamic(x.to(tl.float32), INTERP)
    tl.store(QScale + b, scale)
    tl.store(QOut + b.to(tl.int64) * ROW + offs, q.to(QOut.dtype.element_ty), mask=mask)


# Arguments that change from step to step (block-table width, split sizes, batch size; in the
# prefill kernel also the metadata pointers, which a mixed step offsets past its decodes) are not
# specialized: Triton would compile a variant for each value that is 1 or a multiple of 16 (each
# pointer 16-byte aligned or not), seconds each in the middle of serving (a throughput run on an
# H200 met four such compiles).
@triton.jit(do_not_specialize=["stride_bt", "split_tokens", "num_splits", "seq_counters"])
def _paged_decode_kernel(
    Q, K, V, BT, SL, Out, PartAcc, PartM, PartL, Counters, QOut, QScale,
    qk_scale, v_scale, q_fold,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bt, stride_ob, stride_oh,
    split_tokens, num_splits, seq_counters,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, MERGE_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, SPLITS_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    QUANT_OUT: tl.constexpr, ROW_PAD: tl.constexpr, INTERP: tl.constexpr, F16_MATH: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """See the module docstring. Counters: arrival counters, Counters[pid] for a (sequence, kv
    head)'s splits and, with QUANT_OUT, Counters[seq_counters + b] for sequence b's kv heads:
    the last of them quantizes the sequence's output row (Out, then a scratch) into QOut /
    QScale."""
    pdl_trigger(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // NUM_KV_HEADS
    kvh = pid % NUM_KV_HEADS
    seq_len = tl.load(SL + b)
    lo = split * split_tokens
    hi = tl.minimum(seq_len, lo + split_tokens)
    if SPLIT:
        if split > 0 and lo >= seq_len:  # this split holds no tokens: it neither counts nor is read
            return

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None], other=0.0)
    if F16_MATH:
        # FP8 pages convert to fp16 in one instruction per pair (bf16 takes three more), so
        # the dots run in fp16 (more mantissa than bf16). The host then passes the softmax
        # scale * log2(e) as q_fold, folded into q here (|q * q_fold| < 65504 for any sane
        # query), and k_scale alone as qk_scale.
        q = (q.to(tl.float32) * q_fold).to(tl.float16)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = BT + b.to(tl.int64) * stride_bt
    k_head = K + kvh.to(tl.int64) * stride_kh
    v_head = V + kvh.to(tl.int64) * stride_vh

    for start in range(lo, hi, BLOCK_N):
        page = _decode_pages(bt_row, start, hi, offs_n, PAGE, BLOCK_N)
        k, v = _decode_kv(k_head, v_head, page, start, hi, offs_n, offs_d, stride_kb, stride_kt,
                          stride_vb, stride_vt, PAGE, BLOCK_N)
        acc, l_i, m_i = _decode_step(q, k, v, acc, l_i, m_i, qk_scale, start + offs_n < hi, DOT_PREC)

    if not SPLIT:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        _store_rows(acc * (v_scale / l_safe)[:, None], heads, mask_g, b, Out, stride_ob, stride_oh,
                    HEAD_DIM)
        if QUANT_OUT:
            if last_to_arrive(Counters + seq_counters + b, NUM_KV_HEADS):
                _quantize_row(Out, QOut, QScale, b, stride_ob, NUM_KV_HEADS * GROUP * HEAD_DIM, ROW_PAD,
                              INTERP)
    else:
        # scratch is [B, Hq, num_splits] (+ [D]) contiguous; acc keeps v_scale, not 1 / l
        row = (b * (NUM_KV_HEADS * GROUP) + heads).to(tl.int64) * num_splits + split
        tl.store(PartAcc + row[:, None] * HEAD_DIM + offs_d[None, :], acc * v_scale,
                 mask=mask_g[:, None])
        tl.store(PartM + row, m_i, mask=mask_g)
        tl.store(PartL + row, l_i, mask=mask_g)
        # the last split of this (sequence, kv head) to finish merges them all
        n_active = tl.maximum(tl.cdiv(seq_len, split_tokens), 1)
        if last_to_arrive(Counters + pid, n_active):
            for h0 in tl.static_range(0, GROUP, MERGE_HEADS):  # MERGE_HEADS at a time
                offs_h = h0 + tl.arange(0, MERGE_HEADS)
                mask_h = offs_h < GROUP
                merged = kvh * GROUP + offs_h
                rows = (b * (NUM_KV_HEADS * GROUP) + merged).to(tl.int64) * num_splits
                out = _merge_splits(PartAcc, PartM, PartL, rows, mask_h, n_active, SPLITS_PAD, HEAD_DIM)
                _store_rows(out, merged, mask_h, b, Out, stride_ob, stride_oh, HEAD_DIM)
            if QUANT_OUT:
                if last_to_arrive(Counters + seq_counters + b, NUM_KV_HEADS):
                    _quantize_row(Out, QOut, QScale, b, stride_ob, NUM_KV_HEADS * GROUP * HEAD_DIM, ROW_PAD,
                                  INTERP)


@triton.jit
def _attend_tile(q, k, v, acc, l_i, m_i, qk_scale, q_pos, tok,
                 MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over a [BLOCK_N, D] K/V tile (exp2 domain); MASK: causal."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if MASK:
        s = tl.where(tok[None, :] <= q_pos[:, None], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["num_seqs", "stride_bt", "BT", "SL", "QSL"])
def _paged_prefill_kernel(
    Q, K, V, KD, VD, BT, SL, QSL, Out,
    qk_scale, v_scale,
    stride_qt, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bt, stride_ot, stride_oh,
    num_seqs,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEARCH_ITERS: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr = False, PACK: tl.constexpr = 1,
):
    # PACK query heads of one kv head share the program (GQA packing): row r of the tile is
    # position r // PACK of head h0 + r % PACK, so a tile covers BLOCK_Q = BLOCK_M // PACK
    # positions and each K/V tile is loaded once for the PACK heads. PACK = 1: one head.
    BLOCK_Q: tl.constexpr = BLOCK_M // PACK
    h0 = tl.program_id(0) * PACK
    tile = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest tiles first

    # Sequence i owns tiles [QSL[i] // BLOCK_Q + i, QSL[i+1] // BLOCK_Q + i + 1): find the
    # largest i whose first tile is <= tile (fixed-length binary search, no host sync).
    lo = tl.program_id(1) * 0  # an int32 tensor even when SEARCH_ITERS == 0
    hi = num_seqs
    for _ in tl.static_range(SEARCH_ITERS):
        mid = (lo + hi) // 2
        first = tl.load(QSL + mid) // BLOCK_Q + mid
        right = first <= tile
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    seq = lo
    q_start = tl.load(QSL + seq)
    q_len = tl.load(QSL + seq + 1) - q_start
    local = tile - (q_start // BLOCK_Q + seq)
    if local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(SL + seq)
    ctx = seq_len - q_len  # tokens before this sequence's first query

    rows = tl.arange(0, BLOCK_M)
    offs_m = local * BLOCK_Q + rows // PACK  # each row's query index within the sequence
    heads = h0 + rows % PACK
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < q_len
    q_pos = ctx + offs_m
    q_rows = (q_start + offs_m).to(tl.int64)
    q_off = q_rows * stride_qt + heads * stride_qh
    q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=mask_m[:, None], other=0.0)

    kvh = h0 // GROUP
    bt_row = BT + seq.to(tl.int64) * stride_bt
    k_head = K + kvh.to(tl.int64) * stride_kh
    v_head = V + kvh.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    first_pos = ctx + local * BLOCK_Q
    end = tl.minimum(first_pos + BLOCK_Q, seq_len)  # one past the last query's position
    full_end = (first_pos // BLOCK_N) * BLOCK_N  # keys below are visible to every query
    # within a tile, the keys' offsets in their pages do not change from tile to tile
    k_off = ((offs_n % PAGE) * stride_kt)[:, None] + offs_d[None, :]
    v_off = ((offs_n % PAGE) * stride_vt)[:, None] + offs_d[None, :]

    # 1) key tiles visible to every query in the tile: no masks at all
    for start in range(0, full_end, BLOCK_N):
        tok = start + offs_n
        if USE_TMA:  # the tile is BLOCK_N consecutive rows of one page: one bulk copy each
            page = tl.load(bt_row + start // PAGE)
            row = (page * NUM_KV_HEADS + kvh) * PAGE + start % PAGE
            k = KD.load([row, 0])
            v = VD.load([row, 0])
        else:
            if PAGE % BLOCK_N == 0:
                page = tl.load(bt_row + start // PAGE).to(tl.int64)
                k = tl.load(k_head + page * stride_kb + (start % PAGE) * stride_kt + k_off)
                v = tl.load(v_head + page * stride_vb + (start % PAGE) * stride_vt + v_off)
            else:
                page = tl.load(bt_row + tok // PAGE).to(tl.int64)
                k = tl.load(k_head + (page * stride_kb)[:, None] + k_off)
                v = tl.load(v_head + (page * stride_vb)[:, None] + v_off)
        acc, l_i, m_i = _attend_tile(q, k.to(q.dtype), v.to(q.dtype), acc, l_i, m_i, qk_scale,
                                     q_pos, tok, False, DOT_PREC)

    # 2) tiles that cross the diagonal: causal mask, and never past `end`
    for start in range(full_end, end, BLOCK_N):
        tok = start + offs_n
        mask_n = tok < end
        if USE_TMA:
            page = tl.load(bt_row + start // PAGE)
            row = (page * NUM_KV_HEADS + kvh) * PAGE + start % PAGE
            k = KD.load([row, 0])
            # slots past the end may hold anything (NaN): zero them, as p = 0 there
            v = tl.where(mask_n[:, None], VD.load([row, 0]), 0.0)
        else:
            if PAGE % BLOCK_N == 0:
                page = tl.load(bt_row + start // PAGE).to(tl.int64)
                k = tl.load(k_head + page * stride_kb + (start % PAGE) * stride_kt + k_off,
                            mask=mask_n[:, None], other=0.0)
                v = tl.load(v_head + page * stride_vb + (start % PAGE) * stride_vt + v_off,
                            mask=mask_n[:, None], other=0.0)
            else:
                page = tl.load(bt_row + tok // PAGE, mask=mask_n, other=0).to(tl.int64)
                k = tl.load(k_head + (page * stride_kb)[:, None] + k_off, mask=mask_n[:, None], other=0.0)
                v = tl.load(v_head + (page * stride_vb)[:, None] + v_off, mask=mask_n[:, None], other=0.0)
        acc, l_i, m_i = _attend_tile(q, k.to(q.dtype), v.to(q.dtype), acc, l_i, m_i, qk_scale,
                                     q_pos, tok, True, DOT_PREC)

    out = acc * (v_scale / l_i)[:, None]
    o_off = q_rows * stride_ot + heads * stride_oh
    tl.store(Out + o_off[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mask_m[:, None])


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------


# From this many (sequence, kv head) programs, FP8 decode at D 128 runs small programs: 2 warps,
# 32-key tiles (see decode_config).
DECODE_SMALL_TILES_MIN_PROGRAMS = 2048
# From this block-table width (tokens), FP8 decode keeps two K/V tiles in flight (6 stages).
DECODE_DEEP_MIN_CONTEXT = 1024


def decode_config(head_dim: int, cache_dtype: torch.dtype, q_dtype: torch.dtype, programs: int = 0,
                  max_context: int = 0) -> dict:
    """Launch knobs for decode, and `per_sm`: how many programs an SM runs at once.

    Decode is memory bound, and at up to 4 stages Triton 3.6 issues a program's next K/V copy
    only after its current tile's math, so the bytes in flight per SM come from the several
    programs an SM runs at once: occupancy matters more than tile size. Measured on H100 (B64 x 4096, 32/8
    heads, D128, 1 split): bf16 BLOCK_N 64 (104 registers, 39 KB smem, 4 programs per SM)
    357 us = 3.0 TB/s, as fast as BLOCK_N 32 or 128. FP8 pages pay for their conversion in
    registers: converted to bf16 (3 extra instructions a pair) at BLOCK_N 128 they need 168
    registers (3 per SM, 253-280 us); converted to fp16 instead (F16_MATH: one instruction a
    pair, the dots in fp16) at BLOCK_N 64 capped at 128 registers (4 per SM, no spills)
    201 us = 2.7 TB/s, 0.56x the bf16 time. `decode_num_splits` sizes the grid to `per_sm`.

    programs: batch * kv heads. A serving run's decode batches are large and their contexts
    short (a 128/128 throughput run decodes 1000 sequences at 128-256 tokens), so a program
    streams a few tiles and its start-up is much of its time: from
    DECODE_SMALL_TILES_MIN_PROGRAMS programs, FP8 pages at D 128 go through 2-warp programs of
    32-key tiles, more of them per SM. Measured on H100 (benchmarks/decode_sweep.py, 32/8
    heads, page 16, block tables 512+ tokens wide, us against the 4-warp 64-key default):
    B1024 x 128 114 / 123, B1024 x 256 211 / 220, B512 x 1024 389 / 395, B256 x 512 103 / 107
    (0.88 of copy bandwidth), pages of 64 B1024 x 128 107 / 120; but B64 x 4096 (512
    programs) 250 / 199, hence the threshold.

    max_context: the block table's width in tokens (static). Triton 3.6 keeps
    (num_stages - 2) // 2 K/V tiles in flight ahead of a program's math (the block-table load
    takes stages of its own): one up to 4 stages, two at 6. FP8 pages stream half the bytes
    of bf16 for the same math, and with contexts of DECODE_DEEP_MIN_CONTEXT+ the second tile in
    flight pays. Measured on H200 (benchmarks/decode_sweep.py --deep, 32/8 heads, us at 4 / 6
    stages): B512 x 1536 in pages of 32 (the FP8 1000/1000 run's decode batch) 474 / 442,
    B64 x 4096 198 / 185; with 512-token tables B1024 x 192 130 / 128 but B256 x 512 94 / 99.
    Bulk (TMA) copies of one page a tile instead of cp.async: slower at every shape (491 at
    B512 x 1536).
    """
    if _interpreting():
        return dict(BLOCK_N=32, num_warps=4, num_stages=1, per_sm=4, F16_MATH=False)
    es = cache_dtype.itemsize
    if q_dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2, per_sm=4, F16_MATH=False)
    block_n = max(16, min(128, 8192 // head_dim))  # 64 at D128, 128 at D64
    stages = 6 if max_context >= DECODE_DEEP_MIN_CONTEXT else 3
    if es == 1 and head_dim == 128 and programs >= DECODE_SMALL_TILES_MIN_PROGRAMS:
        # per_sm: 8 programs of 64 threads x 128 registers fill the register file
        return dict(BLOCK_N=32, num_warps=2, num_stages=stages, per_sm=8, F16_MATH=True, maxnreg=128)
    if es == 1:
        return dict(BLOCK_N=block_n, num_warps=4, num_stages=stages, per_sm=4, F16_MATH=True, maxnreg=128)
    return dict(BLOCK_N=block_n, num_warps=4, num_stages=3, per_sm=4, F16_MATH=False)


def prefill_config(head_dim: int, q_dtype: torch.dtype, page: int = 16,
                   cache_dtype: torch.dtype | None = None) -> dict:
    """Tiles for prefill on H100; one small config under the interpreter.

    D=128, bf16/fp16 caches (measured on H100, 4 x 4096 causal, 32/8 heads, page 16): BLOCK_M
    128, BLOCK_N 64, 8 warps, 3 stages with registers capped at 128 (`maxnreg`, 64 bytes of
    spills) so that two programs share an SM: 1266 us = 434 TFLOP/s, against 1450-1615 us for
    the same tiles at one program per SM (stages 3-5, 180 registers), 1460 us for BLOCK_N 128
    and 1532-1562 us for BLOCK_M 64 / 4 warps. Two programs per SM let one's softmax overlap
    the other's wgmma, which a single program (its two warpgroups in lockstep) cannot. With
    pages of 64 or more the same tiles go through TMA descriptors: 1161 us. GQA packing (PACK,
    see the module docstring) measured within 2% either way: default 1.

    FP8 pages (D 128) take the same capped tiles with PACK 4 (each K/V tile converted once for
    the group's four heads): on H100, pages of 16 and 32, against the uncapped one-program
    tiles (BLOCK_M 128, BLOCK_N 64, 8 warps, 5 stages) they had before: 64 prompts of 128
    tokens 100 against 159 us, 8 of 1000 273 against 352 us, 8 x 500 new over 500 cached 197
    against 246 us, 4 x 4096 1708 against 2184 us (benchmarks/prefill_fp8_sweep.py; results in
    benchmarks/results/h100-2026-11-28/fp8_prefill_page32/).

    num_stages counts the block-table load as a stage of its own. TRTLLM_KERNELS_PREFILL_CONFIG
    (a JSON object, inline or a file, of the keys in _PREFILL_KEYS) overrides the table: the
    sweep writes one (`--best-out`).
    """
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    if q_dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    fp8 = cache_dtype == torch.float8_e4m3fn
    if head_dim <= 64:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=5)
    elif head_dim <= 128 and fp8:  # two programs per SM, as bf16, and GQA packing
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, maxnreg=128, PACK=4)
    elif head_dim <= 128:  # smem 98 KB, 128 registers: two programs per SM
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, maxnreg=128)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=5)
    override = os.environ.get("TRTLLM_KERNELS_PREFILL_CONFIG")
    if override:  # tuning: a JSON object (a file or inline) of these keys, e.g. from --sweep
        import json

        text = open(override).read() if os.path.isfile(override) else override
        cfg.update({k: v for k, v in json.loads(text).items() if k in _PREFILL_KEYS})
    return cfg


_PREFILL_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg", "PACK")


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int,
                      sms: int = DEFAULT_NUM_SMS, per_sm: int = 4, min_split_tokens: int = 256) -> int:
    """How many KV splits for decode, from static sizes only (CUDA-graph safe).

    A decode program streams its share of one (sequence, kv head)'s K/V; the GPU runs
    `slots = sms * per_sm` programs at once, and being memory bound they share the bandwidth
    alike. A wave of n programs takes about max(n, slots / 2) units per token of program
    length (under half full, the programs can no longer keep enough bytes in flight), so
    splitting P programs s ways costs ~ (full waves * slots + max(last wave, slots / 2)) / s,
    plus ~3% for the reduce pass. One full wave is best: every program starts at once and all
    finish together. Minimise that over s (at most MAX_SPLITS, no split shorter than
    `min_split_tokens` of the largest possible context unless a program per tile fits one
    wave). H100 (132 SMs, 4 per SM): B64 x 4096 (8 kv heads) -> 1 (measured 357 us; 2 splits
    362, 3 splits 368), B256 x 512 -> 1, B4 x 32768 -> 9 (188 us, as fast as 32). Splits past
    a sequence's actual end exit at once.
    """
    programs = batch * num_kv_heads
    slots = max(1, sms * per_sm)
    tiles = triton.cdiv(max_context, block_n)
    # Where even a program per tile fits one wave, a program's time is its chain of dependent
    # loads (block table, then K/V), tile after tile, not bandwidth: splits down to one tile
    # run the chain once. Batch 1 (8 kv heads, 512-token tables): 8 splits, 8.4 -> 3.9 us a layer
    # at context 192 on an H200 (results/h200-2026-11-28-batch1).
    floor = 1 if programs * tiles <= slots else max(1, min_split_tokens // block_n)
    max_splits = min(MAX_SPLITS, max(1, tiles // floor))

    def cost(s: int) -> float:
        full, last = divmod(programs * s, slots)
        waves = full * slots + (max(last, slots / 2) if last else 0)
        return waves / s * (1.03 if s > 1 else 1.0)

    best = min(range(1, max_splits + 1), key=lambda s: (round(cost(s), 6), s))
    if best <= 1:
        return 1
    tiles_per_split = triton.cdiv(tiles, best)
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
    *, out: torch.Tensor | None = None, quant_out: bool = False, num_splits: int | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    poison_scratch: bool = False, f16_math: bool | None = None, maxnreg: int | None = None,
    per_sm: int | None = None,
):
    """Paged decode attention (see `trtllm_kernels.attention.paged_attention_decode`).

    q [B, Hq, D]; returns (or writes `out`) [B, Hq, D]. quant_out: returns instead the output
    rows quantized to fp8 per token, (fp8 [B, Hq * D], fp32 scales [B, 1]), as
    `paged_attention_decode_quant_fp8` (rows of up to QUANT_ROW_MAX values; `out`, if given,
    receives the unquantized rows). Keyword-only knobs override the launch config (for tests and
    tuning); `poison_scratch` fills the split-KV scratch with NaN.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    row = num_heads * head_dim
    if quant_out and row > QUANT_ROW_MAX:
        raise ValueError(f"quant_out takes rows of up to {QUANT_ROW_MAX} values, got {num_heads} x {head_dim}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()  # no-ops as a rule
    if quant_out and out is not None and not out.is_contiguous():
        raise ValueError("quant_out reads whole output rows back: `out` must be contiguous")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    q_out = torch.empty(batch, row if quant_out else 0, dtype=FP8, device=q.device)
    q_scale = torch.empty(batch, 1 if quant_out else 0, dtype=torch.float32, device=q.device)
    if batch == 0:
        return (q_out, q_scale) if quant_out else out
    scale = head_dim ** -0.5 if scale is None else scale
    max_context = block_tables.shape[1] * page
    cfg = decode_config(head_dim, k_cache.dtype, q.dtype, batch * num_kv_heads, max_context)
    block_n = block_n or cfg["BLOCK_N"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    f16_math = cfg["F16_MATH"] if f16_math is None else f16_math
    maxnreg = maxnreg or cfg.get("maxnreg")
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, max_context, block_n, num_sms(q.device),
                                       per_sm or cfg["per_sm"])
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
    # splits count in at [0, B * Hkv), a quantized output's kv heads at [B * Hkv, B * Hkv + B)
    seq_counters = batch * num_kv_heads
    counters = arrival_counters(q.device, seq_counters + batch) if quant_out or num_splits > 1 else out

    f16_math = bool(f16_math) and k_cache.dtype == torch.float8_e4m3fn
    qk_scale = float(scale) * LOG2E * float(k_scale)
    splits_pad = max(2, triton.next_power_of_2(num_splits))
    _paged_decode_kernel[(batch * num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_m, part_l, counters, q_out, q_scale,
        float(k_scale) if f16_math else qk_scale, float(v_scale), float(scale) * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        split_tokens, num_splits, seq_counters,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        MERGE_HEADS=max(1, min(triton.next_power_of_2(group), MERGE_VALUES // (splits_pad * head_dim))),
        HEAD_DIM=head_dim, PAGE=page, BLOCK_N=block_n, SPLIT=num_splits > 1,
        SPLITS_PAD=splits_pad, DOT_PREC=_dot_prec(q.dtype),
        QUANT_OUT=quant_out, ROW_PAD=triton.next_power_of_2(row), INTERP=_interpreting(), F16_MATH=f16_math,
        PDL=pdl(q.device, batch), num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return (q_out, q_scale) if quant_out else out


def _cache_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int):
    """2-D TMA descriptors over the caches viewed as [num_blocks * Hkv * page, D] rows, with
    [block_n, D] boxes; None where a cache is not contiguous in that view."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    descs = []
    for c in (k_cache, v_cache):
        n, hkv, page, d = c.shape
        if c.stride() != (hkv * page * d, page * d, d, 1) or c.data_ptr() % 16 or (d * c.element_size()) % 16:
            return None
        descs.append(TensorDescriptor(c, [n * hkv * page, d], [d, 1], [block_n, d]))
    return descs


def prefill_search_iters(num_seqs: int) -> int:
    """Steps of the prefill kernels' binary search for a tile's sequence: ceil(log2(num_seqs))
    rounded up to a multiple of 4 (extra steps keep the answer), so a new batch size rarely
    means a new compile (Triton's JIT costs seconds a variant, mid-run)."""
    return 4 * math.ceil(math.log2(num_seqs) / 4) if num_seqs > 1 else 0


def triton_paged_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0, *, out: torch.Tensor | None = None,
    block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, use_tma: bool | None = None, maxnreg: int | None = None,
    pack: int | None = None,
) -> torch.Tensor:
    """Paged causal prefill attention (see `trtllm_kernels.attention.paged_attention_prefill`).

    q [T, Hq, D]; returns (or writes `out`) [T, Hq, D]. Rows of q that belong to no sequence
    (past query_start_loc[-1]) are left unwritten. `use_tma` (default: where the page size is
    a multiple of BLOCK_N, the caches are contiguous and the GPU is Hopper or newer) loads K/V
    tiles with TMA descriptors instead of gathered pointer loads. `pack` (GQA packing, a
    divisor of Hq // Hkv with BLOCK_M // pack >= 16): query heads of one kv head that share a
    tile, so K/V tiles are loaded once for them (default: the config's PACK where it divides
    the group, else 1).
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
    cfg = prefill_config(head_dim, q.dtype, page, k_cache.dtype)
    block_m = block_m or cfg["BLOCK_M"]
    block_n = block_n or cfg["BLOCK_N"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    maxnreg = maxnreg or cfg.get("maxnreg")
    group = num_heads // num_kv_heads
    if pack is None:
        pack = cfg.get("PACK", 1)
        pack = pack if group % pack == 0 and block_m // pack >= 16 else 1
    if group % pack or block_m % pack or block_m // pack < 1:
        raise ValueError(f"pack={pack} must divide the group ({group}) and BLOCK_M ({block_m})")
    num_tiles = total // (block_m // pack) + num_seqs
    search_iters = prefill_search_iters(num_seqs)
    if use_tma is None:
        use_tma = (page % block_n == 0 and q.is_cuda and not _interpreting()
                   and torch.cuda.get_device_capability(q.device)[0] >= 9)
    descs = _cache_descriptors(k_cache, v_cache, block_n) if use_tma and page % block_n == 0 else None
    kd, vd = descs if descs is not None else (k_cache, v_cache)

    _paged_prefill_kernel[(num_heads // pack, num_tiles)](
        q, k_cache, v_cache, kd, vd, block_tables, seq_lens, query_start_loc, out,
        float(scale) * LOG2E * float(k_scale), float(v_scale),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        num_seqs,
        NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, SEARCH_ITERS=search_iters,
        DOT_PREC=_dot_prec(q.dtype), USE_TMA=descs is not None, PACK=pack,
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return out


# --------------------------------------------------------------------------------------------
# op registration: the CUDA kernels of trtllm_kernels::paged_attention_{decode,prefill}
# --------------------------------------------------------------------------------------------


def cuda_decode_preferred(head_dim: int, page: int, cache_dtype: torch.dtype) -> bool:
    """The dispatch rule between the two decode kernels, from static shapes only: the CUDA C++
    kernel (csrc/paged_decode.cu, tensor-core variant: a warp per program, two steps of K/V in
    registers) for FP8 pages at head dim 64 or 128 in pages it takes (powers of two of 16+
    tokens), Triton elsewhere.

    Measured on H200 (benchmarks/decode_sweep.py --cuda, 32/8 heads, CUDA graphs), Triton / CUDA
    us, FP8 pages at D 128: B1024 x 128 105.4 / 78.8, B1024 x 256 188.6 / 143.4, B256 x 512
    94.9 / 80.0, B512 x 1024 367.7 / 259.4, B512 x 1536 (pages of 32) 451.8 / 382.7, B64 x 4096
    186.1 / 141.6 (3 splits); the CUDA kernel streams 0.80-1.00 of copy bandwidth where Triton's
    conversions in registers hold it to 0.64-0.84. At D 64 (--head-dim 64): 0.54-0.77x Triton's
    time at every shape (B1024 x 128 69.2 / 43.4, B64 x 4096 92.8 / 71.1). bf16 pages at D 128:
    within 4% either way (B1024 x 128 146.5 / 141.4, B64 x 4096 245.8 / 251.5), so Triton stays.
    """
    from .csrc import mma_page

    return cache_dtype == torch.float8_e4m3fn and head_dim in (64, 128) and mma_page(page)


def decode_backend(q, k_cache, v_cache, block_tables) -> str:
    """'cuda' (csrc/paged_decode.cu) or 'triton' for one decode call.

    TRTLLM_KERNELS_DECODE_BACKEND = auto (default: `cuda_decode_preferred`), triton or cuda
    (csrc wherever `csrc.paged_decode_supported` takes the inputs, else Triton).
    """
    choice = os.environ.get("TRTLLM_KERNELS_DECODE_BACKEND", "auto")
    if choice == "triton":
        return "triton"
    if choice != "cuda" and not cuda_decode_preferred(q.shape[2], k_cache.shape[2], k_cache.dtype):
        return "triton"
    from . import csrc

    if csrc.available() and csrc.paged_decode_supported(q, k_cache, v_cache, block_tables):
        return "cuda"
    return "triton"


def paged_attention_decode_cuda(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale):
    if not supported(q, k_cache) or v_cache.stride(-1) != 1:
        return _decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)
    if decode_backend(q, k_cache, v_cache, block_tables) == "cuda":
        from . import csrc

        return csrc.paged_decode_cuda(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)
    return triton_paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)


def paged_attention_decode_quant_fp8_cuda(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale):
    """The Triton kernel's quantizing epilogue where the Triton kernel runs; elsewhere the decode
    op's kernel, then the same quantization as a pass of its own."""
    if (q.shape[1] * q.shape[2] <= QUANT_ROW_MAX and supported(q, k_cache) and v_cache.stride(-1) == 1
            and decode_backend(q, k_cache, v_cache, block_tables) == "triton"):
        return triton_paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale,
                                   quant_out=True)
    from .triton_fp8 import quantize_per_token_cuda

    out = paged_attention_decode_cuda(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)
    return quantize_per_token_cuda(out.reshape(out.shape[0], -1), 0)


# Below this many query tokens in a call the Triton prefill kernel stays: the Gluon kernel's
# fixed cost (its work counter's memset, 12-warp persistent programs, a pipeline drained per
# item) is a few microseconds. H100, 32/8 heads, D 128, pages of 16, Triton / Gluon us
# (benchmarks/prefill_sweep.py, gluon_prefill/sweeps/sweep_call17.json): 1 x 16 tokens 5.3 / 9.5,
# 1 x 128 7.8 / 10.0, 1 x 512 20.0 / 15.3, 1 x 1024 35.5 / 28.9, 4 x 256 17.8 / 22.3,
# 16 x 256 63.3 / 65.2, 8 x 256 over 1024 cached 109 / 93, 1 x 512 over 8192 294 / 130,
# 4 x 4096 1293 / 1071. A few microseconds lost on batches of short prompts, against up to
# 2.3x on chunks of long prompts.
GLUON_PREFILL_MIN_TOKENS = 512


def prefill_backend(q, k_cache, v_cache) -> str:
    """'gluon' (kernels/gluon_attention.py: TMA + asynchronous wgmma, Hopper, bf16/fp16 caches)
    for calls of GLUON_PREFILL_MIN_TOKENS query tokens or more that it takes, else 'triton' (a
    static rule: CUDA-graph safe). TRTLLM_KERNELS_PREFILL_BACKEND = auto (default), triton or
    gluon (Gluon at any size, still Triton where Gluon does not take the inputs)."""
    choice = os.environ.get("TRTLLM_KERNELS_PREFILL_BACKEND", "auto")
    if choice == "triton" or (choice != "gluon" and q.shape[0] < GLUON_PREFILL_MIN_TOKENS):
        return "triton"
    from . import gluon_attention

    return "gluon" if gluon_attention.supported(q, k_cache, v_cache) else "triton"


def paged_attention_prefill_cuda(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                 scale, k_scale, v_scale):
    if not supported(q, k_cache) or v_cache.stride(-1) != 1:
        return _prefill_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                            scale, k_scale, v_scale)
    if prefill_backend(q, k_cache, v_cache) == "gluon":
        from .gluon_attention import gluon_paged_prefill

        return gluon_paged_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                   scale, k_scale, v_scale)
    return triton_paged_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                scale, k_scale, v_scale)


def register() -> None:
    from .._library import register_cuda_kernel

    register_cuda_kernel("paged_attention_decode", paged_attention_decode_cuda)
    register_cuda_kernel("paged_attention_decode_quant_fp8", paged_attention_decode_quant_fp8_cuda)
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
BENCH_DECODE = [(64, 4096, 16), (64, 4096, 64), (256, 512, 16), (4, 32768, 16)]
BENCH_PREFILL = (4, 4096, 32, 8, 128)
BENCH_CHUNK = (4, 512, 3584)  # batch, new tokens, cached tokens before them

# --sweep grid (B64 x 4096 decode, 4 x 4096 prefill, the chunked prefill): launcher keyword sets.
# Decode: per cache dtype, (knobs, num_splits to try); prefill: per page size.
SWEEP_DECODE = {
    "bf16": [(dict(), (1, 2)), (dict(maxnreg=96, per_sm=5), (1,)), (dict(block_n=128), (1,))],
    "fp8": [(dict(block_n=128, f16_math=False, maxnreg=168), (1, 2, 3)),
            (dict(block_n=128, f16_math=True, maxnreg=168), (1, 2, 3)),
            (dict(block_n=64, f16_math=True, maxnreg=128, per_sm=4), (1, 2, 3)),
            (dict(block_n=128, num_warps=8, f16_math=True, maxnreg=128), (1, 2, 4)),
            (dict(block_n=128, num_stages=5, f16_math=True, maxnreg=168), (2,))],
}
SWEEP_DECODE_SPLITS = {(4, 32768): (16, 32), (256, 512): (2,)}
_P = lambda bm, bn, w, st, tma=None, mr=None, pk=None: dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st,
                                                            use_tma=tma, maxnreg=mr, pack=pk)
# (the first sweep, .device/14: page 16 BLOCK_M 128 / N 64 / 8 warps / 3 stages capped at 128
# registers won; this one tries GQA packing (pk) on top of the winners)
SWEEP_PREFILL = {
    16: [_P(128, 64, 8, 3, mr=128, pk=4), _P(128, 64, 8, 3, mr=128, pk=2), _P(128, 64, 8, 3, pk=4),
         _P(128, 64, 8, 2, mr=128, pk=4), _P(128, 128, 8, 3, pk=4), _P(64, 64, 4, 3, pk=4),
         _P(128, 32, 8, 3, mr=128, pk=4)],
    64: [_P(128, 64, 8, 3, True, 128, pk=4), _P(128, 64, 8, 4, True, 128, pk=4), _P(128, 64, 8, 3, True, 128, pk=1)],
    128: [_P(128, 64, 8, 3, True, 128, pk=4)],
}
SWEEP_CHUNK = [_P(128, 64, 8, 3, mr=128, pk=4), _P(128, 64, 8, 3, mr=128, pk=1)]
# csrc decode (part "cuda"): tile variants x splits (None: the automatic choice)
# (the first sweep, .device/F-1: variants 0 / 1 lost to Triton everywhere, so variant 2 is new)
SWEEP_CUDA_DECODE = [dict(variant=0), dict(variant=2, num_splits=2), dict(variant=2, num_splits=3)]
SWEEP_CUDA_DECODE_LONG = [dict(variant=2, num_splits=16), dict(variant=2, num_splits=32), dict(variant=2, num_splits=64)]


def _prefill_fn(q, kc, vc, bt, sl, qsl, kw):
    """The prefill launch a bench candidate names: Triton with knobs, or {"backend": "gluon"}."""
    if kw.get("backend") == "gluon":
        from .gluon_attention import gluon_paged_prefill

        return lambda: gluon_paged_prefill(q, kc, vc, bt, sl, qsl)
    return lambda: triton_paged_prefill(q, kc, vc, bt, sl, qsl, **kw)


def _bench_main(argv=None, device="cuda") -> None:  # pragma: no cover - GPU only
    """Time the kernels beside SDPA at the issue's shapes; --sweep tries the SWEEP_* grids.

    Each row is printed as soon as it is measured (and saved to --out), so a run cut short by
    --budget or a time limit keeps what it measured. --warm N first compiles every kernel the
    run will launch in N worker processes (the Triton cache is shared), so the timed run
    spends its time timing.
    """
    import argparse
    import json
    import subprocess
    import sys
    import time

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench_cudagraph

    ap = argparse.ArgumentParser(description="time / tune the Triton paged attention kernels")
    ap.add_argument("--sweep", action="store_true", help="sweep tile configs and num_splits")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--only", help="comma list of parts: decode, decode_sweep (Triton decode tiles), cuda "
                    "(csrc decode beside Triton), prefill, sdpa (each SDPA backend at the prefill shape), chunk")
    ap.add_argument("--budget", type=float, default=1e9, help="stop starting new timings after this many s")
    ap.add_argument("--warm", type=int, default=0, help="compile first in this many worker processes")
    ap.add_argument("--shard", type=str, default=None, help=argparse.SUPPRESS)  # "i/n": compile only
    ap.add_argument("--best-out", help="write the fastest prefill config that matches SDPA (page 16, "
                    "bf16) here, as JSON for TRTLLM_KERNELS_PREFILL_CONFIG")
    args = ap.parse_args(argv)
    parts = set((args.only or "decode,prefill,chunk").split(","))
    dev, bf16, fp8 = device, torch.bfloat16, torch.float8_e4m3fn
    t_start = time.time()
    rows = []
    shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else None
    counter = [0]

    if args.warm and not shard:
        base_cmd = [sys.executable, "-m", "trtllm_kernels.kernels.triton_attention"] + [
            a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--warm")]
        procs = [subprocess.Popen(base_cmd + ["--shard", f"{i}/{args.warm}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for i in range(args.warm)]
        for pr in procs:
            pr.wait()
        print(f"warm-up compile in {args.warm} processes: {time.time() - t_start:.0f} s", flush=True)

    def timed(fn, rep=30):
        if shard:  # compile-only worker: launch the candidates of this shard once
            counter[0] += 1
            if counter[0] % shard[1] == shard[0]:
                try:
                    fn()
                    torch.cuda.synchronize()
                except Exception:
                    pass
            return "compile only"
        try:
            fn()  # compile outside the graph
            return do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e-3  # seconds
        except Exception as e:  # out of resources, ...
            return repr(e)[:160]

    def base_timed(fn, rep=30):
        return "compile only" if shard else timed(fn, rep)

    def record(**r):
        if shard:
            return
        rows.append(r)
        keys = ("what", "batch", "ctx", "page", "kv", "cfg", "auto_splits", "us", "GBps", "TFLOPs",
                "vs_sdpa", "rel_err", "rel_err_vs_triton", "ok", "error")
        print(" ".join(f"{k}={r[k]:.4g}" if isinstance(r.get(k), float) else f"{k}={r[k]}"
                       for k in keys if k in r), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)

    def over_budget():
        return time.time() - t_start > args.budget

    hq, hkv, d = 32, 8, 128
    copy_bw = None
    if not shard:
        x = torch.empty(2 ** 29, dtype=torch.int16, device=dev)
        y = torch.empty_like(x)
        t = timed(lambda: y.copy_(x))
        copy_bw = 2 * x.numel() * 2 / t
        del x, y
        record(what="copy (graph memcpy node)", GBps=copy_bw / 1e9)

    # ---- decode ----
    for batch, ctx, page in BENCH_DECODE if "decode" in parts else []:
        q = torch.randn(batch, hq, d, device=dev, dtype=bf16)
        k = torch.randn(batch, hkv, ctx, d, device=dev, dtype=bf16)
        v = torch.randn_like(k)
        qs = q.view(batch, hq, 1, d)
        base = base_timed(lambda: torch.nn.functional.scaled_dot_product_attention(qs, k, v, enable_gqa=True))
        for cache_dtype in (bf16, fp8):
            kc, vc, bt, sl = _paged_copy(k, v, page, cache_dtype)
            nbytes = 2 * batch * hkv * ctx * d * kc.element_size() + 2 * q.numel() * 2
            cfg = decode_config(d, cache_dtype, bf16, batch * hkv, ctx)
            auto = decode_num_splits(batch, hkv, ctx, cfg["BLOCK_N"], num_sms(q.device), cfg["per_sm"])
            cands = [dict()]
            if "decode_sweep" in parts and batch == 64:
                for kw, splits in SWEEP_DECODE["fp8" if cache_dtype == fp8 else "bf16"]:
                    cands += [dict(kw, num_splits=sp) for sp in splits]
            elif "decode_sweep" in parts:
                cands += [dict(num_splits=sp) for sp in SWEEP_DECODE_SPLITS.get((batch, ctx), ())]
            for kw in cands:
                if over_budget():
                    break
                t = timed(lambda: triton_paged_decode(q, kc, vc, bt, sl, **kw), rep=20)
                r = dict(what="decode", batch=batch, ctx=ctx, page=page, kv=str(cache_dtype)[6:], cfg=kw,
                         auto_splits=auto)
                if isinstance(t, float):
                    r.update(us=t * 1e6, GBps=nbytes / t / 1e9)
                    if isinstance(base, float):
                        r.update(sdpa_us=base * 1e6, vs_sdpa=base / t)
                else:
                    r.update(error=t)
                record(**r)
            if "cuda" in parts and not over_budget():  # csrc/paged_decode.cu beside Triton
                from . import csrc

                ref_out = triton_paged_decode(q, kc, vc, bt, sl).float() if not shard else None
                ccands = [dict()]
                if args.sweep:
                    ccands += SWEEP_CUDA_DECODE + (SWEEP_CUDA_DECODE_LONG if ctx >= 16384 else [])
                for kw in ccands:
                    if over_budget():
                        break
                    t = timed(lambda: csrc.paged_decode_cuda(q, kc, vc, bt, sl, **kw), rep=20)
                    r = dict(what="cuda_decode", batch=batch, ctx=ctx, page=page, kv=str(cache_dtype)[6:], cfg=kw)
                    if isinstance(t, float):
                        o = csrc.paged_decode_cuda(q, kc, vc, bt, sl, **kw).float()
                        err = ((o - ref_out).norm() / ref_out.norm()).item()
                        r.update(us=t * 1e6, GBps=nbytes / t / 1e9, rel_err_vs_triton=err, ok=err < 2e-2)
                        if isinstance(base, float):
                            r.update(sdpa_us=base * 1e6, vs_sdpa=base / t)
                    else:
                        r.update(error=t)
                    record(**r)
            del kc, vc
        del q, k, v

    # ---- prefill (4 x 4096, causal), each config checked against SDPA's output ----
    b, s, hq, hkv, d = BENCH_PREFILL
    if "prefill" in parts and not over_budget():
        flops = 4 * b * hq * s * s * d / 2  # causal
        q = torch.randn(b, hq, s, d, device=dev, dtype=bf16)
        k = torch.randn(b, hkv, s, d, device=dev, dtype=bf16)
        v = torch.randn_like(k)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            base = base_timed(sdpa)
            ref = None if shard else sdpa().transpose(1, 2).reshape(b * s, hq, d).float()
        if isinstance(base, float):
            record(what="prefill_sdpa_flash", us=base * 1e6, TFLOPs=flops / base / 1e12)
        qt = q.transpose(1, 2).reshape(b * s, hq, d).contiguous()
        qsl = torch.arange(0, b * s + 1, s, dtype=torch.int32, device=dev)
        best = None
        for page in (16, 64, 128):
            for cache_dtype in (bf16, fp8):
                if (page == 128 or cache_dtype == fp8) and not args.sweep:
                    continue
                if page != 16 and cache_dtype == fp8:
                    continue
                kc, vc, bt, sl = _paged_copy(k, v, page, cache_dtype)
                cands = [dict()] + (SWEEP_PREFILL.get(page, []) if args.sweep and cache_dtype == bf16 else [])
                cands += [dict(backend="gluon")] if cache_dtype == bf16 else []
                for kw in cands:
                    if over_budget():
                        break
                    fn = _prefill_fn(qt, kc, vc, bt, sl, qsl, kw)
                    t = timed(fn)
                    r = dict(what="prefill", batch=b, seq=s, page=page, kv=str(cache_dtype)[6:],
                             cfg={k_: v_ for k_, v_ in kw.items() if v_ is not None})
                    if isinstance(t, float):
                        out = fn().float()
                        err = ((out - ref).norm() / ref.norm()).item()
                        ok = err < (6e-2 if cache_dtype == fp8 else 1.5e-2) and not out.isnan().any()
                        r.update(us=t * 1e6, TFLOPs=flops / t / 1e12, rel_err=err, ok=ok)
                        if isinstance(base, float):
                            r.update(sdpa_us=base * 1e6, vs_sdpa=base / t)
                        if (ok and page == 16 and cache_dtype == bf16 and "backend" not in kw
                                and (best is None or t < best[0])):
                            best = (t, kw)
                    else:
                        r.update(error=t)
                    record(**r)
                del kc, vc
        if best is not None and args.best_out:
            cfg = prefill_config(d, bf16, 16)
            names = dict(block_m="BLOCK_M", block_n="BLOCK_N", num_warps="num_warps", num_stages="num_stages",
                         maxnreg="maxnreg", pack="PACK")
            cfg.update({names[k_]: v_ for k_, v_ in best[1].items() if k_ in names and v_ is not None})
            with open(args.best_out, "w") as f:
                json.dump(cfg, f)
            record(what="prefill_best", us=best[0] * 1e6, cfg=cfg)
        del q, k, v, qt

    # ---- which SDPA backend is the prefill baseline: each one at the 4 x 4096 GQA shape ----
    if "sdpa" in parts and not over_budget() and not shard:
        b, s, hq, hkv, d = BENCH_PREFILL
        flops = 4 * b * hq * s * s * d / 2
        q = torch.randn(b, s, hq, d, device=dev, dtype=bf16).transpose(1, 2)  # as the bench case's view
        k = torch.randn(b, hkv, s, d, device=dev, dtype=bf16)
        v = torch.randn_like(k)
        kr, vr = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
        backends = dict(default=None, flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION,
                        efficient=SDPBackend.EFFICIENT_ATTENTION)
        for name, be in backends.items():
            for gqa in (True, False):  # enable_gqa on 8 kv heads, or the kv heads repeated to 32
                def fn(be=be, gqa=gqa):
                    kk, vv = (k, v) if gqa else (kr, vr)
                    if be is None:
                        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                    with sdpa_kernel(be):
                        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                t = timed(fn)
                r = dict(what="sdpa_prefill", cfg=dict(backend=name, enable_gqa=gqa))
                r.update(dict(us=t * 1e6, TFLOPs=flops / t / 1e12) if isinstance(t, float) else dict(error=t))
                record(**r)
        del q, k, v, kr, vr

    # ---- chunked prefill: 512 new tokens over 3584 cached ----
    if "chunk" in parts and not over_budget():
        from torch.nn.attention.bias import causal_lower_right

        b, new, cached = BENCH_CHUNK
        total = new + cached
        flops = 4 * b * hq * d * sum(cached + i + 1 for i in range(new))
        q = torch.randn(b, hq, new, d, device=dev, dtype=bf16)
        k = torch.randn(b, hkv, total, d, device=dev, dtype=bf16)
        v = torch.randn_like(k)
        mask = causal_lower_right(new, total)
        base = base_timed(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True))
        if isinstance(base, float):
            record(what="chunk_sdpa", us=base * 1e6, TFLOPs=flops / base / 1e12)
        qt = q.transpose(1, 2).reshape(b * new, hq, d).contiguous()
        qsl = torch.arange(0, b * new + 1, new, dtype=torch.int32, device=dev)
        kc, vc, bt, sl = _paged_copy(k, v, 16, bf16)
        for kw in [dict()] + (SWEEP_CHUNK if args.sweep else []) + [dict(backend="gluon")]:
            if over_budget():
                break
            t = timed(_prefill_fn(qt, kc, vc, bt, sl, qsl, kw))
            r = dict(what="chunk", batch=b, new=new, cached=cached, page=16,
                     cfg={k_: v_ for k_, v_ in kw.items() if v_ is not None})
            r.update(dict(us=t * 1e6, TFLOPs=flops / t / 1e12) if isinstance(t, float) else dict(error=t))
            if isinstance(t, float) and isinstance(base, float):
                r.update(vs_sdpa=base / t)
            record(**r)


if __name__ == "__main__":  # pragma: no cover
    _bench_main()
