"""Triton FP8 kernels: row quantization, RMSNorm (+ residual) + quantization, and the FP8 GEMM
with its SiLU-and-mul (+ FP8 requantization) epilogue. Formats: `trtllm_kernels.fp8`.

GEMM. Two kernels, `_fp8_gemm_tma_kernel` (tiles by TMA) and `_fp8_gemm_kernel` (pointer
loads: bias, unaligned rows), C[M, N] = sum_k A[m, k] B[n, k] * scales, both operands
K-contiguous (the layout Hopper's FP8 wgmma takes; Triton lowers the tl.dot to wgmma on
sm_90). Each operand's scale has a mode (constexpr), the same set for both sides:
  1 tensor ([1]), 2 row ([rows, 1]), 3 row-group ([rows, cdiv(K, 128)]), 4 block
  ([cdiv(rows, 128), cdiv(K, 128)]).
Modes 1-2 are applied once in the epilogue (`acc = dot(a, b, acc)` runs the K loop on the
tensor cores undisturbed); modes 3-4 change along K, so each K step's partial product is
scaled before it is added (BLOCK_K divides 128).
With GLU the B operand is a fused [gate; up] weight [2I, K]: each program keeps two
accumulators (gate rows n and up rows I + n) and writes silu(gate) * up, optionally quantized
to fp8 with one scale per 1 x 128 group (BLOCK_N = 128: a group is one tile's row; the TMA
kernel also takes the weight as A, a group then being one tile's column).

Kernel choice. Hopper, 1-16 tokens, per-channel weight scales and activation scales per tensor,
token or 1 x 128 group (the FP8 engine's decode GEMMs): the Gluon kernel of
kernels/gluon_decode_gemm.py, which requests its weight before waiting for the kernel that
feeds it (`_launch_gemm`; TRTLLM_KERNELS_DECODE_GEMM=triton keeps this module's). Otherwise
`gemm_config`, the documented rule (tuned by sweeps of launch configurations
against torch._scaled_mm, benchmarks/sweep_fp8_mlp.py: the sets main / extra on H100, decode /
split on H200 for the FP8 engine's own calls). Tiles come by TMA (`_fp8_gemm_tma_kernel`)
wherever the operands allow it (16-byte aligned rows, no bias); else the pointer kernel.
- Memory-bound plain GEMMs (no GLU): M <= 16, or M <= 128 with N < 16384 (qkv, o, down), or
  M <= 32 on gate_up (33-64 tokens there: 64 x 128 tiles unswapped, 1.29x against 1.23x).
  Swap A and B (C^T = B A^T): weight rows fill the 64-row wgmma tile, the tokens its narrow
  side (16 / 32 / 64), BLOCK_K 256: 256-byte row segments of the weight per request and 3-4
  stages in flight (128-byte ones and twice the stages where scales change along K, as in the
  MLP's down GEMM). Where that leaves at most one tile per two SMs and K >= 4096, split-K in
  two (down at M <= 16: 64 tiles, K 14336, 27.7 -> 19.2 us on H200; o, K 4096: nothing while
  the partials were summed by a second kernel, FP8 batch-1 TPOT 3.092 -> 3.082 ms on H200
  since they are summed in the kernel). Between 33 and 128 tokens the 64 x 32 tiles must fit
  in one wave (two programs per SM); where they do not (qkv at M = 128 ran at 0.86x), 64 x 64
  tiles with pointer loads.
- gate_up (N >= 16384) at 65-128 tokens: 128 x 128 x 128 tiles, 8 warps, 3 stages.
- GLU (the fused FP8 MLP's gate_up) at M <= 16: swapped, 128 gate + 128 up weight rows per
  program (so each token's 1 x 128 output group is in one tile: its scale is computed there),
  8 warps. 17-128 tokens: 64 x 128 tiles (pointer loads); more: 128 x 128, 8 warps, 4 stages.
- Weights with per-channel scales and activations with per-token ones (qkv, o, the GLU
  gate_up) or per-1x128-group ones (the fused MLP's down GEMM), from GLUON_TOKEN_GEMM_MIN_M /
  GLUON_GROUP_GEMM_MIN_M rows on Hopper: not this module's kernels but the Gluon ones of
  kernels/gluon_fp8_gemm.py (`gemm_backend`): persistent, warp-specialized, the epilogue
  overlapping the next tile's loads (and the group scales' promotion the next K step's wgmma).
- 129-512 tokens (decode batches): 64 x 128 tiles (128 x 256 ones leave most SMs idle: o ran at
  0.6x). Larger: 128 x 256 x 128, 8 warps, 4 stages, grouped launch order for L2 reuse; 64 x 256
  where scales are applied inside the K loop (the down GEMM at M = 4096: 552 us against 660 us
  for the 128 x 128 pointer tiles before).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..fp8 import AMAX_MIN as _AMAX_MIN
from ..fp8 import FP8
from ..fp8 import FP8_MAX as _FP8_MAX
from ..fp8 import SCALE_BLOCK
from . import gluon_decode_gemm
from .triton_tiles import arrival_counters, grouped_tile, last_to_arrive, num_sms, pdl, pdl_trigger, pdl_wait, \
    split_k_in_two

FP8_MAX = tl.constexpr(_FP8_MAX)
AMAX_MIN = tl.constexpr(_AMAX_MIN)
MODE_TENSOR, MODE_ROW, MODE_ROW_GROUP, MODE_BLOCK = 1, 2, 3, 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Row quantization


@triton.jit
def _round_fp8(x, INTERP: tl.constexpr):
    """x (fp32, already within +-448) ready for `.to(fp8)`. (Quantizing divisions use div_rn:
    Triton's `/` is an approximate division on the GPU, one fp8 step off now and then.) On the GPU the conversion rounds to
    nearest even itself; the Triton interpreter's conversion drops the carry into the exponent
    (124.3 becomes 64, not 128), so there x is first rounded onto the e4m3 grid here."""
    if INTERP:
        e = tl.floor(tl.log2(tl.maximum(tl.abs(x), 0.015625)))
        ulp = tl.exp2(e - 3.0)
        y = x / ulp + 12582912.0
        x = (y - 12582912.0) * ulp
    return x



@triton.jit
def quantize_dynamic(x, INTERP: tl.constexpr):
    """A row x (fp32, 1-D, zeros past its end) on the e4m3 grid with its dynamic scale
    max(max|x|, AMAX_MIN) / 448: returns (q in fp32, ready for `.to(fp8)`, scale)."""
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), AMAX_MIN) / FP8_MAX
    return _round_fp8(tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX), INTERP), scale


@triton.jit
def _quant_rows_kernel(X, Q, S, SCALE, K, stride_x, stride_q, stride_s,
                       STATIC: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
                       INTERP: tl.constexpr):
    """Program (row, j) quantizes columns [j * GROUP, (j + 1) * GROUP) of one row.
    STATIC: with the one scale at SCALE; else dynamically, writing its scale to S[row, j]."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    cols = j * GROUP + tl.arange(0, BLOCK)
    mask = (cols < K) & (tl.arange(0, BLOCK) < GROUP)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(SCALE)
        q = _round_fp8(tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX), INTERP)
    else:
        q, scale = quantize_dynamic(x, INTERP)
        tl.store(S + row * stride_s + j, scale)
    tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=mask)


def _rows(x):
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def quantize_per_token_cuda(x: torch.Tensor, group_size: int):
    k = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    group = k if group_size <= 0 or group_size >= k else group_size
    ngroups = triton.cdiv(k, group) if k else 1
    q = torch.empty(rows, k, dtype=FP8, device=x.device)
    s = torch.empty(rows, ngroups, dtype=torch.float32, device=x.device)
    if rows and k:
        block = triton.next_power_of_2(group)
        _quant_rows_kernel[(rows, ngroups)](x2, q, s, s, k, x2.stride(0), k, s.stride(0),
                                            STATIC=False, GROUP=group, BLOCK=block,
                                            num_warps=_row_warps(block), INTERP=_interpreting())
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], ngroups)


def quantize_per_tensor_cuda(x: torch.Tensor, scale: torch.Tensor | None):
    if scale is None:
        amax = x.abs().amax().float() if x.numel() else x.new_zeros((), dtype=torch.float32)
        scale = amax.clamp_min(_AMAX_MIN) / _FP8_MAX
    scale = scale.float().reshape(1).clone()
    k = x.shape[-1] if x.dim() else 1
    x2 = _rows(x.reshape(-1, k) if x.dim() else x.reshape(1, 1))
    q = torch.empty(x2.shape, dtype=FP8, device=x.device)
    if x2.numel():
        block = min(4096, triton.next_power_of_2(k))
        _quant_rows_kernel[(x2.shape[0], triton.cdiv(k, block))](
            x2, q, scale, scale, k, x2.stride(0), k, 0, STATIC=True, GROUP=block, BLOCK=block,
            num_warps=_row_warps(block), INTERP=_interpreting())
    return q.reshape(x.shape), scale


def _row_warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16


# ---------------------------------------------------------------------------------------------
# RMSNorm (+ residual) + per-token FP8 quantization


@triton.jit
def _rms_norm_quant_kernel(X, R, W, Q, S, RO, H, eps, stride_x, stride_r, stride_ro, stride_q,
                           HAS_RES: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr,
                           PDL: tl.constexpr = False):
    pdl_trigger(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # rounded, as stored
        tl.store(RO + row * stride_ro + cols, s, mask=mask)
        sf = s.to(tl.float32)
    else:
        sf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(sf * sf, axis=0) / H + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    q, scale = quantize_dynamic(sf * inv * w, INTERP)
    tl.store(S + row, scale)
    tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=mask)


def rms_norm_quant_fp8_cuda(x, residual, weight, eps):
    h = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    q = torch.empty(rows, h, dtype=FP8, device=x.device)
    s = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = _rows(residual)
        ro = torch.empty(rows, h, dtype=x.dtype, device=x.device)
    else:
        r2, ro = x2, x.new_empty(0)
    if rows and h:
        block = triton.next_power_of_2(h)
        _rms_norm_quant_kernel[(rows,)](
            x2, r2, weight.contiguous(), q, s, ro if residual is not None else x2, h, float(eps),
            x2.stride(0), r2.stride(0), h, h, HAS_RES=residual is not None, BLOCK=block,
            num_warps=_row_warps(block), INTERP=_interpreting(), PDL=pdl(x.device, rows))
    out_res = ro.reshape(x.shape) if residual is not None else ro
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1), out_res


# ---------------------------------------------------------------------------------------------
# GEMM


@triton.jit
def _side_scale(S, rows, stride_s, kcol, MODE: tl.constexpr):
    """The scale factors of one operand's tile rows at K-scale column kcol (modes 2-4)."""
    if MODE == 2:
        return tl.load(S + rows * stride_s)
    elif MODE == 3:
        return tl.load(S + rows * stride_s + kcol)
    else:
        return tl.load(S + (rows // 128) * stride_s + kcol)


@triton.jit
def _fp8_gemm_kernel(
    A, B, C, SA, SB, Bias, CS,
    M, N, K, GLU_OFF,
    stride_am, stride_bn, stride_cm, stride_cn, stride_sa, stride_sb, stride_cs,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_ON_M: tl.constexpr,
    GLU: tl.constexpr, QUANT_OUT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INTERP: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past M / N read a valid row again (no masks in the K loop); never stored
    rm = offs_m % M
    rn = offs_n % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_ptrs = B + rn.to(tl.int64)[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    SCALE_IN_LOOP: tl.constexpr = A_MODE >= 3 or B_MODE >= 3
    up_off = GLU_OFF * stride_bn
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if GLU:
            if EVEN_K:
                b2 = tl.load(b_ptrs + up_off)
            else:
                b2 = tl.load(b_ptrs + up_off, mask=rk[:, None] < k_left, other=0.0)
        if SCALE_IN_LOOP:
            kcol = (kk * BLOCK_K) // 128
            f = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
            if A_MODE >= 3:
                f = f * _side_scale(SA, rm, stride_sa, kcol, A_MODE)[:, None]
            f2 = f
            if B_MODE >= 3:
                f = f * _side_scale(SB, rn, stride_sb, kcol, B_MODE)[None, :]
                if GLU:
                    f2 = f2 * _side_scale(SB, rn + GLU_OFF, stride_sb, kcol, B_MODE)[None, :]
            acc += tl.dot(a, b) * f
            if GLU:
                acc2 += tl.dot(a, b2) * f2
        else:
            acc = tl.dot(a, b, acc)
            if GLU:
                acc2 = tl.dot(a, b2, acc2)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    # epilogue: per-tensor / per-row scales, bias, SiLU-and-mul, (fp8 requantization), store
    if A_MODE == 1:
        sa = tl.load(SA)
        acc = acc * sa
        acc2 = acc2 * sa
    elif A_MODE == 2:
        sa = tl.load(SA + rm * stride_sa)[:, None]
        acc = acc * sa
        acc2 = acc2 * sa
    if B_MODE == 1:
        sb = tl.load(SB)
        acc = acc * sb
        acc2 = acc2 * sb
    elif B_MODE == 2:
        acc = acc * tl.load(SB + rn * stride_sb)[None, :]
        if GLU:
            acc2 = acc2 * tl.load(SB + (rn + GLU_OFF) * stride_sb)[None, :]
    if HAS_BIAS:
        if BIAS_ON_M:
            acc += tl.load(Bias + rm)[:, None].to(tl.float32)
        else:
            acc += tl.load(Bias + rn)[None, :].to(tl.float32)
    if GLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    if QUANT_OUT:
        amax = tl.max(tl.where(mask, tl.abs(acc), 0.0), axis=1)
        scale = tl.maximum(amax, AMAX_MIN) / FP8_MAX
        tl.store(CS + offs_m * stride_cs + pid_n, scale, mask=offs_m < M)
        q = _round_fp8(tl.clamp(tl.math.div_rn(acc, scale[:, None]), -FP8_MAX, FP8_MAX), INTERP)
        tl.store(c_ptrs, q.to(C.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_gemm_tma_kernel(
    a_desc, b_desc, C, SA, SB, CS, P, Counters, M, N, K, GLU_OFF,
    stride_cm, stride_cn, stride_sa, stride_sb, stride_cs, stride_pm, stride_pn, stride_split,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, GLU: tl.constexpr, QUANT_OUT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr = False,
):
    """`_fp8_gemm_kernel` without bias, its operand tiles fetched by TMA (host-side tensor
    descriptors): one instruction per tile instead of per-thread 16-byte loads, zero padding past
    M / N / K (no masks, no K tail), and Triton pipelines the copies NUM_STAGES deep.
    GLU: 0 none; 2 the [gate; up] weight is B (up rows GLU_OFF below); 1 it is A (the swapped
    orientation of small M: weight rows fill the wgmma tile's M side). With QUANT_OUT each 1 x 128
    group of a token's output row is one tile's extent on the weight side (BLOCK_N or BLOCK_M
    = 128), so its scale is computed here. Scale modes 3-4 need BLOCK_K to divide 128.
    SPLIT_K > 1 (plain GEMMs whose tiles are too few to fill the GPU): program (tile, s) runs the
    s-th share of the K loop and writes its scaled fp32 partial to P + s * stride_split; the last
    of a tile's programs to finish (`last_to_arrive`) sums the partials in the order s = 0, 1, ...
    (the same bits whichever finishes last) and writes C: at batch 1 on an H200 about 0.9 us in
    the down GEMM, where the separate sum kernel took 1.1 us and a launch of its own.
    PDL: launched with programmatic dependent launch (triton_tiles.PDL): the program sets up its
    tile and pipeline while the kernel before it finishes, and waits before its first load."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # valid rows for the scale loads (tiles past M / N are never stored)
    rn = offs_n % N
    rm2 = rm + GLU_OFF if GLU == 1 else rm  # the rows multiplying into acc2
    rn2 = rn + GLU_OFF if GLU == 2 else rn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    SCALE_IN_LOOP: tl.constexpr = A_MODE >= 3 or B_MODE >= 3
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_lo = 0
    if SPLIT_K > 1:
        share = tl.cdiv(k_tiles, SPLIT_K)
        k_lo = tl.program_id(1) * share
        k_tiles = min(k_tiles, k_lo + share)
    pdl_wait(PDL)
    for kk in tl.range(k_lo, k_tiles, num_stages=NUM_STAGES):
        k0 = kk * BLOCK_K
        a = a_desc.load([off_m, k0])
        b = b_desc.load([off_n, k0])
        if GLU == 1:
            a2 = a_desc.load([off_m + GLU_OFF, k0])
        if GLU == 2:
            b2 = b_desc.load([off_n + GLU_OFF, k0])
        if SCALE_IN_LOOP:
            kcol = k0 // 128
            f = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
            f2 = f
            if A_MODE >= 3:
                f = f * _side_scale(SA, rm, stride_sa, kcol, A_MODE)[:, None]
                f2 = f2 * _side_scale(SA, rm2, stride_sa, kcol, A_MODE)[:, None]
            if B_MODE >= 3:
                f = f * _side_scale(SB, rn, stride_sb, kcol, B_MODE)[None, :]
                f2 = f2 * _side_scale(SB, rn2, stride_sb, kcol, B_MODE)[None, :]
            acc += tl.dot(a, b.T) * f
            if GLU == 1:
                acc2 += tl.dot(a2, b.T) * f2
            if GLU == 2:
                acc2 += tl.dot(a, b2.T) * f2
        else:
            acc = tl.dot(a, b.T, acc)
            if GLU == 1:
                acc2 = tl.dot(a2, b.T, acc2)
            if GLU == 2:
                acc2 = tl.dot(a, b2.T, acc2)
    if A_MODE == 1:
        acc = acc * tl.load(SA)
        acc2 = acc2 * tl.load(SA)
    elif A_MODE == 2:
        acc = acc * tl.load(SA + rm * stride_sa)[:, None]
        acc2 = acc2 * tl.load(SA + rm2 * stride_sa)[:, None]
    if B_MODE == 1:
        acc = acc * tl.load(SB)
        acc2 = acc2 * tl.load(SB)
    elif B_MODE == 2:
        acc = acc * tl.load(SB + rn * stride_sb)[None, :]
        acc2 = acc2 * tl.load(SB + rn2 * stride_sb)[None, :]
    if GLU != 0:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    if SPLIT_K > 1:
        p_tile = P + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n.to(tl.int64)[None, :] * stride_pn
        tl.store(p_tile + tl.program_id(1).to(tl.int64) * stride_split, acc, mask=mask)
        if last_to_arrive(Counters + tl.program_id(0), SPLIT_K):
            acc = tl.load(p_tile, mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                acc += tl.load(p_tile + s * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)
    elif QUANT_OUT:
        if GLU == 1:  # tokens along N: one scale per column
            amax = tl.max(tl.where(mask, tl.abs(acc), 0.0), axis=0)
            scale = tl.maximum(amax, AMAX_MIN) / FP8_MAX
            tl.store(CS + offs_n * stride_cs + pid_m, scale, mask=offs_n < N)
            q = tl.math.div_rn(acc, scale[None, :])
        else:
            amax = tl.max(tl.where(mask, tl.abs(acc), 0.0), axis=1)
            scale = tl.maximum(amax, AMAX_MIN) / FP8_MAX
            tl.store(CS + offs_m * stride_cs + pid_n, scale, mask=offs_m < M)
            q = tl.math.div_rn(acc, scale[:, None])
        q = _round_fp8(tl.clamp(q, -FP8_MAX, FP8_MAX), INTERP)
        tl.store(c_ptrs, q.to(C.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base and row stride."""
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _launch_gemm_tma(a, b, a_scale, b_scale, a_mode, b_mode, out, out_scale, glu_off, cfg, swap):
    """The TMA kernel (see `_fp8_gemm_tma_kernel`); glu_off > 0: b is a [gate; up] weight."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    glu = 2 if glu_off else 0
    if swap:  # weight rows on the tile's M side; the output is written transposed
        a, b, a_scale, b_scale, a_mode, b_mode = b, a, b_scale, a_scale, b_mode, a_mode
        scm, scn = out.stride(1), out.stride(0)
        glu = 1 if glu else 0
    else:
        scm, scn = out.stride(0), out.stride(1)
    m = glu_off if glu == 1 else a.shape[0]
    n = glu_off if glu == 2 else b.shape[0]
    k = a.shape[1]
    a_desc = TensorDescriptor(a, list(a.shape), [a.stride(0), 1], [bm, bk])
    b_desc = TensorDescriptor(b, list(b.shape), [b.stride(0), 1], [bn, bk])
    cs = out_scale if out_scale is not None else out
    split = cfg.get("split_k", 1)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    part = counters = out  # unused without split-K
    spm = spn = 0
    if split > 1:  # fp32 partials [split, rows, cols] of the (unswapped) output, summed in the kernel
        assert glu == 0 and out_scale is None
        part = torch.empty((split, *out.shape), dtype=torch.float32, device=out.device)
        spm, spn = (part.stride(2), part.stride(1)) if swap else (part.stride(1), part.stride(2))
        counters = arrival_counters(out.device, tiles)
    use_pdl = pdl(out.device, out.shape[0])  # out: [tokens, N] either way
    _fp8_gemm_tma_kernel[(tiles, split)](
        a_desc, b_desc, out, a_scale, b_scale, cs, part, counters, m, n, k, glu_off, scm, scn,
        a_scale.stride(0) if a_mode != MODE_TENSOR else 0,
        b_scale.stride(0) if b_mode != MODE_TENSOR else 0,
        out_scale.stride(0) if out_scale is not None else 0,
        spm, spn, part.stride(0) if split > 1 else 0,
        A_MODE=a_mode, B_MODE=b_mode, GLU=glu, QUANT_OUT=out_scale is not None,
        SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=cfg["GROUP_M"], NUM_STAGES=cfg["num_stages"], INTERP=_interpreting(),
        PDL=use_pdl, launch_pdl=use_pdl,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def scale_mode(scale: torch.Tensor, rows: int, block_rows: bool) -> int:
    """The mode of an operand's scale (see the module docstring) from its shape."""
    if scale.numel() == 1:
        return MODE_TENSOR
    if tuple(scale.shape) == (rows, 1):
        return MODE_ROW
    return MODE_BLOCK if block_rows else MODE_ROW_GROUP


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); overridable for sweeps
CONFIG_OVERRIDE: dict | None = None


def gemm_config(m: int, n: int, k: int, glu: bool, in_loop_scale: bool) -> dict:
    """The kernel-selection rule (see the module docstring). Returns launch parameters and
    whether to swap the operands."""
    if CONFIG_OVERRIDE is not None:
        return dict(CONFIG_OVERRIDE)
    if _interpreting():
        bk = 64 if k >= 64 else 32
        return dict(swap=False, BLOCK_M=16 if m <= 16 else 32, BLOCK_N=128 if glu else 32, BLOCK_K=bk,
                    GROUP_M=4, num_warps=4, num_stages=1)
    if glu and m <= 16:  # swapped: 128 gate rows + 128 up rows per program, a whole 1 x 128 group each
        return dict(swap=True, tma=True, BLOCK_M=128, BLOCK_N=16, BLOCK_K=256, GROUP_M=1, num_warps=8, num_stages=3)
    if not glu and 32 < m <= 128 and n < 16384 and triton.cdiv(n, 64) * triton.cdiv(m, 32) > 2 * num_sms():
        # more 64 x 32 tiles than fit at once (2 per SM: qkv at M = 128 measured 0.86x with
        # them, a second partial wave): 64 x 64 tiles, pointer loads (measured 1.08x there)
        return dict(swap=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=6)
    if not glu and 32 < m <= 64 and n >= 16384:  # gate_up: 32.9 us against 34.5 swapped (H200)
        return dict(swap=False, tma=True, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if not glu and (m <= 64 or (m <= 128 and n < 16384)):
        # memory-bound on the weights: swapped, TMA, 256-byte weight row segments per stage
        # (128-byte ones, twice as many stages, where scales change along K)
        bn, stages = (16, 4) if m <= 16 else (32, 4) if n < 16384 else (64, 3)
        bk = 256
        if in_loop_scale:
            bk, stages = 128, 2 * stages
        tiles = triton.cdiv(n, 64) * triton.cdiv(m, bn)
        # at most one tile per two SMs: split K in two (down and o at M <= 16: 64 tiles)
        split = split_k_in_two(tiles, k)
        return dict(swap=True, tma=True, BLOCK_M=64, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=4,
                    num_stages=stages, split_k=split)
    if not glu and m <= 128 and n >= 16384:  # gate_up, 65-128 tokens: 1.01x against 0.96x for 64 x 128
        return dict(swap=False, tma=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    if glu and m <= 128:
        return dict(swap=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if glu:
        return dict(swap=False, tma=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    if m <= 512:  # decode batches: 64 x 128 tiles fill the GPU (128 x 256 ones ran o at 0.6x)
        return dict(swap=False, tma=True, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if in_loop_scale:  # a second fp32 tile for each K step's partial product
        return dict(swap=False, tma=True, BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(swap=False, tma=True, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)


def _launch_gemm(a, b, a_scale, b_scale, bias, out, out_scale, glu: bool):
    m, k = a.shape
    n = b.shape[0] // 2 if glu else b.shape[0]
    a_mode = scale_mode(a_scale, m, block_rows=False)
    b_mode = scale_mode(b_scale, b.shape[0], block_rows=True)
    in_loop = a_mode >= 3 or b_mode >= 3
    cfg = gemm_config(m, n, k, glu, in_loop)
    swap = cfg.pop("swap")
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    a_scale = a_scale.reshape(1) if a_mode == MODE_TENSOR else a_scale
    b_scale = b_scale.reshape(1) if b_mode == MODE_TENSOR else b_scale
    sa_stride = a_scale.stride(0) if a_mode != MODE_TENSOR else 0
    sb_stride = b_scale.stride(0) if b_mode != MODE_TENSOR else 0
    if m == 0 or n == 0:
        return
    if CONFIG_OVERRIDE is None and gluon_decode_gemm.supported(a, b, a_mode, b_mode, bias, glu):
        gluon_decode_gemm.decode_gemm(a, b, a_scale, b_scale, a_mode == MODE_ROW_GROUP, out, out_scale, glu)
        return
    if in_loop:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], SCALE_BLOCK)
    # a quantized output's 1 x 128 group must be one tile's extent on the weight side
    group_fits = out_scale is None or cfg["BLOCK_M" if swap else "BLOCK_N"] == SCALE_BLOCK
    if cfg.pop("tma", False) and bias is None and group_fits and _tma_ok(a) and _tma_ok(b):
        _launch_gemm_tma(a, b, a_scale, b_scale, a_mode, b_mode, out, out_scale, n if glu else 0, cfg, swap)
        return
    swap = swap and not glu and out_scale is None
    if glu and cfg["BLOCK_N"] != SCALE_BLOCK:  # the TMA config did not apply (alignment): a pointer one
        cfg.update(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=SCALE_BLOCK, BLOCK_K=128, num_warps=4, num_stages=4)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    common = dict(HAS_BIAS=bias is not None, GLU=glu, QUANT_OUT=out_scale is not None,
                  EVEN_K=k % bk == 0, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], INTERP=_interpreting())
    bias_arg = bias if bias is not None else out
    cs = out_scale if out_scale is not None else out
    cs_stride = out_scale.stride(0) if out_scale is not None else 0
    if swap:
        grid = (triton.cdiv(n, bm) * triton.cdiv(m, bn),)
        _fp8_gemm_kernel[grid](
            b, a, out, b_scale, a_scale, bias_arg, cs, n, m, k, 0,
            b.stride(0), a.stride(0), out.stride(1), out.stride(0), sb_stride, sa_stride, cs_stride,
            A_MODE=b_mode, B_MODE=a_mode,
            BIAS_ON_M=True, BLOCK_M=bm, BLOCK_N=bn, **common)
    else:
        if out_scale is not None:
            assert bn == SCALE_BLOCK, "fp8 output quantization needs BLOCK_N = 128"
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _fp8_gemm_kernel[grid](
            a, b, out, a_scale, b_scale, bias_arg, cs, m, n, k, n if glu else 0,
            a.stride(0), b.stride(0), out.stride(0), out.stride(1), sa_stride, sb_stride, cs_stride,
            A_MODE=a_mode, B_MODE=b_mode, BIAS_ON_M=False, BLOCK_M=bm, BLOCK_N=bn, **common)


# From these many rows, FP8 GEMMs of per-channel-scaled weights run on the Gluon kernels of
# kernels/gluon_fp8_gemm.py (H100 measurements: benchmarks/results/h100-2026-11-27/group_gemm/
# and .../token_gemm/); below, this module's. Activations with per-1x128-group scales (the fused
# MLP's down GEMM): the group-scaled kernel, which keeps the tensor cores busy while it applies
# the scales. Alone it is faster from 128 rows (1.15x at 128, 1.26x at 256 on an H100), but with
# the threshold at 128 an FP8 128/128 throughput run at max batch 256 went 13% slower end to end
# (17,743 against 20,386 tok/s, same machine; not explained yet: the first suspect is the Gluon
# launch's host cost in host-bound eager steps). At 512 the engine measured faster: +3.2% at
# max batch 1024, +1.3% at 1000/1000. Per-token activations (qkv, o, the GLU gate_up): the
# token-scaled kernel (persistent, warp-specialized, one wgmma chain per warpgroup).
GLUON_GROUP_GEMM_MIN_M = 512
GLUON_TOKEN_GEMM_MIN_M = 512


def gemm_backend(a, b, a_scale, b_scale, bias, out_dtype, glu: bool = False) -> str:
    """'gluon_group', 'gluon_token' or 'triton' for an FP8 GEMM (glu: b is a [gate; up] weight
    and the SiLU-and-mul epilogue runs); a static rule, CUDA-graph safe.
    TRTLLM_KERNELS_FP8_GEMM_BACKEND = auto (default), triton, or gluon (at any M, still Triton
    where no Gluon kernel takes the inputs)."""
    choice = os.environ.get("TRTLLM_KERNELS_FP8_GEMM_BACKEND", "auto")
    if choice == "triton" or bias is not None or CONFIG_OVERRIDE is not None \
            or out_dtype not in (torch.bfloat16, torch.float16):
        return "triton"
    from . import gluon_fp8_gemm as g

    if not glu and g.supported(a, b, a_scale, b_scale):
        backend, min_m = "gluon_group", GLUON_GROUP_GEMM_MIN_M
    elif g.token_supported(a, b, a_scale, b_scale, glu):
        backend, min_m = "gluon_token", GLUON_TOKEN_GEMM_MIN_M
    else:
        return "triton"
    return backend if choice == "gluon" or a.shape[0] >= min_m else "triton"


def fp8_gemm_cuda(a, b, a_scale, b_scale, bias, out_dtype):
    backend = gemm_backend(a, b, a_scale, b_scale, bias, out_dtype)
    if backend == "gluon_group":
        from .gluon_fp8_gemm import gluon_group_scaled_gemm

        return gluon_group_scaled_gemm(a, b, a_scale, b_scale, out_dtype)
    if backend == "gluon_token":
        from .gluon_fp8_gemm import gluon_token_scaled_gemm

        return gluon_token_scaled_gemm(a, b, a_scale, b_scale, out_dtype)[0]
    return triton_fp8_gemm(a, b, a_scale, b_scale, bias, out_dtype)


def triton_fp8_gemm(a, b, a_scale, b_scale, bias, out_dtype):
    out = torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    _launch_gemm(a, b, a_scale, b_scale, bias, out, None, glu=False)
    return out


def fp8_gemm_silu_mul_cuda(a, b, a_scale, b_scale, quant_out, out_dtype):
    if gemm_backend(a, b, a_scale, b_scale, None, out_dtype, glu=True) == "gluon_token":
        from .gluon_fp8_gemm import gluon_token_scaled_gemm

        out, scale = gluon_token_scaled_gemm(a, b, a_scale, b_scale, out_dtype, glu=True, quant_out=quant_out)
        return out, (scale if scale is not None else torch.empty(0, dtype=torch.float32, device=a.device))
    m, inter = a.shape[0], b.shape[0] // 2
    if quant_out:
        out = torch.empty(m, inter, dtype=FP8, device=a.device)
        scale = torch.empty(m, triton.cdiv(inter, SCALE_BLOCK), dtype=torch.float32, device=a.device)
    else:
        out = torch.empty(m, inter, dtype=out_dtype, device=a.device)
        scale = None
    _launch_gemm(a, b, a_scale, b_scale, None, out, scale, glu=True)
    return out, (scale if scale is not None else torch.empty(0, dtype=torch.float32, device=a.device))


def fused_mlp_fp8_cuda(x, x_scale, w_gate_up, gate_up_scale, w_down, down_scale, quant_intermediate, out_dtype):
    h, h_scale = fp8_gemm_silu_mul_cuda(x, w_gate_up, x_scale, gate_up_scale, quant_intermediate, out_dtype)
    if not quant_intermediate:
        h, h_scale = quantize_per_token_cuda(h, SCALE_BLOCK)
    return fp8_gemm_cuda(h, w_down, h_scale, down_scale, None, out_dtype)


def register() -> None:
    from .._library import register_cuda_kernel

    register_cuda_kernel("fp8_quantize_per_tensor", quantize_per_tensor_cuda)
    register_cuda_kernel("fp8_quantize_per_token", quantize_per_token_cuda)
    register_cuda_kernel("fp8_gemm", fp8_gemm_cuda)
    register_cuda_kernel("fp8_gemm_silu_mul", fp8_gemm_silu_mul_cuda)
    register_cuda_kernel("fused_mlp_fp8", fused_mlp_fp8_cuda)
    register_cuda_kernel("rms_norm_quant_fp8", rms_norm_quant_fp8_cuda)
