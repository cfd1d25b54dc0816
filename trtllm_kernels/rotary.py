"""Rotary position embedding (RoPE), "neox" / rotate-half style as in Hugging Face Llama.

The cos/sin table is built once per model: `cos_sin_cache[p] = [cos(p * f), sin(p * f)]` for
the D/2 inverse frequencies f, so the table is [max_position, D] in float32. Queries and keys
rotate pairs (x[i], x[i + D/2]).
"""
from __future__ import annotations

import math

import torch

from ._library import define_op


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The D/2 inverse frequencies, with Llama-3 or linear `rope_scaling` (HF config dict)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def rope_cos_sin_cache(
    head_dim: int, max_position: int, theta: float = 10000.0, scaling: dict | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[max_position, head_dim] float32: cos in the first half of each row, sin in the second."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _rotary_ref(positions, q, k, cos_sin_cache):
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


_rotary_embedding = define_op(
    "rotary_embedding(Tensor positions, Tensor q, Tensor k, Tensor cos_sin_cache) -> (Tensor, Tensor)",
    _rotary_ref,
    lambda positions, q, k, cache: (torch.empty_like(q), torch.empty_like(k)),
)


def check_rotary_args(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Shape checks shared by the rotary ops (here and `rope_and_write_kv_cache`)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be [T, Hq, D] and k [T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"positions must be [{q.shape[0]}], got {tuple(positions.shape)}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != q.shape[2]:
        raise ValueError(f"cos_sin_cache must be [max_position, {q.shape[2]}], got {tuple(cos_sin_cache.shape)}")


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by token positions [T] (int64).

    cos_sin_cache: [max_position, D] float32 from `rope_cos_sin_cache`. Returns new (q, k) in
    their dtypes; the inputs are not modified.
    """
    check_rotary_args(positions, q, k, cos_sin_cache)
    return _rotary_embedding(positions, q, k, cos_sin_cache)
