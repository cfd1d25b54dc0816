"""Triton kernels for the KV-cache write and rotary embedding, fused or alone.

One kernel, `_rope_kv_kernel`, serves three ops (its constexpr flags pick the work):
- `rope_and_write_kv_cache` (ROPE and WRITE): q and k rotated, the rotated q written to a new
  tensor, the rotated k and v scattered into the paged cache; k never goes back to memory;
- `rotary_embedding` (ROPE only): rotated q and k written to new tensors;
- `write_kv_cache` (WRITE only): k and v scattered into the cache.

One program per token handles all of its heads: [heads, D/2] tiles for the two halves of each
head (rotate-half RoPE pairs x[i] with x[i + D/2]), the token's cos/sin row loaded once and
shared by every head. Math is fp32; a rotated value is rounded to its tensor's dtype before
an FP8 cache quantizes it (stored = saturate(x / scale) to +-448, float8_e4m3fn), exactly
as the references compose. Slot -1 skips the cache write of a token (its q is still rotated).
Inputs may be strided views (the q/k/v slices of a fused qkv projection) as long as the last
dim is contiguous; the layouts are in docs/formats.md and `trtllm_kernels.kv_cache`.

Traffic is the minimum: q, k, v read once, q (and k for the rotary op) written once, K/V
written to the cache once, plus the positions, slots and a D-float cos/sin row per token.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..kv_cache import FP8_E4M3_MAX, _rope_and_write_kv_cache_ref, _write_kv_cache_ref
from ..rotary import _rotary_ref
from .triton_tiles import pdl, pdl_trigger

FP8 = torch.float8_e4m3fn
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rotate_half(x1, x2, cos, sin):
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _round_e4m3(y):
    """Round fp32 y (|y| <= 448) to the nearest float8_e4m3fn value, ties to even, in fp32.

    Only for the interpreter, whose fp32 -> fp8 conversion rounds ties up and drops the carry
    into the exponent (1.96 -> 1.0); values already on the e4m3 grid then convert exactly.
    """
    bits = y.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1  # 23 - 3 mantissa bits dropped
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    subnormal = (y + 16384.0) - 16384.0  # multiples of 2^-9: the fp32 ulp of 2^14
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def _store_cache(C, row_off, offs_h, offs_d, stride_ch, x1, x2, scale, mask,
                 HALF: tl.constexpr, FP8_OUT: tl.constexpr, EMULATE_RNE: tl.constexpr):
    ptrs = C + row_off + offs_h[:, None] * stride_ch + offs_d[None, :]
    if FP8_OUT:
        y1 = tl.minimum(tl.maximum(x1.to(tl.float32) / scale, -448.0), 448.0)
        y2 = tl.minimum(tl.maximum(x2.to(tl.float32) / scale, -448.0), 448.0)
        if EMULATE_RNE:
            y1 = _round_e4m3(y1)
            y2 = _round_e4m3(y2)
        tl.store(ptrs, y1.to(C.dtype.element_ty), mask=mask)
        tl.store(ptrs + HALF, y2.to(C.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, x1.to(C.dtype.element_ty), mask=mask)
        tl.store(ptrs + HALF, x2.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kv_kernel(
    POS, Q, K, V, CS, QO, KO, KC, VC, SLOT,
    k_scale, v_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
    stride_kcb, stride_kch, stride_kct, stride_vcb, stride_vch, stride_vct,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PAGE: tl.constexpr,
    ROPE: tl.constexpr, WRITE: tl.constexpr, K_FP8: tl.constexpr, V_FP8: tl.constexpr,
    EMULATE_RNE: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_trigger(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    mask_d = offs_d < HALF
    offs_hk = tl.arange(0, HKV_PAD)
    mask_k = (offs_hk < NUM_KV_HEADS)[:, None] & mask_d[None, :]

    # k (and q) halves: x[:, :D/2] and x[:, D/2:]
    k_ptrs = K + t * stride_kt + offs_hk[:, None] * stride_kh + offs_d[None, :]
    k1 = tl.load(k_ptrs, mask=mask_k, other=0.0)
    k2 = tl.load(k_ptrs + HALF, mask=mask_k, other=0.0)
    if ROPE:
        pos = tl.load(POS + t).to(tl.int64)
        cos = tl.load(CS + pos * stride_cs + offs_d, mask=mask_d, other=0.0)[None, :]
        sin = tl.load(CS + pos * stride_cs + HALF + offs_d, mask=mask_d, other=0.0)[None, :]
        offs_hq = tl.arange(0, HQ_PAD)
        mask_q = (offs_hq < NUM_Q_HEADS)[:, None] & mask_d[None, :]
        q_ptrs = Q + t * stride_qt + offs_hq[:, None] * stride_qh + offs_d[None, :]
        q1 = tl.load(q_ptrs, mask=mask_q, other=0.0)
        q2 = tl.load(q_ptrs + HALF, mask=mask_q, other=0.0)
        o1, o2 = _rotate_half(q1.to(tl.float32), q2.to(tl.float32), cos, sin)
        qo_ptrs = QO + t * stride_qot + offs_hq[:, None] * stride_qoh + offs_d[None, :]
        tl.store(qo_ptrs, o1.to(QO.dtype.element_ty), mask=mask_q)
        tl.store(qo_ptrs + HALF, o2.to(QO.dtype.element_ty), mask=mask_q)
        r1, r2 = _rotate_half(k1.to(tl.float32), k2.to(tl.float32), cos, sin)
        # rounded to k's dtype first: the cache holds what rotary_embedding would return
        k1 = r1.to(K.dtype.element_ty)
        k2 = r2.to(K.dtype.element_ty)
        if not WRITE:
            ko_ptrs = KO + t * stride_kot + offs_hk[:, None] * stride_koh + offs_d[None, :]
            tl.store(ko_ptrs, k1, mask=mask_k)
            tl.store(ko_ptrs + HALF, k2, mask=mask_k)
    if WRITE:
        slot = tl.load(SLOT + t).to(tl.int64)
        mask_w = mask_k & (slot >= 0)
        blk = slot // PAGE
        off = slot % PAGE
        _store_cache(KC, blk * stride_kcb + off * stride_kct, offs_hk, offs_d, stride_kch,
                     k1, k2, k_scale, mask_w, HALF, K_FP8, EMULATE_RNE)
        v_ptrs = V + t * stride_vt + offs_hk[:, None] * stride_vh + offs_d[None, :]
        v1 = tl.load(v_ptrs, mask=mask_w, other=0.0)
        v2 = tl.load(v_ptrs + HALF, mask=mask_w, other=0.0)
        _store_cache(VC, blk * stride_vcb + off * stride_vct, offs_hk, offs_d, stride_vch,
                     v1, v2, v_scale, mask_w, HALF, V_FP8, EMULATE_RNE)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _num_warps(heads_pad: int, half_pad: int) -> int:
    n = heads_pad * half_pad  # elements of one half-tile, the largest tensor a program holds
    return 1 if n <= 256 else 2 if n <= 512 else 4 if n <= 2048 else 8


def _launch(positions, q, k, v, cos_sin_cache, q_out, k_out, k_cache, v_cache, slot_mapping,
            k_scale, v_scale, rope: bool, write: bool) -> None:
    tokens, num_kv_heads, head_dim = k.shape
    num_q_heads = q.shape[1] if rope else 1
    half = head_dim // 2
    half_pad = triton.next_power_of_2(half)
    hq_pad = triton.next_power_of_2(num_q_heads)
    hkv_pad = triton.next_power_of_2(num_kv_heads)
    dummy = k  # stands in for tensors a mode does not touch (never dereferenced)
    q_, qo = (q, q_out) if rope else (dummy, dummy)
    ko = k_out if (rope and not write) else dummy
    kc, vc = (k_cache, v_cache) if write else (dummy, dummy)
    v_ = v if write else dummy
    pos = positions if rope else slot_mapping if write else dummy
    cs = cos_sin_cache if rope else dummy
    slots = slot_mapping if write else pos
    page = k_cache.shape[2] if write else 1
    _rope_kv_kernel[(tokens,)](
        pos, q_, k, v_, cs, qo, ko, kc, vc, slots,
        float(k_scale), float(v_scale),
        q_.stride(0), q_.stride(1), k.stride(0), k.stride(1), v_.stride(0), v_.stride(1),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cs.stride(0),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HQ_PAD=hq_pad, HKV_PAD=hkv_pad,
        HALF=half, HALF_PAD=half_pad, PAGE=page, ROPE=rope, WRITE=write,
        K_FP8=write and k_cache.dtype == FP8, V_FP8=write and v_cache.dtype == FP8,
        EMULATE_RNE=_interpreting(), PDL=pdl(k.device, tokens),
        num_warps=_num_warps(max(hq_pad, hkv_pad), half_pad),
        enable_fp_fusion=False,  # x1 * cos - x2 * sin rounded as the reference rounds it
    )


def _last_dim_contiguous(*ts: torch.Tensor) -> bool:
    return all(t.stride(-1) == 1 or t.shape[-1] == 1 for t in ts)


def _cache_ok(k, v, k_cache, v_cache) -> bool:
    return (
        k_cache.dtype in (k.dtype, FP8) and v_cache.dtype in (v.dtype, FP8)
        and _last_dim_contiguous(k_cache, v_cache) and k.shape[-1] % 2 == 0
    )


def _rope_ok(positions, q, k, cos_sin_cache) -> bool:
    return (
        q.dtype in _FLOATS and k.dtype in _FLOATS and q.shape[-1] % 2 == 0
        and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(-1) == 1
        and positions.dtype in (torch.int32, torch.int64) and positions.dim() == 1
        and _last_dim_contiguous(q, k)
    )


def triton_rope_and_write_kv_cache(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                   k_scale=1.0, v_scale=1.0, *, out=None) -> torch.Tensor:
    """`trtllm_kernels.kv_cache.rope_and_write_kv_cache` in one kernel; returns the rotated q."""
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0]:
        _launch(positions, q, k, v, cos_sin_cache, out, None, k_cache, v_cache, slot_mapping,
                k_scale, v_scale, rope=True, write=True)
    return out


def triton_rotary_embedding(positions, q, k, cos_sin_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """`trtllm_kernels.rotary.rotary_embedding` in one kernel; returns new (q, k)."""
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0]:
        _launch(positions, q, k, None, cos_sin_cache, q_out, k_out, None, None, None,
                1.0, 1.0, rope=True, write=False)
    return q_out, k_out


def triton_write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    """`trtllm_kernels.kv_cache.write_kv_cache` in one kernel."""
    if k.shape[0]:
        _launch(None, None, k, v, None, None, None, k_cache, v_cache, slot_mapping,
                k_scale, v_scale, rope=False, write=True)


# --------------------------------------------------------------------------------------------
# op registration (inputs the kernel does not take fall back to the reference)
# --------------------------------------------------------------------------------------------


def rope_and_write_kv_cache_cuda(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                 k_scale, v_scale):
    if not (_rope_ok(positions, q, k, cos_sin_cache) and _cache_ok(k, v, k_cache, v_cache)
            and _last_dim_contiguous(v) and slot_mapping.dim() == 1):
        return _rope_and_write_kv_cache_ref(positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                                            slot_mapping, k_scale, v_scale)
    return triton_rope_and_write_kv_cache(positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                                          slot_mapping, k_scale, v_scale)


def rotary_embedding_cuda(positions, q, k, cos_sin_cache):
    if not _rope_ok(positions, q, k, cos_sin_cache):
        return _rotary_ref(positions, q, k, cos_sin_cache)
    return triton_rotary_embedding(positions, q, k, cos_sin_cache)


def write_kv_cache_cuda(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    if not (k.dtype in _FLOATS and v.dtype in _FLOATS and _cache_ok(k, v, k_cache, v_cache)
            and _last_dim_contiguous(k, v) and slot_mapping.dim() == 1):
        return _write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    triton_write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def register() -> None:
    from .._library import register_cuda_kernel

    register_cuda_kernel("rope_and_write_kv_cache", rope_and_write_kv_cache_cuda)
    register_cuda_kernel("rotary_embedding", rotary_embedding_cuda)
    register_cuda_kernel("write_kv_cache", write_kv_cache_cuda)


assert FP8_E4M3_MAX == 448.0  # the kernel's saturation bound
