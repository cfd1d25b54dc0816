"""Triton SiLU-and-mul: out = silu(x[:, :I]) * x[:, I:], one pass, fp32 math in registers.

Grid: (rows, cdiv(I, BLOCK)). Each program reads BLOCK gate and BLOCK up values of one row and
writes BLOCK outputs: 3 x I elements of traffic per row, the minimum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, x_row_stride, out_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def triton_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows and inter:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
            x2, out, inter, x2.stride(0), inter, BLOCK=block, num_warps=4)
    return out


def register() -> None:
    from .._library import register_cuda_kernel

    register_cuda_kernel("silu_and_mul", triton_silu_and_mul)
