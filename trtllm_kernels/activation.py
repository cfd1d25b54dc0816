"""SiLU-and-mul: the gated activation of the Llama MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._library import define_op


def _silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def _silu_and_mul_fake(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


_silu_and_mul = define_op(
    "silu_and_mul(Tensor x) -> Tensor", _silu_and_mul_ref, _silu_and_mul_fake
)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x of shape [..., 2I]; returns [..., I] in x's dtype.

    The gate half comes first, as in the fused gate_up projection's weight [gate; up].
    """
    if x.shape[-1] % 2:
        raise ValueError(f"last dimension must be even (gate and up halves), got {x.shape[-1]}")
    return _silu_and_mul(x)
