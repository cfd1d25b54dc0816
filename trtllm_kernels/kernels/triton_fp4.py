"""Triton FP4 weight-only kernels (W4A16): the GEMM with the weights dequantized in registers,
and a dequantization kernel. Formats and the packed layout: `trtllm_kernels.fp4`.

GEMM (`_fp4_gemm_kernel`). The weight is always the MMA's left operand: a program computes
acc[BLOCK_N weight rows, BLOCK_M tokens] = W_tile x X_tile^T and stores it transposed into
out [M, N]. Weight rows fill the 64/128-row side of the tensor-core tile at any token count
(decode has 1-16 tokens), and on sm_90 the dequantized tile can feed wgmma from registers.
Per K step a program loads BLOCK_N rows x KB bytes of packed codes (KB contiguous bytes a row:
16-byte vector loads), splits the nibbles (low: K columns [j0, j0 + KB), high: the same
columns of the second half of K, see the packed layout), turns each code into fp16 bits with
two shifts and masks (magnitude bits to the fp16 exponent/mantissa field, sign to bit 15: the
fp16 value is the e2m1 value times 2^-14, exact, 0.5 landing on an fp16 subnormal), converts
to fp32, multiplies by its group's scale (times 2^14) and rounds to the activation dtype. The
products e2m1 x e4m3 (NVFP4) and e2m1 x 2^e (MXFP4) are exact in bf16 and fp16 (6 significant
bits at most), so the only rounding before the fp32 accumulation is the activations' own; the
NVFP4 global scale multiplies the fp32 accumulator once in the epilogue. Two dots per step
(low half, high half) against the matching contiguous activation columns.

With bf16 activations on sm_90 the conversion runs in PTX instead (`_E2M1_BF16_ASM`: a
`prmt` table lookup, four instructions a code, the scale multiply in bf16x2); it gives the
same weights bit for bit (tested) and measured within a few percent of the generic path.

Small M (decode) is memory-bound on the 4-bit weights: narrow token tiles, wide K steps and
split-K (each K share writes fp32 partials that `sum_splits_kernel` adds in a fixed order:
deterministic) so that enough programs stream weights to fill the machine. Large M (prefill)
is compute-bound: from `DEQUANT_MATMUL_MIN_M` (256) tokens the op dequantizes the weight to
the activation dtype with `_fp4_dequant_kernel` (N x K x 2 bytes written once, ~5% of a
4096-token GEMM) and calls cuBLAS through torch.matmul: the fused kernel took 2.3x cuBLAS's
time at 4096 tokens, this path 1.05x.

bf16 activations with K % 128 == 0 below 256 tokens go to the csrc kernels instead: 1-16 tokens
(and up to 64 off Hopper) to csrc/fp4_gemm.cu, which keeps every weight in registers from global
memory to mma.sync (see its header); 17-255 tokens on Hopper to csrc/fp4_wgmma.cu, which
dequantizes the weights into wgmma's register operand and brings the activations by TMA. On an
H100 (benchmarks/results/h100-2026-11-28/fp4_wgmma), gate_up 28672x4096: M = 1 25.7 us against
this kernel's 84 us; M = 64 52 us (mma.sync 76, this kernel 100); M = 128 80 us (this kernel
142). This kernel was held to 0.7-1.0 TB/s by moving each dequantized tile through shared memory
into the MMA operand layout (about 500 instructions and three barriers a K step per thread at
M = 1, found in its TTGIR / PTX); it still serves fp16 / fp32 activations, rows that are not a
whole number of 64-byte steps, and 65-255 tokens off Hopper. (Its per-step scale loads, 2
bytes a thread, are not software-pipelined: cp.async needs 4. Loading them as int32 words
fixed that and measured within noise at 1-16 tokens and slower at 64 on H200, so they stay
bytes: benchmarks/results/h200-2026-11-27.)
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..fp4 import MXFP4_GROUP, NVFP4_GROUP, group_size_of
from .triton_tiles import num_sms, sum_splits_kernel


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _e2m1_f32(c):
    """int32 e2m1 codes (0..15) -> fp32 value * 2^-14 (via fp16 bits, exact)."""
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _scale_f32(s, NVFP4: tl.constexpr):
    """Loaded scales -> fp32 factors times 2^14 (undoing `_e2m1_f32`'s offset).
    NVFP4: e4m3 values. MXFP4: e8m0 codes, 2^(code - 127) built from its exponent bits (code 0
    is 2^-127, an fp32 subnormal; code 255 gives Inf, and its block's codes are all 0, so
    0 * Inf = NaN as the format says)."""
    if NVFP4:  # scales arrive as their uint8 bits (masked loads fill 0 in any dtype)
        f = s.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        # S.1111.111 is NaN; said explicitly (the Triton interpreter's conversion returns 0)
        f = tl.where((s.to(tl.int32) & 0x7F) == 0x7F, float("nan"), f)
    else:
        e = s.to(tl.int32)
        bits = tl.where(e == 0, 0x00400000, e << 23)
        f = bits.to(tl.float32, bitcast=True)
    return f * 16384.0


@triton.jit
def _dequant_tile(codes, s, BLOCK_N: tl.constexpr, KB: tl.constexpr, GROUP: tl.constexpr,
                  NVFP4: tl.constexpr):
    """codes int32 [BLOCK_N, KB] and their raw scales [BLOCK_N, KB // GROUP] -> fp32 weights."""
    v = _e2m1_f32(codes)
    f = _scale_f32(s, NVFP4)
    v = tl.reshape(v, (BLOCK_N, KB // GROUP, GROUP)) * f[:, :, None]
    return tl.reshape(v, (BLOCK_N, KB))


# e2m1 -> bf16 on sm_90 in PTX, four packed bytes (eight codes) at a time, and the scale
# multiply in bf16x2 (exact: at most 6 significant bits). The three magnitude bits of each
# code index an 8-entry table with `prmt` (a byte permute used as a lookup: one instruction
# looks up four codes' low bytes, one their high bytes), two more `prmt`s interleave them
# into bf16x2 pairs, and the sign bit moves to bit 15 of each value. About 4 instructions per
# code against ~13 for the generic path. Inputs: $4 four bytes (element i = byte i), $5 $6
# (low halves' scales, bf16x2), $7 $8 (high halves'); outputs $0 $1 (low nibbles' values,
# elements 0-1 and 2-3), $2 $3 (high nibbles').
_E2M1_BF16_ASM = tl.constexpr("""
{
.reg .b32 m, t, sel, dl, dh, sg, s0, s1, z, la, lb, ha, hb;
mov.b32 z, 0;
mov.b32 la, 0xC0800000;
mov.b32 lb, 0xC0804000;
mov.b32 ha, 0x3F3F3F00;
mov.b32 hb, 0x40404040;
and.b32 m, $4, 0x07070707;
shr.b32 t, m, 4;
or.b32 sel, m, t;
prmt.b32 sel, sel, z, 0x0020;
prmt.b32 dl, la, lb, sel;
prmt.b32 dh, ha, hb, sel;
prmt.b32 $0, dl, dh, 0x5140;
prmt.b32 $1, dl, dh, 0x7362;
shl.b32 sg, $4, 4;
and.b32 sg, sg, 0x80808080;
prmt.b32 s0, sg, z, 0x1404;
prmt.b32 s1, sg, z, 0x3424;
or.b32 $0, $0, s0;
or.b32 $1, $1, s1;
mul.rn.bf16x2 $0, $0, $5;
mul.rn.bf16x2 $1, $1, $6;
shr.b32 m, $4, 4;
and.b32 m, m, 0x07070707;
shr.b32 t, m, 4;
or.b32 sel, m, t;
prmt.b32 sel, sel, z, 0x0020;
prmt.b32 dl, la, lb, sel;
prmt.b32 dh, ha, hb, sel;
prmt.b32 $2, dl, dh, 0x5140;
prmt.b32 $3, dl, dh, 0x7362;
and.b32 sg, $4, 0x80808080;
prmt.b32 s0, sg, z, 0x1404;
prmt.b32 s1, sg, z, 0x3424;
or.b32 $2, $2, s0;
or.b32 $3, $3, s1;
mul.rn.bf16x2 $2, $2, $7;
mul.rn.bf16x2 $3, $3, $8;
}
""")


@triton.jit
def _scale_bf16_tile(s, BLOCK_N: tl.constexpr, KB: tl.constexpr, GROUP: tl.constexpr, NVFP4: tl.constexpr):
    """Raw scales [BLOCK_N, KB // GROUP] -> their exact bf16 values, one per code [BLOCK_N, KB]."""
    f = (_scale_f32(s, NVFP4) * (1.0 / 16384.0)).to(tl.bfloat16)
    return tl.reshape(tl.broadcast_to(f[:, :, None], (BLOCK_N, KB // GROUP, GROUP)), (BLOCK_N, KB))


@triton.jit
def _dequant_asm(wb, s_lo, s_hi, BLOCK_N: tl.constexpr, KB: tl.constexpr, GROUP: tl.constexpr,
                 NVFP4: tl.constexpr):
    """Packed bytes uint8 [BLOCK_N, KB] -> (low-half weights, high-half weights) in bf16, scaled."""
    return tl.inline_asm_elementwise(
        _E2M1_BF16_ASM, "=r,=r,=r,=r,r,r,r,r,r",
        [wb, _scale_bf16_tile(s_lo, BLOCK_N, KB, GROUP, NVFP4), _scale_bf16_tile(s_hi, BLOCK_N, KB, GROUP, NVFP4)],
        dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _fp4_gemm_kernel(
    X, W, S, G, Out, M, N, HALF, stride_xm, stride_wn, stride_sn, stride_om, stride_split,
    NVFP4: tl.constexpr, GROUP: tl.constexpr, HAS_G: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr, GROUP_N: tl.constexpr,
    PREC: tl.constexpr, ASM: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    # grouped launch order: GROUP_N weight tiles x all token tiles, for L2 reuse at large M
    width = GROUP_N * num_m
    first_n = (pid // width) * GROUP_N
    size_n = min(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % size_n
    pid_m = (pid % width) // size_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (offs_n % N).to(tl.int64)  # rows past N / M re-read a valid row; never stored
    rm = (offs_m % M).to(tl.int64)
    rb = tl.arange(0, KB)
    rg = tl.arange(0, KB // GROUP)
    w_ptrs = W + rn[:, None] * stride_wn + rb[None, :]
    x_ptrs = X + rm[None, :] * stride_xm + rb[:, None]
    s_ptrs = S + rn[:, None] * stride_sn + rg[None, :]
    HALF_G = HALF // GROUP  # scale columns of the low half

    steps = tl.cdiv(HALF, KB)
    per = tl.cdiv(steps, SPLIT_K)
    first = pid_k * per
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in range(0, per):
        step = first + i
        j0 = step * KB
        if EVEN:
            wb = tl.load(w_ptrs + j0)
            s_lo = tl.load(s_ptrs + j0 // GROUP)
            s_hi = tl.load(s_ptrs + HALF_G + j0 // GROUP)
            x_lo = tl.load(x_ptrs + j0)
            x_hi = tl.load(x_ptrs + HALF + j0)
        else:
            left = tl.where(step < steps, HALF - j0, 0)
            kmask = rb < left
            gmask = rg < left // GROUP
            wb = tl.load(w_ptrs + j0, mask=kmask[None, :], other=0)
            s_lo = tl.load(s_ptrs + j0 // GROUP, mask=gmask[None, :], other=0)
            s_hi = tl.load(s_ptrs + HALF_G + j0 // GROUP, mask=gmask[None, :], other=0)
            x_lo = tl.load(x_ptrs + j0, mask=kmask[:, None], other=0.0)
            x_hi = tl.load(x_ptrs + HALF + j0, mask=kmask[:, None], other=0.0)
        if ASM:  # bf16 activations on sm_90: the PTX path
            w_lo, w_hi = _dequant_asm(wb, s_lo, s_hi, BLOCK_N, KB, GROUP, NVFP4)
        else:
            wi = wb.to(tl.int32)
            w_lo = _dequant_tile(wi & 15, s_lo, BLOCK_N, KB, GROUP, NVFP4).to(x_lo.dtype)
            w_hi = _dequant_tile(wi >> 4, s_hi, BLOCK_N, KB, GROUP, NVFP4).to(x_lo.dtype)
        acc = tl.dot(w_lo, x_lo, acc, input_precision=PREC)
        acc = tl.dot(w_hi, x_hi, acc, input_precision=PREC)

    if HAS_G:
        acc = acc * tl.load(G)
    out_ptrs = Out + offs_m.to(tl.int64)[None, :] * stride_om + offs_n.to(tl.int64)[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    if SPLIT_K > 1:  # this K share's partial sums, fp32, added by sum_splits_kernel
        out_ptrs += pid_k.to(tl.int64) * stride_split
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _fp4_dequant_kernel(W, S, G, Out, N, HALF, stride_wn, stride_sn, stride_on,
                        NVFP4: tl.constexpr, GROUP: tl.constexpr, HAS_G: tl.constexpr,
                        BLOCK_N: tl.constexpr, KB: tl.constexpr):
    """Out[n, k] = e2m1 * scale (* global) in Out's dtype, one BLOCK_N x KB-byte tile a program."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = pid_b * KB + tl.arange(0, KB)
    rg = pid_b * (KB // GROUP) + tl.arange(0, KB // GROUP)
    nmask = offs_n < N
    rn = offs_n.to(tl.int64)
    bmask = nmask[:, None] & (rb < HALF)[None, :]
    gmask = nmask[:, None] & (rg < HALF // GROUP)[None, :]
    wb = tl.load(W + rn[:, None] * stride_wn + rb[None, :], mask=bmask, other=0).to(tl.int32)
    s_lo = tl.load(S + rn[:, None] * stride_sn + rg[None, :], mask=gmask, other=0)
    s_hi = tl.load(S + rn[:, None] * stride_sn + HALF // GROUP + rg[None, :], mask=gmask, other=0)
    lo = _dequant_tile(wb & 15, s_lo, BLOCK_N, KB, GROUP, NVFP4)
    hi = _dequant_tile(wb >> 4, s_hi, BLOCK_N, KB, GROUP, NVFP4)
    if HAS_G:
        g = tl.load(G)
        lo = lo * g
        hi = hi * g
    o_ptrs = Out + rn[:, None] * stride_on + rb[None, :]
    tl.store(o_ptrs, lo.to(Out.dtype.element_ty), mask=bmask)
    tl.store(o_ptrs + HALF, hi.to(Out.dtype.element_ty), mask=bmask)


def fp4_dequantize_cuda(w, scale, global_scale, dtype):
    group = group_size_of(scale)
    n, half = w.shape
    out = torch.empty(n, 2 * half, dtype=dtype, device=w.device)
    if n == 0 or half == 0:
        return out
    w = w if w.stride(1) == 1 else w.contiguous()
    scale = scale if scale.stride(1) == 1 else scale.contiguous()
    bn, kb = (16, 64) if _interpreting() else (32, 128)
    scale = scale.view(torch.uint8)
    g = global_scale if global_scale is not None else scale
    _fp4_dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(half, kb))](
        w, scale, g, out, n, half, w.stride(0), scale.stride(0), out.stride(0),
        NVFP4=group == NVFP4_GROUP, GROUP=group, HAS_G=global_scale is not None, BLOCK_N=bn, KB=kb,
        num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# Kernel choice

# set to a dict (gemm_config's keys) to force one configuration, for sweeps and tests
CONFIG_OVERRIDE: dict | None = None
# the PTX e2m1 -> bf16 conversion for bf16 activations (False: the generic Triton path)
USE_ASM = True
# token count from which the op dequantizes to the activation dtype and calls cuBLAS
DEQUANT_MATMUL_MIN_M = 256
# bf16 batches below DEQUANT_MATMUL_MIN_M through the csrc kernels where they build (False: Triton)
USE_CSRC = True

def gemm_config(m: int, n: int, half: int) -> dict:
    """Launch parameters of the fused kernel for out [m, n] from packed rows of `half` bytes.
    (Tuned on H100 by benchmarks/sweep_fp4.py; the rule, not a search, runs at call time.)"""
    if CONFIG_OVERRIDE is not None:
        return dict(CONFIG_OVERRIDE)
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, KB=32, SPLIT_K=2 if half >= 64 else 1, GROUP_N=2,
                    num_warps=4, num_stages=1)
    # measured on H100 (benchmarks/sweep_fp4.py, gate_up 28672x4096 and down 4096x14336): at
    # M <= 16, 128 weight rows x 128 codes a step, 8 warps, 4 stages (split-K fills the machine
    # on down); 64 tokens 64 x 128 tiles; 128 tokens 128 x 128 with 64 codes a step (147.5 /
    # 68.9 us against 160.2 / 74.9 with 128 codes, gate_up / down).
    if m <= 16:
        bm, bn, kb, warps, stages = 16, 128, 64, 8, 4
    elif m <= 64:
        bm, bn, kb, warps, stages = 64, 128, 64, 8, 3
    elif m <= 256:
        bm, bn, kb, warps, stages = 128, 128, 32, 8, 3
    else:
        bm, bn, kb, warps, stages = 128, 128, 32, 8, 3
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    steps = triton.cdiv(half, kb)
    split = 1
    # split K until ~2 waves of programs stream weights, each keeping >= 4 K steps
    while tiles * split < 2 * num_sms() and steps // (split * 2) >= 4 and split < 16:
        split *= 2
    return dict(BLOCK_M=bm, BLOCK_N=bn, KB=kb, SPLIT_K=split, GROUP_N=8, num_warps=warps, num_stages=stages)


def _launch(x, w, scale, global_scale, cfg):
    group = group_size_of(scale)
    m, _ = x.shape
    n, half = w.shape
    split = cfg["SPLIT_K"]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    # split K: each share writes fp32 partials, summed in order (deterministic, no atomics)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    kb = cfg["KB"]
    steps = triton.cdiv(half, kb)
    even = half % kb == 0 and steps % split == 0
    grid = (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(m, cfg["BLOCK_M"]), split)
    scale = scale.view(torch.uint8)
    g = global_scale if global_scale is not None else scale
    _fp4_gemm_kernel[grid](
        x, w, scale, g, part, m, n, half, x.stride(0), w.stride(0), scale.stride(0), out.stride(0), m * n,
        NVFP4=group == NVFP4_GROUP, GROUP=group, HAS_G=global_scale is not None, SPLIT_K=split, EVEN=even,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], KB=kb, GROUP_N=cfg["GROUP_N"],
        PREC="ieee" if x.dtype == torch.float32 else "tf32",
        ASM=cfg.get("ASM", USE_ASM) and x.dtype == torch.bfloat16 and not _interpreting(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1:
        sum_splits_kernel[(triton.cdiv(m * n, 1024),)](part, out, m * n, SPLIT_K=split, BLOCK=1024, num_warps=4)
    return out


def fp4_gemm_cuda(x, w, scale, global_scale):
    m = x.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    scale = scale if scale.stride(1) == 1 else scale.contiguous()
    if CONFIG_OVERRIDE is None and m >= DEQUANT_MATMUL_MIN_M and not _interpreting():
        return torch.matmul(x, fp4_dequantize_cuda(w, scale, global_scale, x.dtype).t())
    if CONFIG_OVERRIDE is None and USE_CSRC and not _interpreting():
        from . import csrc

        if m >= csrc.FP4_WGMMA_MIN_M and csrc.fp4_wgmma_supported(x, w, scale) and csrc.available():
            return csrc.fp4_gemm_wgmma_cuda(x, w, scale, global_scale)
        if csrc.fp4_small_m_supported(x, w, scale) and csrc.available():
            return csrc.fp4_gemm_small_m_cuda(x, w, scale, global_scale)
    return _launch(x, w, scale, global_scale, gemm_config(m, w.shape[0], w.shape[1]))


def fp4_gemm_w4a8_cuda(x, w, scale):
    """W4A8 on CUDA, on Hopper with bf16 x:
    - 1-16 tokens: the activations quantized to fp8 and dequantized to bf16 (each within 2^-9 of
      xq * xs), then the mma.sync W4A16 kernel (csrc/fp4_gemm.cu): decode is bound by streaming
      the weights, which that kernel does faster than the W4A8 one's 16-token tiles (H200, gate_up
      at 1 token: 26 against 34 us);
    - 17-255 tokens: the W4A8 kernel of csrc/fp4_wgmma.cu (weights converted in registers);
    - from DEQUANT_MATMUL_MIN_M, where N and K are multiples of 16: the weights converted to e4m3
      once per call (csrc w4a8_weights_kernel), the activations quantized as the kernel quantizes
      them, and torch._scaled_mm with row-wise scales (the kernel's 128-token tiles took 1.2-1.3x
      bf16 cuBLAS's time at 4096 tokens on H200).
    Elsewhere the op's reference math, on the GPU."""
    x = x if x.stride(1) == 1 else x.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    scale = scale if scale.stride(1) == 1 else scale.contiguous()
    if USE_CSRC and not _interpreting():
        from . import csrc

        if csrc.fp4_w4a8_supported(x, w, scale) and csrc.available():
            if x.shape[0] < csrc.FP4_WGMMA_MIN_M and csrc.fp4_small_m_supported(x, w, scale):
                return csrc.fp4_gemm_small_m_cuda(csrc.fp8_quantize_tokens_cuda(x, rounded=True), w, scale, None)
            if x.shape[0] >= DEQUANT_MATMUL_MIN_M and w.shape[0] % 16 == 0 and x.shape[1] % 16 == 0:
                wq, rs = csrc.fp4_w4a8_weights_cuda(w, scale)
                xq, xs = csrc.fp8_quantize_tokens_cuda(x)  # as the kernel's: one model, same activations
                return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=rs[None, :], out_dtype=x.dtype)
            return csrc.fp4_gemm_w4a8_cuda(x, w, scale)
    from ..fp4 import _fp4_gemm_w4a8_ref

    return _fp4_gemm_w4a8_ref(x, w, scale)


def register() -> None:
    from .._library import register_cuda_kernel

    register_cuda_kernel("fp4_gemm", fp4_gemm_cuda)
    register_cuda_kernel("fp4_gemm_w4a8", fp4_gemm_w4a8_cuda)
    register_cuda_kernel("fp4_dequantize", fp4_dequantize_cuda)


__all__ = [
    "MXFP4_GROUP", "NVFP4_GROUP", "fp4_dequantize_cuda", "fp4_gemm_cuda", "fp4_gemm_w4a8_cuda", "gemm_config",
    "register",
]
