"""The bf16 / fp16 fused MLP of the Llama family: y = down(silu(x W_g^T) * (x W_u^T)).

Layouts (the engine's fused weights): w_gate_up [2I, H] holds the gate rows then the up rows,
w_down [H_out, I], both row-major as nn.Linear stores them (K contiguous); x [..., H].
All three of one dtype (fp32, fp16 or bf16); accumulation is fp32.

The unfused sequence writes the [M, 2I] gate_up product to memory, reads it back for
SiLU-and-mul and writes h [M, I]. Here the gate_up GEMM keeps gate and up accumulators side
by side and applies SiLU-and-mul in its epilogue, so only h (rounded once to x's dtype, as
the unfused sequence stores it) is written; then the down GEMM. The FP8 variant is
`trtllm_kernels.fp8.fused_mlp_fp8`. CUDA kernels: `trtllm_kernels.kernels.triton_mlp`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._library import define_op


def _gemm_silu_mul_ref(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    gu = x.float() @ w_gate_up.float().t()
    gate, up = gu.chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def _fused_mlp_ref(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    h = _gemm_silu_mul_ref(x, w_gate_up)  # rounded to x's dtype, as the kernel stores it
    return (h.float() @ w_down.float().t()).to(x.dtype)


_gemm_silu_mul = define_op(
    "gemm_silu_mul(Tensor x, Tensor w_gate_up) -> Tensor",
    _gemm_silu_mul_ref,
    lambda x, w: x.new_empty(*x.shape[:-1], w.shape[0] // 2),
)
_fused_mlp = define_op(
    "fused_mlp(Tensor x, Tensor w_gate_up, Tensor w_down) -> Tensor",
    _fused_mlp_ref,
    lambda x, wgu, wd: x.new_empty(*x.shape[:-1], wd.shape[0]),
)


def _check(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor | None = None) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    if w_gate_up.dim() != 2 or w_gate_up.shape[1] != x.shape[-1] or w_gate_up.shape[0] % 2:
        raise ValueError(f"w_gate_up must be [2I, {x.shape[-1]}], got {tuple(w_gate_up.shape)}")
    if w_gate_up.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but w_gate_up is {w_gate_up.dtype}")
    if w_down is not None:
        inter = w_gate_up.shape[0] // 2
        if w_down.dim() != 2 or w_down.shape[1] != inter:
            raise ValueError(f"w_down must be [H, {inter}], got {tuple(w_down.shape)}")
        if w_down.dtype != x.dtype:
            raise ValueError(f"x is {x.dtype} but w_down is {w_down.dtype}")


def gemm_silu_mul(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """h = silu(x W_g^T) * (x W_u^T) for x [..., H] and w_gate_up [2I, H] ([gate; up] rows),
    from fp32 accumulators in the GEMM's epilogue. Returns h [..., I] in x's dtype."""
    _check(x, w_gate_up)
    return _gemm_silu_mul(x, w_gate_up)


def fused_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The Llama MLP in one op: down(silu(gate(x)) * up(x)).

    x: [..., H]; w_gate_up: [2I, H] (gate rows, then up rows); w_down: [H_out, I]; one dtype.
    The intermediate h [..., I] is rounded to x's dtype once (as the unfused model stores it).
    Returns [..., H_out] in x's dtype.
    """
    _check(x, w_gate_up, w_down)
    return _fused_mlp(x, w_gate_up, w_down)


__all__ = ["fused_mlp", "gemm_silu_mul"]
