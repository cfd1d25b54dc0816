"""Linear layer: y = x @ weight.T (+ bias). Quantized variants live with their formats."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._library import define_op


def _linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _linear_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


_linear = define_op(
    "linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", _linear_ref, _linear_fake
)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K], weight: [N, K] (row-major, as nn.Linear), bias: [N] or None -> [..., N].

    All of one dtype (fp32/fp16/bf16); accumulation is fp32 on every backend.
    """
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, {x.shape[-1]}], got {tuple(weight.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}")
    return _linear(x, weight, bias)
