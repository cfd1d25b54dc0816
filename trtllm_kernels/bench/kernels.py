"""Kernel benchmark cases: each of our public ops beside its best plain-PyTorch equivalent.

A `KernelCase` names one op at one shape: how to make its inputs on a device, our op, the
baseline, and the bytes / FLOPs the op must move / compute (for the roofline). Shapes:
- "full" (GPU): Llama-3.1-8B, bf16: hidden 4096, 32 query / 8 KV heads, head dim 128,
  intermediate 14336; decode batch 64 x context 4096 (pages of 16 and 64), 256 x 512,
  4 x 32768; prefill 4 x 4096 causal; token counts 64 / 256 (decode batches) and 16384
  (a 4 x 4096 prefill) for the row-wise ops; GEMMs at M = 1, 64, 4096.
- "tiny" (CPU, CI): a few rows of width 64, odd context lengths, so the harness's own logic
  runs in seconds.

Byte counts are the op's minimum traffic (each input read once, each output written once);
FLOPs are counted only for matmul-shaped work (GEMMs, attention's QK^T and PV), where the
matmul peak is the right ceiling. Element-wise ops count 0 FLOPs: they are memory-bound.

Before timing, each case runs ours and the baseline once on the same inputs and records the
largest difference, so a fast but wrong kernel shows in the notes.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

import trtllm_kernels as tk

from .report import Case, default_meta, write_results
from .roofline import measure_copy_bandwidth, measure_matmul_peak
from .timing import GraphCaptureError, l2_cache_bytes, num_rotations, tensor_bytes, time_fn

# Llama-3.1-8B
HIDDEN, N_HEADS, N_KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336
EPS = 1e-5


@dataclass
class KernelCase:
    name: str                                   # "<op>/<shape label>", what --filter matches
    op: str                                     # the trtllm_kernels:: op it times
    make_inputs: Callable[[torch.device, torch.dtype], dict]
    ours: Callable[[dict], Any]
    baseline: Callable[[dict], Any]
    baseline_name: str
    nbytes: int                                 # minimum bytes moved
    flops: int                                  # matmul-shaped FLOPs
    shape: dict = field(default_factory=dict)
    # (inputs) -> (ours output, baseline output) in one layout; default: call both as they are
    outputs: Callable[[dict], tuple] | None = None
    # the matmul ceiling is the measured (bf16) peak times this: 2 for FP8 tensor-core work
    matmul_peak_factor: float = 1.0
    # rtol = atol of the output check; None: by dtype (compare_outputs)
    tolerance: float | None = None


# ---------------------------------------------------------------------------------------------
# Inputs shared by the attention cases


def paged_from_contiguous(
    k: torch.Tensor, v: torch.Tensor, block_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous K, V [B, Hkv, S, D] -> paged k_cache, v_cache [num_blocks, Hkv, block_size, D]
    and block_tables int32 [B, ceil(S / block_size)], the blocks in a random order.

    A real cache's blocks are scattered (allocated as requests come and go); a kernel timed on
    blocks in order would get prefetch-friendly addresses it will not see in serving. Slots
    past S in a sequence's last block are NaN, so a kernel that reads past the end shows.
    """
    batch, heads, seq, dim = k.shape
    nblk = -(-seq // block_size)
    pad = nblk * block_size - seq

    def to_blocks(x):
        if pad:
            x = torch.cat([x, x.new_full((batch, heads, pad, dim), float("nan"))], dim=2)
        return x.view(batch, heads, nblk, block_size, dim).permute(0, 2, 1, 3, 4).reshape(
            batch * nblk, heads, block_size, dim
        )

    perm = torch.randperm(batch * nblk, generator=generator, device="cpu").to(k.device)
    kb, vb = to_blocks(k), to_blocks(v)
    k_cache, v_cache = torch.empty_like(kb), torch.empty_like(vb)
    k_cache[perm] = kb  # logical block i of the batch lives in physical block perm[i]
    v_cache[perm] = vb
    return k_cache, v_cache, perm.view(batch, nblk).to(torch.int32)


_SDPA_GQA: bool | None = None


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """torch SDPA with grouped KV heads: q [B, Hq, Sq, D], k, v [B, Hkv, S, D].

    Uses `enable_gqa` (torch >= 2.5), which reads each KV head once; repeats the KV heads
    where torch is older (that baseline then moves more bytes than it need).
    """
    global _SDPA_GQA
    if _SDPA_GQA is not False:
        try:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
            _SDPA_GQA = True
            return out
        except TypeError:
            _SDPA_GQA = False
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


# ---------------------------------------------------------------------------------------------
# Case builders, one per op family


def _es(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _torch_rms_norm(x, w, eps):
    if hasattr(F, "rms_norm"):  # torch >= 2.4, fused on recent CUDA builds
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def rms_norm_case(tokens: int, hidden: int, dtype: torch.dtype) -> KernelCase:
    def make(device, dt):
        return {"x": torch.randn(tokens, hidden, device=device, dtype=dt),
                "w": torch.rand(hidden, device=device, dtype=dt) + 0.5}

    return KernelCase(
        f"rms_norm/T{tokens}_H{hidden}", "rms_norm", make,
        lambda i: tk.rms_norm(i["x"], i["w"], EPS),
        lambda i: _torch_rms_norm(i["x"], i["w"], EPS),
        "F.rms_norm" if hasattr(F, "rms_norm") else "torch composite",
        (2 * tokens * hidden + hidden) * _es(dtype), 0, {"tokens": tokens, "hidden": hidden},
    )


def _residual_norm_inputs(tokens: int, hidden: int):
    """make() of the cases that add a residual and normalize: x, r [tokens, hidden], weight w."""
    def make(device, dt):
        return {"x": torch.randn(tokens, hidden, device=device, dtype=dt),
                "r": torch.randn(tokens, hidden, device=device, dtype=dt),
                "w": torch.rand(hidden, device=device, dtype=dt) + 0.5}
    return make


def fused_add_rms_norm_case(tokens: int, hidden: int, dtype: torch.dtype) -> KernelCase:
    make = _residual_norm_inputs(tokens, hidden)

    def base(i):
        s = i["x"] + i["r"]
        return _torch_rms_norm(s, i["w"], EPS), s

    return KernelCase(
        f"fused_add_rms_norm/T{tokens}_H{hidden}", "fused_add_rms_norm", make,
        lambda i: tk.fused_add_rms_norm(i["x"], i["r"], i["w"], EPS), base,
        "add + F.rms_norm" if hasattr(F, "rms_norm") else "add + torch composite",
        (4 * tokens * hidden + hidden) * _es(dtype), 0, {"tokens": tokens, "hidden": hidden},
    )


def silu_and_mul_case(tokens: int, inter: int, dtype: torch.dtype) -> KernelCase:
    def make(device, dt):
        return {"x": torch.randn(tokens, 2 * inter, device=device, dtype=dt)}

    return KernelCase(
        f"silu_and_mul/T{tokens}_I{inter}", "silu_and_mul", make,
        lambda i: tk.silu_and_mul(i["x"]),
        lambda i: F.silu(i["x"][:, :inter]) * i["x"][:, inter:],
        "F.silu(g) * u", 3 * tokens * inter * _es(dtype), 0,
        {"tokens": tokens, "intermediate": inter},
    )


def linear_case(label: str, m: int, n: int, k: int, dtype: torch.dtype) -> KernelCase:
    def make(device, dt):
        return {"x": torch.randn(m, k, device=device, dtype=dt),
                "w": torch.randn(n, k, device=device, dtype=dt) * k**-0.5}

    return KernelCase(
        f"linear/{label}_M{m}_N{n}_K{k}", "linear", make,
        lambda i: tk.linear(i["x"], i["w"]),
        lambda i: torch.matmul(i["x"], i["w"].t()),
        "torch.matmul", (m * k + n * k + m * n) * _es(dtype), 2 * m * n * k,
        {"M": m, "N": n, "K": k},
    )


def _hf_rotary(positions, q, k, cache):
    """Hugging Face Llama's apply_rotary_pos_emb, the plain-torch way models do it."""
    cos, sin = cache[positions].chunk(2, dim=-1)
    cos = torch.cat([cos, cos], dim=-1)[:, None, :].to(q.dtype)
    sin = torch.cat([sin, sin], dim=-1)[:, None, :].to(q.dtype)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotary_case(tokens: int, hq: int, hkv: int, dim: int, max_pos: int, dtype: torch.dtype) -> KernelCase:
    def make(device, dt):
        return {"pos": torch.randint(0, max_pos, (tokens,), device=device),
                "q": torch.randn(tokens, hq, dim, device=device, dtype=dt),
                "k": torch.randn(tokens, hkv, dim, device=device, dtype=dt),
                "cache": tk.rope_cos_sin_cache(dim, max_pos, 500000.0, device=device)}

    es = _es(dtype)
    return KernelCase(
        f"rotary_embedding/T{tokens}_H{hq}-{hkv}_D{dim}", "rotary_embedding", make,
        lambda i: tk.rotary_embedding(i["pos"], i["q"], i["k"], i["cache"]),
        lambda i: _hf_rotary(i["pos"], i["q"], i["k"], i["cache"]),
        "HF apply_rotary_pos_emb",
        2 * tokens * (hq + hkv) * dim * es + tokens * dim * 4 + tokens * 8, 0,
        {"tokens": tokens, "q_heads": hq, "kv_heads": hkv, "head_dim": dim},
    )


def write_kv_cache_case(tokens: int, hkv: int, dim: int, block_size: int, dtype: torch.dtype) -> KernelCase:
    num_blocks = 2 * (-(-tokens // block_size))  # half the cache free, slots scattered over it

    def make(device, dt):
        return {"k": torch.randn(tokens, hkv, dim, device=device, dtype=dt),
                "v": torch.randn(tokens, hkv, dim, device=device, dtype=dt),
                "kc": torch.zeros(num_blocks, hkv, block_size, dim, device=device, dtype=dt),
                "vc": torch.zeros(num_blocks, hkv, block_size, dim, device=device, dtype=dt),
                "slots": torch.randperm(num_blocks * block_size, device="cpu")[:tokens].to(device)}

    def base(i, kc=None, vc=None):
        kc = i["kc"] if kc is None else kc
        vc = i["vc"] if vc is None else vc
        blk, off = i["slots"] // block_size, i["slots"] % block_size
        kc[blk, :, off] = i["k"]
        vc[blk, :, off] = i["v"]

    def outputs(i):
        ours_k, ours_v = i["kc"].clone(), i["vc"].clone()
        tk.write_kv_cache(i["k"], i["v"], ours_k, ours_v, i["slots"])
        base_k, base_v = i["kc"].clone(), i["vc"].clone()
        base(i, base_k, base_v)
        return (ours_k, ours_v), (base_k, base_v)

    return KernelCase(
        f"write_kv_cache/T{tokens}_Hkv{hkv}_D{dim}_page{block_size}", "write_kv_cache", make,
        lambda i: tk.write_kv_cache(i["k"], i["v"], i["kc"], i["vc"], i["slots"]), base,
        "index_put (kc[blk, :, off] = k)", 4 * tokens * hkv * dim * _es(dtype) + tokens * 8, 0,
        {"tokens": tokens, "kv_heads": hkv, "head_dim": dim, "block_size": block_size},
        outputs=outputs,
    )


def rope_and_write_kv_cache_case(tokens: int, hq: int, hkv: int, dim: int, block_size: int, max_pos: int,
                                 dtype: torch.dtype, fp8: bool = False) -> KernelCase:
    """The fused RoPE + KV-cache write on q, k, v sliced from one qkv projection (as the model
    hands them over) against HF's rotary and two index_puts (FP8: quantize, then index_put)."""
    from ..kv_cache import _rope_and_write_kv_cache_ref, rope_and_write_kv_cache

    num_blocks = 2 * (-(-tokens // block_size))  # half the cache free, slots scattered over it
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    ks, vs = (0.02, 0.03) if fp8 else (1.0, 1.0)

    def make(device, dt):
        qkv = torch.randn(tokens, (hq + 2 * hkv) * dim, device=device, dtype=dt)
        q, k, v = qkv.split([hq * dim, hkv * dim, hkv * dim], dim=-1)
        return {"pos": torch.randint(0, max_pos, (tokens,), device=device),
                "q": q.view(tokens, hq, dim), "k": k.view(tokens, hkv, dim), "v": v.view(tokens, hkv, dim),
                "cs": tk.rope_cos_sin_cache(dim, max_pos, 500000.0, device=device),
                "kc": torch.zeros(num_blocks, hkv, block_size, dim, device=device, dtype=cache_dtype),
                "vc": torch.zeros(num_blocks, hkv, block_size, dim, device=device, dtype=cache_dtype),
                "slots": torch.randperm(num_blocks * block_size, device="cpu")[:tokens].to(device)}

    def ours(i, kc=None, vc=None):
        return rope_and_write_kv_cache(i["pos"], i["q"], i["k"], i["v"], i["cs"], i["kc"] if kc is None else kc,
                                       i["vc"] if vc is None else vc, i["slots"], ks, vs)

    def base(i, kc=None, vc=None):
        kc = i["kc"] if kc is None else kc
        vc = i["vc"] if vc is None else vc
        q, k = _hf_rotary(i["pos"], i["q"], i["k"], i["cs"])
        v = i["v"]
        if fp8:
            k = (k.float() / ks).clamp(-448.0, 448.0).to(cache_dtype)
            v = (v.float() / vs).clamp(-448.0, 448.0).to(cache_dtype)
        blk, off = i["slots"] // block_size, i["slots"] % block_size
        kc[blk, :, off] = k
        vc[blk, :, off] = v
        return q

    def outputs(i):
        ours_k, ours_v = i["kc"].clone(), i["vc"].clone()
        q = ours(i, ours_k, ours_v)
        ref_k, ref_v = i["kc"].clone(), i["vc"].clone()
        if fp8:  # one fp8 rounding step apart from HF's bf16 rotary: check against our reference
            ref_q = _rope_and_write_kv_cache_ref(i["pos"], i["q"], i["k"], i["v"], i["cs"], ref_k, ref_v,
                                                 i["slots"], ks, vs)
        else:
            ref_q = base(i, ref_k, ref_v)
        return (q, ours_k.float(), ours_v.float()), (ref_q, ref_k.float(), ref_v.float())

    es = _es(dtype)
    return KernelCase(
        f"rope_and_write_kv_cache/T{tokens}_H{hq}-{hkv}_D{dim}_page{block_size}" + ("_fp8" if fp8 else ""),
        "rope_and_write_kv_cache", make, ours, base,
        "HF apply_rotary_pos_emb + index_put" + (" (quantized)" if fp8 else ""),
        tokens * (2 * hq + 2 * hkv) * dim * es + 2 * tokens * hkv * dim * (1 if fp8 else es)
        + tokens * (dim * 4 + 16), 0,
        {"tokens": tokens, "q_heads": hq, "kv_heads": hkv, "head_dim": dim, "block_size": block_size,
         "cache": "fp8" if fp8 else "same"},
        outputs=outputs,
    )


def _attention_inputs(device, dt, batch, q_tokens, ctx, hq, hkv, dim, block_size) -> dict:
    k = torch.randn(batch, hkv, ctx, dim, device=device, dtype=dt)
    v = torch.randn(batch, hkv, ctx, dim, device=device, dtype=dt)
    k_cache, v_cache, block_tables = paged_from_contiguous(k, v, block_size)
    return {"q": torch.randn(batch * q_tokens, hq, dim, device=device, dtype=dt),
            "k": k, "v": v, "kc": k_cache, "vc": v_cache, "bt": block_tables,
            "sl": torch.full((batch,), ctx, dtype=torch.int32, device=device)}


def decode_case(batch: int, ctx: int, block_size: int, hq: int, hkv: int, dim: int, dtype: torch.dtype,
                fp8_kv: bool = False, csrc: bool = False) -> KernelCase:
    """fp8_kv: our kernel reads a float8_e4m3fn cache (scale 1) of the same K/V; the baseline is
    still SDPA on the bf16 K/V (the ratio is then the FP8 cache's speedup over it), and outputs
    are checked against SDPA on the dequantized K/V. csrc: time the CUDA C++ decode kernel
    (csrc/paged_decode.cu) directly instead of whatever the op dispatches to."""
    def make(device, dt):
        i = _attention_inputs(device, dt, batch, 1, ctx, hq, hkv, dim, block_size)
        if fp8_kv:
            i["kc"], i["vc"] = i["kc"].to(torch.float8_e4m3fn), i["vc"].to(torch.float8_e4m3fn)
        return i

    def ours(i):
        if csrc:
            from ..kernels import csrc as _csrc

            return _csrc.paged_decode_cuda(i["q"], i["kc"], i["vc"], i["bt"], i["sl"])
        return tk.paged_attention_decode(i["q"], i["kc"], i["vc"], i["bt"], i["sl"])

    def base(i):  # same K/V, contiguous [B, Hkv, S, D]; the [B, Hq, 1, D] output viewed back
        return sdpa_gqa(i["q"].view(batch, hq, 1, dim), i["k"], i["v"]).view(batch, hq, dim)

    def outputs(i):
        k, v = (x.to(torch.float8_e4m3fn).to(x.dtype) for x in (i["k"], i["v"]))
        return ours(i), sdpa_gqa(i["q"].view(batch, hq, 1, dim), k, v).view(batch, hq, dim)

    es, kv_es = _es(dtype), 1 if fp8_kv else _es(dtype)
    return KernelCase(
        f"paged_attention_decode/B{batch}_ctx{ctx}_page{block_size}_H{hq}-{hkv}_D{dim}" + ("_fp8kv" if fp8_kv else "")
        + ("_csrc" if csrc else ""),
        "paged_attention_decode", make, ours, base,
        "torch SDPA, contiguous KV" + (" (bf16 KV)" if fp8_kv else ""),
        2 * batch * ctx * hkv * dim * kv_es + 2 * batch * hq * dim * es + batch * (-(-ctx // block_size)) * 4,
        4 * batch * hq * ctx * dim,
        {"batch": batch, "context": ctx, "block_size": block_size, "q_heads": hq, "kv_heads": hkv, "head_dim": dim,
         "kv_dtype": "float8_e4m3fn" if fp8_kv else "same"},
        outputs=outputs if fp8_kv else None,
    )


def prefill_case(batch: int, seq: int, block_size: int, hq: int, hkv: int, dim: int, dtype: torch.dtype) -> KernelCase:
    def make(device, dt):
        i = _attention_inputs(device, dt, batch, seq, seq, hq, hkv, dim, block_size)
        i["qsl"] = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * seq
        return i

    def ours(i):
        return tk.paged_attention_prefill(i["q"], i["kc"], i["vc"], i["bt"], i["sl"], i["qsl"])

    def base(i):  # q [B*S, Hq, D] viewed as [B, Hq, S, D], as a model's q projection is
        return sdpa_gqa(i["q"].view(batch, seq, hq, dim).transpose(1, 2), i["k"], i["v"], is_causal=True)

    def outputs(i):
        return ours(i), base(i).transpose(1, 2).reshape(batch * seq, hq, dim)

    es = _es(dtype)
    return KernelCase(
        f"paged_attention_prefill/B{batch}_S{seq}_page{block_size}_H{hq}-{hkv}_D{dim}_causal",
        "paged_attention_prefill", make, ours, base, "torch SDPA causal, contiguous KV",
        2 * batch * seq * (hq + hkv) * dim * es,
        2 * batch * hq * seq * seq * dim,  # causal: half of 4 * B * H * S^2 * D
        {"batch": batch, "seq": seq, "block_size": block_size, "q_heads": hq, "kv_heads": hkv, "head_dim": dim},
        outputs=outputs,
    )


def chunked_prefill_case(batch: int, new: int, cached: int, block_size: int, hq: int, hkv: int, dim: int,
                         dtype: torch.dtype) -> KernelCase:
    """Chunked prefill: `new` queries per sequence over `cached` tokens already in the cache,
    causal. Baseline: SDPA on the same contiguous q [B, Hq, new, D] and K/V [B, Hkv, ctx, D]
    with the bottom-right causal mask (torch's causal_lower_right, i.e. flash's own causal
    for q_len != kv_len)."""
    from torch.nn.attention.bias import causal_lower_right

    ctx = cached + new

    def make(device, dt):
        i = _attention_inputs(device, dt, batch, new, ctx, hq, hkv, dim, block_size)
        i["qsl"] = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * new
        i["mask"] = causal_lower_right(new, ctx)
        return i

    def ours(i):
        return tk.paged_attention_prefill(i["q"], i["kc"], i["vc"], i["bt"], i["sl"], i["qsl"])

    def base(i):
        q = i["q"].view(batch, new, hq, dim).transpose(1, 2)
        try:
            return F.scaled_dot_product_attention(q, i["k"], i["v"], attn_mask=i["mask"], enable_gqa=True)
        except (TypeError, RuntimeError):  # no GQA with this mask here: repeat the KV heads
            k, v = (x.repeat_interleave(hq // hkv, dim=1) for x in (i["k"], i["v"]))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=i["mask"])

    def outputs(i):
        return ours(i), base(i).transpose(1, 2).reshape(batch * new, hq, dim)

    es = _es(dtype)
    return KernelCase(
        f"paged_attention_prefill/B{batch}_chunk{new}_over{cached}_page{block_size}_H{hq}-{hkv}_D{dim}",
        "paged_attention_prefill", make, ours, base, "torch SDPA, causal_lower_right mask, contiguous KV",
        2 * batch * new * hq * dim * es + 2 * batch * ctx * hkv * dim * es,
        4 * batch * hq * dim * (new * cached + new * (new + 1) // 2),
        {"batch": batch, "new_tokens": new, "cached_tokens": cached, "block_size": block_size,
         "q_heads": hq, "kv_heads": hkv, "head_dim": dim},
        outputs=outputs,
    )


# ---------------------------------------------------------------------------------------------
# FP8 (trtllm_kernels/fp8.py, issue 4): GEMM against torch._scaled_mm (cuBLASLt) at the same
# scales and against the bf16 torch.matmul; the fused MLP against the unfused sequence of the
# best torch ops; RMSNorm + residual + FP8 quant against the torch composite. GPU ("full") only.
# FP8 tensor cores peak at twice bf16's, so these cases' matmul ceiling is 2x the measured one.

_F8 = torch.float8_e4m3fn


def _fp8_weights(n, k, device, std=1.0):
    return tk.quantize_fp8_per_channel(torch.randn(n, k, device=device) * std)


def _fp8_acts(m, k, device, dt):
    return tk.quantize_fp8_per_token(torch.randn(m, k, device=device, dtype=dt))


def fp8_gemm_case(label: str, m: int, n: int, k: int, dtype: torch.dtype, baseline: str = "scaled_mm") -> KernelCase:
    """Per-token activations x per-channel weights, bf16 out. baseline "scaled_mm" (same fp8
    inputs and scales) or "bf16" (torch.matmul on bf16 inputs of the same shape)."""
    def make(device, dt):
        (a, sa), (b, sb) = _fp8_acts(m, k, device, dt), _fp8_weights(n, k, device, k ** -0.5)
        i = {"a": a, "sa": sa, "b": b, "sb": sb}
        if baseline == "bf16":
            i.update(x=torch.randn(m, k, device=device, dtype=dt), w=torch.randn(n, k, device=device, dtype=dt) * k ** -0.5)
        return i

    def ours(i):
        return tk.fp8_gemm(i["a"], i["b"], i["sa"], i["sb"], None, dtype)

    if baseline == "bf16":
        base, name = (lambda i: torch.matmul(i["x"], i["w"].t())), "torch.matmul (bf16)"
        outputs = lambda i: (ours(i), torch._scaled_mm(i["a"], i["b"].t(), scale_a=i["sa"], scale_b=i["sb"].t(),
                                                       out_dtype=dtype))
    else:
        base = lambda i: torch._scaled_mm(i["a"], i["b"].t(), scale_a=i["sa"], scale_b=i["sb"].t(), out_dtype=dtype)
        name, outputs = "torch._scaled_mm (per-token x per-channel)", None
    return KernelCase(
        f"fp8_gemm/{label}_M{m}_N{n}_K{k}" + ("_vs_bf16" if baseline == "bf16" else ""), "fp8_gemm", make, ours, base,
        name, m * k + n * k + m * n * _es(dtype) + 4 * (m + n), 2 * m * n * k,
        {"M": m, "N": n, "K": k, "scales": "token x channel"}, outputs=outputs, matmul_peak_factor=2.0,
    )


def fused_mlp_fp8_case(m: int, h: int, inter: int, dtype: torch.dtype) -> KernelCase:
    def make(device, dt):
        (x, xs), (wgu, sgu) = _fp8_acts(m, h, device, dt), _fp8_weights(2 * inter, h, device, h ** -0.5)
        wd, sd = _fp8_weights(h, inter, device, inter ** -0.5)
        return {"x": x, "xs": xs, "wgu": wgu, "sgu": sgu, "wd": wd, "sd": sd}

    def ours(i):
        return tk.fused_mlp_fp8(i["x"], i["xs"], i["wgu"], i["sgu"], i["wd"], i["sd"], True, dtype)

    def base(i):  # _scaled_mm, silu * up, per-token quant, _scaled_mm
        gu = torch._scaled_mm(i["x"], i["wgu"].t(), scale_a=i["xs"], scale_b=i["sgu"].t(), out_dtype=dtype)
        hh = F.silu(gu[:, :inter]) * gu[:, inter:]
        hs = hh.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / 448.0
        hq = (hh / hs).clamp(-448.0, 448.0).to(_F8)
        return torch._scaled_mm(hq, i["wd"].t(), scale_a=hs, scale_b=i["sd"].t(), out_dtype=dtype)

    def outputs(i):  # ours quantizes h per 1 x 128 group, the baseline per token: check ours
        from ..fp8 import _fused_mlp_fp8_ref  # against its own math

        return ours(i), _fused_mlp_fp8_ref(i["x"], i["xs"], i["wgu"], i["sgu"], i["wd"], i["sd"], True, dtype)

    return KernelCase(
        f"fused_mlp_fp8/M{m}_H{h}_I{inter}", "fused_mlp_fp8", make, ours, base,
        "unfused: _scaled_mm, silu*mul, quant, _scaled_mm",
        m * h + 3 * h * inter + m * h * _es(dtype), 6 * m * h * inter,
        {"M": m, "hidden": h, "intermediate": inter}, outputs=outputs, matmul_peak_factor=2.0,
        # h is quantized to e4m3 inside: where the kernel's and the reference's fp32 sums of an
        # element differ in the last bits across a rounding boundary, that element moves one
        # e4m3 step, and such moves add up over the down projection (max 0.047 seen at M =
        # 4096 on H100 and H200, outputs of order 1; a wrong kernel is off by order 1)
        tolerance=0.0625,
    )


def rms_norm_quant_fp8_case(tokens: int, hidden: int, dtype: torch.dtype) -> KernelCase:
    make = _residual_norm_inputs(tokens, hidden)

    def base(i):
        s = i["x"] + i["r"]
        y = _torch_rms_norm(s, i["w"], EPS)
        scale = y.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / 448.0
        return (y / scale).clamp(-448.0, 448.0).to(_F8), scale, s

    def outputs(i):  # ours keeps y in fp32, the composite rounds it to bf16 first: check ours
        from ..fp8 import _rms_norm_quant_fp8_ref  # against its own math, dequantized

        q, sc, s = tk.rms_norm_quant_fp8(i["x"], i["w"], EPS, residual=i["r"])
        rq, rsc, rs = _rms_norm_quant_fp8_ref(i["x"], i["r"], i["w"], EPS)
        return (q.float() * sc, s), (rq.float() * rsc, rs)

    es = _es(dtype)
    return KernelCase(
        f"rms_norm_quant_fp8/T{tokens}_H{hidden}", "rms_norm_quant_fp8", make,
        lambda i: tk.rms_norm_quant_fp8(i["x"], i["w"], EPS, residual=i["r"]), base,
        "add + F.rms_norm + amax + quant", tokens * hidden * (3 * es + 1) + tokens * 4 + hidden * es, 0,
        {"tokens": tokens, "hidden": hidden}, outputs=outputs,
        # ours and the reference round the same fp32 math in another order: a value on an
        # e4m3 rounding boundary may land one step (2^-3 relative) apart
        tolerance=0.125,
    )


def fused_mlp_case(m: int, h: int, inter: int, dtype: torch.dtype) -> KernelCase:
    """The bf16 fused MLP (trtllm_kernels/mlp.py) against the unfused torch sequence:
    torch.matmul (cuBLAS) gate_up, F.silu(g) * u, torch.matmul down."""
    def make(device, dt):
        return {"x": torch.randn(m, h, device=device, dtype=dt),
                "wgu": torch.randn(2 * inter, h, device=device, dtype=dt) * h ** -0.5,
                "wd": torch.randn(h, inter, device=device, dtype=dt) * inter ** -0.5}

    def base(i):
        gu = torch.matmul(i["x"], i["wgu"].t())
        return torch.matmul(F.silu(gu[:, :inter]) * gu[:, inter:], i["wd"].t())

    es = _es(dtype)
    return KernelCase(
        f"fused_mlp/M{m}_H{h}_I{inter}", "fused_mlp", make, lambda i: tk.fused_mlp(i["x"], i["wgu"], i["wd"]), base,
        "unfused: matmul, silu*mul, matmul", (m * h + 3 * h * inter + m * h) * es, 6 * m * h * inter,
        {"M": m, "hidden": h, "intermediate": inter},
    )


def mlp_cases(dtype: torch.dtype) -> list[KernelCase]:
    return [fused_mlp_case(m, HIDDEN, INTERMEDIATE, dtype) for m in (1, 16, 256, 4096)]


def fp8_cases(dtype: torch.dtype) -> list[KernelCase]:
    h, inter = HIDDEN, INTERMEDIATE
    shapes = [("qkv", (N_HEADS + 2 * N_KV_HEADS) * HEAD_DIM, h), ("o", h, N_HEADS * HEAD_DIM),
              ("gate_up", 2 * inter, h), ("down", h, inter)]
    cases = []
    for label, n, k in shapes:
        ms = (1, 16, 64, 128, 4096) if label in ("gate_up", "down") else (1, 16, 128, 4096)
        cases += [fp8_gemm_case(label, m, n, k, dtype) for m in ms]
    cases.append(fp8_gemm_case("square", 8192, 8192, 8192, dtype))
    for label, n, k in shapes:
        cases += [fp8_gemm_case(label, m, n, k, dtype, "bf16") for m in ((1, 4096) if label in ("gate_up", "down") else (4096,))]
    cases.append(fp8_gemm_case("square", 8192, 8192, 8192, dtype, "bf16"))
    cases += [fused_mlp_fp8_case(m, h, inter, dtype) for m in (1, 16, 256, 4096)]
    cases += [rms_norm_quant_fp8_case(t, h, dtype) for t in (64, 16384)]
    return cases


# ---------------------------------------------------------------------------------------------
# FP4 weight-only GEMM (trtllm_kernels/fp4.py, issue 5): ours (packed e2m1 weights, W4A16; fmt
# "mxfp4_w4a8": MXFP4 weights against fp8 activations, fp4_gemm_w4a8) beside bf16 torch.matmul on a
# bf16 weight of the same shape, and beside int4 tinygemm (torch._weight_int4pack_mm, group size
# 128, its own packed weight of the same shape).


def fp4_gemm_case(label: str, m: int, n: int, k: int, dtype: torch.dtype, fmt: str = "nvfp4",
                  baseline: str = "bf16") -> KernelCase:
    w4a8 = fmt == "mxfp4_w4a8"

    def make(device, dt):
        w = torch.randn(n, k, device=device) * k ** -0.5
        p, s, g = tk.quantize_fp4(w, "mxfp4" if w4a8 else fmt)
        i = {"x": torch.randn(m, k, device=device, dtype=dt), "p": p, "s": s, "g": g}
        if baseline == "bf16":
            i["w"] = w.to(dt)
        else:  # tinygemm: uint8 [N, K/2] (two 4-bit values a byte), scales and zeros [K/128, N, 2]
            q = torch.randint(0, 16, (n, k), device=device, dtype=torch.int32)
            packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
            i["wq"] = torch._convert_weight_to_int4pack(packed, 8)
            sz = torch.empty(k // 128, n, 2, device=device, dtype=dt)
            sz[..., 0] = 0.01
            sz[..., 1] = 0.0
            i["sz"] = sz
        return i

    def ours(i):
        if w4a8:
            return tk.fp4_gemm_w4a8(i["x"], i["p"], i["s"])
        return tk.fp4_gemm(i["x"], i["p"], i["s"], i["g"])

    def outputs(i):  # against the fp32 GEMM of what ours multiplies
        from ..fp4 import _fp4_gemm_w4a8_ref, dequantize_fp4

        if w4a8:
            return ours(i), _fp4_gemm_w4a8_ref(i["x"].float(), i["p"], i["s"]).to(dtype)
        return ours(i), (i["x"].float() @ dequantize_fp4(i["p"], i["s"], i["g"]).t()).to(dtype)

    if baseline == "bf16":
        base, name = (lambda i: torch.matmul(i["x"], i["w"].t())), "torch.matmul (bf16)"
    else:
        base, name = (lambda i: torch._weight_int4pack_mm(i["x"], i["wq"], 128, i["sz"])), \
            "torch._weight_int4pack_mm (tinygemm int4, g128)"
    group = 16 if fmt == "nvfp4" else 32
    nbytes = n * k // 2 + n * (k // group) + m * k * _es(dtype) + m * n * _es(dtype)
    return KernelCase(
        f"fp4_gemm/{fmt}_{label}_M{m}_N{n}_K{k}_vs_{baseline}", "fp4_gemm", make, ours, base, name,
        nbytes, 2 * m * n * k, {"M": m, "N": n, "K": k, "format": fmt}, outputs=outputs,
    )


def fp4_cases(dtype: torch.dtype) -> list[KernelCase]:
    shapes = [("gate_up", 2 * INTERMEDIATE, HIDDEN), ("down", HIDDEN, INTERMEDIATE)]
    cases = []
    for label, n, k in shapes:
        for m in (1, 16, 64, 128, 4096):
            cases.append(fp4_gemm_case(label, m, n, k, dtype, "nvfp4", "bf16"))
            cases.append(fp4_gemm_case(label, m, n, k, dtype, "nvfp4", "tinygemm"))
            cases.append(fp4_gemm_case(label, m, n, k, dtype, "mxfp4", "bf16"))
            cases.append(fp4_gemm_case(label, m, n, k, dtype, "mxfp4_w4a8", "bf16"))
    return cases


def build_cases(sizes: str, dtype: torch.dtype) -> list[KernelCase]:
    """Every case at "full" (GPU, Llama-3.1-8B) or "tiny" (CPU) sizes."""
    if sizes == "full":
        h, hq, hkv, d, inter = HIDDEN, N_HEADS, N_KV_HEADS, HEAD_DIM, INTERMEDIATE
        row_tokens = (64, 256, 16384)
        gemms = [("qkv", (hq + 2 * hkv) * d, h), ("o", h, hq * d), ("gate_up", 2 * inter, h), ("down", h, inter)]
        gemm_ms = (1, 64, 4096)
        decode = [(64, 4096, 16), (64, 4096, 64), (256, 512, 16), (4, 32768, 16)]
        prefill = [(4, 4096, 16), (4, 4096, 64)]  # pages of 64: K/V tiles through TMA
        chunked = [(4, 512, 3584, 16)]
        kv_tokens, max_pos = (64, 16384), 32768
    elif sizes == "tiny":
        h, hq, hkv, d, inter = 64, 4, 2, 32, 96
        row_tokens = (8,)
        gemms = [("gate_up", 2 * inter, h)]
        gemm_ms = (4,)
        decode = [(2, 40, 16), (3, 17, 8)]  # odd lengths: the last page is partly NaN padding
        prefill = [(2, 24, 16)]
        chunked = [(2, 5, 19, 8)]  # 5 new tokens over 19 cached
        kv_tokens, max_pos = (8,), 64
    else:
        raise ValueError(f"sizes must be 'full' or 'tiny', got {sizes!r}")
    cases: list[KernelCase] = []
    cases += [rms_norm_case(t, h, dtype) for t in row_tokens]
    cases += [fused_add_rms_norm_case(t, h, dtype) for t in row_tokens]
    cases += [silu_and_mul_case(t, inter, dtype) for t in row_tokens]
    cases += [linear_case(label, m, n, k, dtype) for label, n, k in gemms for m in gemm_ms]
    cases += [rotary_case(t, hq, hkv, d, max_pos, dtype) for t in kv_tokens]
    cases += [write_kv_cache_case(t, hkv, d, 16, dtype) for t in kv_tokens]
    if sizes == "full":  # GPU only (the fused op's reference composes the two above)
        cases += [rope_and_write_kv_cache_case(t, hq, hkv, d, 16, max_pos, dtype) for t in kv_tokens]
        cases.append(rope_and_write_kv_cache_case(kv_tokens[0], hq, hkv, d, 16, max_pos, dtype, fp8=True))
    cases += [decode_case(b, s, bs, hq, hkv, d, dtype) for b, s, bs in decode]
    if sizes == "full":  # FP8 KV cache (target at B64 x 4096: <= 0.6x the bf16 time)
        cases += [decode_case(b, s, bs, hq, hkv, d, dtype, fp8_kv=True) for b, s, bs in decode]
        # the CUDA C++ decode kernel on bf16 pages, where the op runs Triton's
        cases += [decode_case(b, s, bs, hq, hkv, d, dtype, csrc=True) for b, s, bs in decode]
    cases += [prefill_case(b, s, bs, hq, hkv, d, dtype) for b, s, bs in prefill]
    cases += [chunked_prefill_case(b, n, c, bs, hq, hkv, d, dtype) for b, n, c, bs in chunked]
    if sizes == "full":
        cases += fp8_cases(dtype)
        cases += mlp_cases(dtype)
        cases += fp4_cases(dtype)
    return cases


def select_cases(pattern: str | None, sizes: str, dtype: torch.dtype) -> list[KernelCase]:
    """Cases whose name matches `pattern` (re.search; None or "" selects all)."""
    cases = build_cases(sizes, dtype)
    if not pattern:
        return cases
    rx = re.compile(pattern)
    return [c for c in cases if rx.search(c.name)]


# ---------------------------------------------------------------------------------------------
# Running


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flatten(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _flatten(y)]
    return []


def compare_outputs(ours, base, dtype: torch.dtype, tol: float | None = None) -> tuple[float, bool]:
    """(max |ours - baseline|, whether all elements agree within tol, by default a dtype's
    tolerance).

    NaN agrees only with NaN (the NaN padding of a last page must never leak out).
    """
    if tol is None:
        tol = 1e-4 if dtype == torch.float32 else 3e-2
    a_list, b_list = _flatten(ours), _flatten(base)
    if len(a_list) != len(b_list):
        return float("inf"), False
    err, ok = 0.0, True
    for a, b in zip(a_list, b_list):
        if a.shape != b.shape:
            return float("inf"), False
        a, b = a.float(), b.float()
        ok &= bool(torch.isclose(a, b, rtol=tol, atol=tol, equal_nan=True).all())
        finite = torch.isfinite(a) & torch.isfinite(b)
        if finite.any():
            err = max(err, float((a - b)[finite].abs().max()))
    return err, ok


def _time_pair(case, sets, timing, graph, device) -> tuple[dict, dict, str]:
    """Time ours and the baseline under the same mode; returns (ours, baseline, note)."""
    ours_fn, base_fn = (lambda i: case.ours(i)), (lambda i: case.baseline(i))
    timing = dict(timing, device=device)
    if graph and device.type == "cuda":
        try:
            return time_fn(ours_fn, sets, graph=True, **timing), time_fn(base_fn, sets, graph=True, **timing), ""
        except GraphCaptureError as e:
            note = f"graph capture failed ({str(e)[:80]}), both timed eagerly"
    else:
        note = ""
    return time_fn(ours_fn, sets, **timing), time_fn(base_fn, sets, **timing), note


def run_kernel_benchmarks(
    filter: str | None = None, device: str | torch.device | None = None, out_dir: str | None = None,
    stem: str = "kernels", quick: bool = False, *, graph: bool = False, sizes: str = "auto",
    dtype: torch.dtype | None = None, command: str | None = None, plot: bool = True,
    verbose: bool = True,
) -> list[Case]:
    """Measure the device's copy bandwidth and matmul peak, then time every case matching
    `filter` (a regex, searched in case names) against its baseline; print a table, and if
    out_dir is given write <out_dir>/<stem>.json, .md and (with matplotlib) .png.

    device: default cuda if available. sizes: "full", "tiny" or "auto" (full on CUDA, tiny
    elsewhere). dtype: default bf16 on CUDA, fp32 on CPU. quick: fewer calls per timing and
    smaller ceiling measurements (a smoke run, not numbers to commit). graph: time under CUDA
    graphs (both sides fall back to eager where either cannot be captured).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if sizes == "auto":
        sizes = "full" if device.type == "cuda" else "tiny"
    cases = select_cases(filter, sizes, dtype)
    if not cases:
        names = ", ".join(c.name for c in build_cases(sizes, dtype))
        raise ValueError(f"no {sizes} kernel benchmark matches {filter!r}; cases: {names}")

    log = (lambda *a: print(*a, flush=True)) if verbose else (lambda *a: None)
    dev_name = device_name(device)
    cuda = device.type == "cuda"
    timing = (dict(warmup=3, iters=30, budget_s=0.5) if quick else dict(warmup=10, iters=200, budget_s=3.0))
    # Ceilings first, in this process: a kernel is judged against what this device does today.
    # (Always eager: a 1 GiB copy hides its launch, and a copy captured in a CUDA graph
    # becomes a memcpy node served by the copy engines, ~20% slower than the copy kernel.)
    bandwidth = measure_copy_bandwidth(device, (256 << 20) if (quick and cuda) else None)
    peak_dtype = dtype if cuda else torch.float32
    peak = measure_matmul_peak(device, peak_dtype, 4096 if (quick and cuda) else None)
    log(f"{dev_name}: copy {bandwidth / 1e9:.0f} GB/s, matmul ({peak_dtype}) {peak / 1e12:.1f} TFLOP/s; "
        f"{len(cases)} case(s), {sizes} sizes, {dtype}")
    l2 = l2_cache_bytes(device)
    max_total = (8 << 30) if cuda else (256 << 20)
    header = f"{'case':<64} {'ours us':>10} {'base us':>10} {'speedup':>8} {'roofline':>8}"
    log(header)

    results: list[Case] = []
    errors: list[str] = []
    for case in cases:
        torch.manual_seed(0)
        sets = first = None
        try:
            first = case.make_inputs(device, dtype)
            n = num_rotations(tensor_bytes(first), l2, max_total_bytes=max_total)
            sets = [(first,)] + [(case.make_inputs(device, dtype),) for _ in range(n - 1)]
            # Same inputs through both, once: a fast kernel that is wrong must not look good.
            a, b = case.outputs(first) if case.outputs else (case.ours(first), case.baseline(first))
            _sync(device)
            err, ok = compare_outputs(a, b, dtype, case.tolerance)
            del a, b
            t_ours, t_base, note = _time_pair(case, sets, timing, graph, device)
        except Exception as e:  # one failing case (OOM, a kernel error) must not sink the run
            errors.append(f"{case.name}: {type(e).__name__}: {e}")
            log(f"{case.name:<64} FAILED {type(e).__name__}: {str(e)[:200]}")
            continue
        finally:
            sets = first = None  # free this case's inputs before the next is made
            if cuda:
                torch.cuda.empty_cache()
        notes = [note] if note else []
        if not ok:
            notes.append(f"MISMATCH vs baseline (max abs err {err:.3g})")
        if cuda:
            from .._library import cuda_kernel

            if cuda_kernel(case.op) is None:
                notes.append("ours runs the PyTorch reference (no CUDA kernel registered)")
        c = Case.from_times(
            case.name, t_ours["median_us"], case.baseline_name, t_base["median_us"], dev_name,
            nbytes=case.nbytes, flops=case.flops, bandwidth=bandwidth, peak=peak * case.matmul_peak_factor,
            shape=dict(case.shape, dtype=str(dtype).replace("torch.", "")),
            timing={"ours": t_ours, "baseline": t_base},
            max_abs_err_vs_baseline=err if math.isfinite(err) else None,
            notes="; ".join(notes),
        )
        if c.fraction_of_roofline is not None and c.fraction_of_roofline > 1.1:
            # Faster than the device's measured ceilings: a timing or byte-count bug, not a win.
            c.notes = "; ".join(notes + ["ABOVE THE ROOFLINE: check timing and byte count"])
        results.append(c)
        frac = "-" if c.fraction_of_roofline is None else f"{c.fraction_of_roofline:.2f}"
        log(f"{c.name:<64} {c.ours_us:>10.2f} {c.baseline_us:>10.2f} {c.ratio_vs_baseline:>7.2f}x {frac:>8}"
            + (f"  {c.notes}" if c.notes else ""))

    if out_dir is not None and results:
        meta = default_meta(
            dev_name, command or " ".join(sys.argv),
            copy_bandwidth_GBps=bandwidth / 1e9, matmul_peak_TFLOPs=peak / 1e12,
            matmul_peak_dtype=str(peak_dtype).replace("torch.", ""), dtype=str(dtype).replace("torch.", ""),
            sizes=sizes, quick=quick, timing_mode=("cuda-graph" if graph else "cuda-events") if cuda else "cpu",
            l2_bytes=l2, errors=errors,
        )
        json_path, md_path = write_results(results, out_dir, stem, meta)
        log(f"wrote {json_path} and {md_path}")
        if plot:
            from .report import plot_results

            try:
                log(f"wrote {plot_results(json_path)}")
            except ImportError as e:
                log(f"no plot: {e}")
    if errors:
        log(f"{len(errors)} case(s) failed:\n  " + "\n  ".join(errors))
    return results
