"""Triton kernels of the bf16 / fp16 fused MLP (`trtllm_kernels.mlp`): the gate_up GEMM with
SiLU-and-mul in its epilogue, and a plain GEMM for the down projection.

One kernel, `_mlp_gemm_kernel`: C[i, j] = sum_k A[i, k] B[j, k], both operands K-contiguous
(nn.Linear's weight layout; Triton lowers the tl.dot to wgmma on sm_90), fp32 accumulation.
With GLU one operand is the fused [gate; up] weight [2I, K]: each program keeps two
accumulators (gate rows r and up rows I + r of that operand) and stores silu(gate) * up, so the
[M, 2I] gate_up product never reaches memory.

Swapping (C^T = B A^T): at small M (decode batches) the GEMMs are memory-bound on the weights;
with the weight as the A operand its rows fill the 64-row wgmma tile and the few tokens its
narrow side (16 / 32 / 64 columns). The GLU epilogue is elementwise, so it works in either
orientation: swapped, the gate and up rows are rows of A.

Kernel choice (`mlp_config`), the documented rule, tuned on H100 by a sweep of launch
configurations (benchmarks/sweep_fp8_mlp.py) against cuBLAS + F.silu(g) * u:
- gate_up + SiLU-and-mul, M <= 64: swapped, 64 weight rows (x2: gate and up) per program,
  BLOCK_K 128 (256-byte row segments of the bf16 weight), 4 stages. Measured: 80.8 us at M = 1
  and 16 (2.9 TB/s of weights) against 88.6 / 90.8 us for cuBLAS + silu*mul.
- M <= 2048: 128 x 128 tiles (two 128 x 128 accumulators), BLOCK_K 64, 8 warps, 4 stages (3
  above 256 tokens), grouped launch order (M = 256: 117 us against 127 us).
- M > 2048: cuBLAS gate_up + the Triton silu_and_mul (`GLU_CUBLAS_MIN_M`): the compute-bound
  Triton GEMM ran at 0.965x cuBLAS at M = 4096, more than the saved pass is worth.
- The down GEMM always runs on cuBLAS (torch.matmul): this kernel matched it at best
  (0.99x / 1.04x at M = 1 / 16, 0.6-0.8x above), so `DOWN_CUBLAS_MIN_M` is 1.
- fp32 inputs take the torch path (Triton's fp32 dot would round through tf32).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_tiles import grouped_tile


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mlp_gemm_kernel(
    A, B, C, M, N, K, GLU_OFF,
    stride_am, stride_bn, stride_cm, stride_cn,
    GLU: tl.constexpr, GLU_ON_A: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INTERP: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past M / N read a valid row again (no masks in the K loop); they are never stored
    rm = offs_m % M
    rn = offs_n % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_ptrs = B + rn.to(tl.int64)[None, :] * stride_bn + rk[:, None]
    up_off = GLU_OFF * (stride_am if GLU_ON_A else stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if GLU:
            if GLU_ON_A:
                if EVEN_K:
                    a2 = tl.load(a_ptrs + up_off)
                else:
                    a2 = tl.load(a_ptrs + up_off, mask=rk[None, :] < k_left, other=0.0)
                b2 = b
            else:
                if EVEN_K:
                    b2 = tl.load(b_ptrs + up_off)
                else:
                    b2 = tl.load(b_ptrs + up_off, mask=rk[:, None] < k_left, other=0.0)
                a2 = a
        if INTERP:  # the interpreter's bf16 dot is wrong (triton issue 11584): fp32 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            if GLU:
                a2 = a2.to(tl.float32)
                b2 = b2.to(tl.float32)
        acc = tl.dot(a, b, acc)
        if GLU:
            acc2 = tl.dot(a2, b2, acc2)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if GLU:  # silu(gate) * up from the fp32 accumulators
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)


# Overridable for sweeps: a dict like mlp_config's result, used for every launch while set.
CONFIG_OVERRIDE: dict | None = None
# The down GEMM (no epilogue) runs on cuBLAS from this many tokens up; the gate_up GEMM from
# GLU_CUBLAS_MIN_M up (then SiLU-and-mul is the Triton silu_and_mul). See the docstring.
DOWN_CUBLAS_MIN_M = 1
GLU_CUBLAS_MIN_M = 2049


def mlp_config(m: int, n: int, k: int, glu: bool) -> dict:
    """The kernel-selection rule (module docstring): launch parameters and whether to swap."""
    if CONFIG_OVERRIDE is not None:
        return dict(CONFIG_OVERRIDE)
    if _interpreting():
        return dict(swap=m <= 16, BLOCK_M=16 if m <= 16 else 32, BLOCK_N=16 if m <= 16 else 32, BLOCK_K=32,
                    GROUP_M=4, num_warps=4, num_stages=1)
    if m <= 16:
        return dict(swap=True, BLOCK_M=64, BLOCK_N=16, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(swap=True, BLOCK_M=64, BLOCK_N=32 if m <= 32 else 64, BLOCK_K=128, GROUP_M=1,
                    num_warps=4, num_stages=4)
    return dict(swap=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8,
                num_stages=4 if m <= 256 else 3)


def _launch(x, w, out, glu: bool, cfg: dict | None = None) -> None:
    """out[M, N] = x[M, K] @ w[N, K]^T, or silu(x w_g^T) * (x w_u^T) with N = rows(w) / 2."""
    m, k = x.shape
    n = w.shape[0] // 2 if glu else w.shape[0]
    if m == 0 or n == 0:
        return
    cfg = dict(cfg) if cfg is not None else mlp_config(m, n, k, glu)
    swap = cfg.pop("swap")
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    common = dict(GLU=glu, EVEN_K=k % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], INTERP=_interpreting())
    if swap:  # weight rows are the tile's M side: C^T[n, m] = sum_k w[n, k] x[m, k]
        grid = (triton.cdiv(n, bm) * triton.cdiv(m, bn),)
        _mlp_gemm_kernel[grid](w, x, out, n, m, k, n if glu else 0, w.stride(0), x.stride(0),
                               out.stride(1), out.stride(0), GLU_ON_A=True, **common)
    else:
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _mlp_gemm_kernel[grid](x, w, out, m, n, k, n if glu else 0, x.stride(0), w.stride(0),
                               out.stride(0), out.stride(1), GLU_ON_A=False, **common)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _torch_path(x2: torch.Tensor) -> bool:
    """fp32 (no tf32 rounding wanted), or past the documented cuBLAS threshold."""
    if CONFIG_OVERRIDE is not None or _interpreting():
        return False
    return x2.dtype not in (torch.float16, torch.bfloat16) or x2.shape[0] >= GLU_CUBLAS_MIN_M


def gemm_silu_mul_cuda(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)
    if _torch_path(x2):
        from .. import activation

        return activation.silu_and_mul(torch.matmul(x2, w_gate_up.t())).reshape(*x.shape[:-1], w_gate_up.shape[0] // 2)
    w = w_gate_up if w_gate_up.stride(-1) == 1 else w_gate_up.contiguous()
    out = torch.empty(x2.shape[0], w.shape[0] // 2, dtype=x.dtype, device=x.device)
    _launch(x2, w, out, glu=True)
    return out.reshape(*x.shape[:-1], w.shape[0] // 2)


def linear_cuda(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The down projection: this kernel below DOWN_CUBLAS_MIN_M tokens, cuBLAS above."""
    x2 = _rows(x)
    if (x2.shape[0] >= DOWN_CUBLAS_MIN_M or x2.dtype == torch.float32) and CONFIG_OVERRIDE is None \
            and not _interpreting():
        return torch.matmul(x2, w.t()).reshape(*x.shape[:-1], w.shape[0])
    w = w if w.stride(-1) == 1 else w.contiguous()
    out = torch.empty(x2.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    _launch(x2, w, out, glu=False)
    return out.reshape(*x.shape[:-1], w.shape[0])


def fused_mlp_cuda(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return linear_cuda(gemm_silu_mul_cuda(x, w_gate_up), w_down)


def register() -> None:
    from .._library import register_cuda_kernel

    register_cuda_kernel("gemm_silu_mul", gemm_silu_mul_cuda)
    register_cuda_kernel("fused_mlp", fused_mlp_cuda)
