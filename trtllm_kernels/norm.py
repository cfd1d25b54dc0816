"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer."""
from __future__ import annotations

import torch

from ._library import define_op


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def _fused_add_rms_norm_ref(x, residual, weight, eps):
    # The sum is rounded to the activation dtype before the norm, as an unfused model does.
    summed = (x.float() + residual.float()).to(x.dtype)
    return _rms_norm_ref(summed, weight, eps), summed


_rms_norm = define_op(
    "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    _rms_norm_ref,
    lambda x, weight, eps: torch.empty_like(x),
)
_fused_add_rms_norm = define_op(
    "fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
    _fused_add_rms_norm_ref,
    lambda x, residual, weight, eps: (torch.empty_like(x), torch.empty_like(x)),
)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps) * weight, computed in float32.

    x: [..., H] (fp32/fp16/bf16), weight: [H]. Returns x's shape and dtype.
    """
    _check_norm_args(x, weight)
    return _rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual; returns (rms_norm(s, weight, eps), s).

    x, residual: [..., H] of one dtype; weight: [H]. `s` is the next layer's residual.
    """
    _check_norm_args(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual must match x: got {tuple(residual.shape)} {residual.dtype}, "
            f"x is {tuple(x.shape)} {x.dtype}"
        )
    return _fused_add_rms_norm(x, residual, weight, eps)


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
