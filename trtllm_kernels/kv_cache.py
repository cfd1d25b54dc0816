"""Writing keys and values into the paged KV cache.

Layout (documented in full in docs/formats.md): per layer, one key and one value cache of
shape [num_blocks, num_kv_heads, block_size, head_dim] ("HND": one head's page is a contiguous
block_size x head_dim tile). A token's slot is `block * block_size + offset`; slot -1 marks a
padding token that is not written. An FP8 cache (float8_e4m3fn) stores value / scale with one
fp32 scale per cache (k_scale, v_scale); readers multiply it back.

`rope_and_write_kv_cache` is the fused step of a layer: rotary embedding on q and k and the
k / v scatter into the cache in one op (one kernel on CUDA), returning the rotated q.
"""
from __future__ import annotations

import torch

from ._library import define_op
from .rotary import _rotary_ref, check_rotary_args

FP8_E4M3_MAX = 448.0


def quantize_to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x in float -> the cache's dtype; FP8 caches divide by `scale` and saturate."""
    if cache_dtype == torch.float8_e4m3fn:
        return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(cache_dtype)
    return x.to(cache_dtype)


def dequantize_from_cache(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Cache contents -> float32 (FP8 caches multiply by `scale`)."""
    if x.dtype == torch.float8_e4m3fn:
        return x.float() * scale
    return x.float()


def _write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    block_size = k_cache.shape[2]
    blocks, offsets = (slots // block_size)[:, None], (slots % block_size)[:, None]
    heads = torch.arange(k_cache.shape[1], device=k.device)[None, :]
    k_cache[blocks, heads, offsets] = quantize_to_cache(k[valid], k_cache.dtype, k_scale)
    v_cache[blocks, heads, offsets] = quantize_to_cache(v[valid], v_cache.dtype, v_scale)


_write_kv_cache = define_op(
    "write_kv_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor slot_mapping, float k_scale, float v_scale) -> ()",
    _write_kv_cache_ref,
    lambda k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale: None,
)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Scatter k, v [T, Hkv, D] into k_cache, v_cache [num_blocks, Hkv, block_size, D] in place.

    slot_mapping: [T] int64, `block * block_size + offset`, -1 to skip a token.
    """
    check_kv_cache(k_cache, v_cache, k.shape[1], k.shape[2])
    if v.shape != k.shape or slot_mapping.shape != (k.shape[0],):
        raise ValueError(
            f"k, v must be [T, Hkv, D] alike and slot_mapping [T]: got {tuple(k.shape)}, "
            f"{tuple(v.shape)}, {tuple(slot_mapping.shape)}"
        )
    _write_kv_cache(k, v, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale))


def _rope_and_write_kv_cache_ref(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                 k_scale, v_scale):
    q_rot, k_rot = _rotary_ref(positions, q, k, cos_sin_cache)
    _write_kv_cache_ref(k_rot, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q_rot


_rope_and_write_kv_cache = define_op(
    "rope_and_write_kv_cache(Tensor positions, Tensor q, Tensor k, Tensor v, Tensor cos_sin_cache, "
    "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, float k_scale, float v_scale) -> Tensor",
    _rope_and_write_kv_cache_ref,
    lambda positions, q, *args: torch.empty_like(q, memory_format=torch.contiguous_format),
)


def rope_and_write_kv_cache(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """Rotary embedding on q and k, and k, v scattered into the paged cache, in one step.

    The same as `q, k = rotary_embedding(positions, q, k, cos_sin_cache)` followed by
    `write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)`, with the rotated
    k never written anywhere but the cache (one kernel on CUDA, one read of q, k, v).

    positions: [T] int64; q: [T, Hq, D], k, v: [T, Hkv, D] (fp32/fp16/bf16; views with a
    contiguous last dim, e.g. slices of a fused qkv projection, are read in place);
    cos_sin_cache: [max_position, D] float32 from `rope_cos_sin_cache`; k_cache, v_cache:
    [num_blocks, Hkv, block_size, D] in k's dtype or float8_e4m3fn (stored = saturate(x /
    scale)), modified in place; slot_mapping: [T] int64, -1 skips a token (its q is still
    rotated). Returns the rotated q, a new contiguous [T, Hq, D] tensor in q's dtype.
    """
    check_rotary_args(positions, q, k, cos_sin_cache)
    check_kv_cache(k_cache, v_cache, k.shape[1], k.shape[2])
    if v.shape != k.shape or slot_mapping.shape != (k.shape[0],):
        raise ValueError(
            f"k, v must be [T, Hkv, D] alike and slot_mapping [T]: got {tuple(k.shape)}, "
            f"{tuple(v.shape)}, {tuple(slot_mapping.shape)}"
        )
    return _rope_and_write_kv_cache(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                    float(k_scale), float(v_scale))


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(
            f"k_cache and v_cache must both be [num_blocks, Hkv, block_size, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape[1] != num_kv_heads or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"cache has {k_cache.shape[1]} kv heads of dim {k_cache.shape[3]}, "
            f"inputs have {num_kv_heads} of dim {head_dim}"
        )
