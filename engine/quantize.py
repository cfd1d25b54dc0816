"""Quantized engines: FP8 (`BuildConfig(quantization="fp8")`) and, at the end of this file,
FP4 weight-only (`quantization="nvfp4"` / `"mxfp4"`).

FP8 engines.

At build time every linear weight of the decoder layers (qkv, o, gate_up, down) is quantized
to float8_e4m3fn with one fp32 scale per output channel (`<name>_scale`, [N, 1]); embeddings,
norms and the LM head stay in the build dtype. At run time activations are quantized
dynamically, per token:
- the two RMSNorms of each layer are fused with the residual add and the quantization of
  their output (`rms_norm_quant_fp8`), so qkv and the MLP read fp8 directly;
- attention's output is quantized per token before the o projection; in small decode steps
  the attention kernel does it in its epilogue (`paged_attention_decode_quant_fp8`), so no
  pass of its own runs between attention and o;
- the MLP is one op (`fused_mlp_fp8`): gate_up GEMM with SiLU-and-mul and a re-quantization
  to fp8 (one scale per 1 x 128 group of each token) in its epilogue, then the down GEMM.
Every GEMM accumulates in fp32 and writes the activation dtype.
"""
from __future__ import annotations

import torch

import trtllm_kernels as tk

from .config import ModelConfig
from .model import LlamaModel

LINEAR_WEIGHTS = ("qkv", "o", "gate_up", "down")
SCALE_SUFFIX = "_scale"
FP8 = torch.float8_e4m3fn
# Decode steps of up to this many tokens take attention's quantizing epilogue for o's input
# (batch-1 FP8 TPOT on an H200: 3.094 -> 3.080 ms with it, benchmarks/results/
# h200-2026-11-28-fused-tails); larger ones keep the pass of its own until the fused tail is
# measured there.
FUSED_O_QUANT_MAX_TOKENS = 16


def scale_names(config: ModelConfig) -> list[str]:
    """The extra tensors of an FP8 engine: one scale per quantized linear weight."""
    return [f"layers.{i}.{w}{SCALE_SUFFIX}" for i in range(config.num_hidden_layers) for w in LINEAR_WEIGHTS]


def quantize_weights(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our fused weights -> the same with fp8 linear weights and their per-channel scales."""
    out = dict(weights)
    for i in range(config.num_hidden_layers):
        for w in LINEAR_WEIGHTS:
            name = f"layers.{i}.{w}"
            q, scale = tk.quantize_fp8_per_channel(weights[name])
            out[name], out[name + SCALE_SUFFIX] = q.contiguous(), scale.contiguous()
    return out


def load_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a stored tensor is loaded in: fp8 weights and their fp32 scales as stored,
    everything else in the engine's activation dtype."""
    if tensor.dtype == FP8 or name.endswith(SCALE_SUFFIX):
        return tensor.dtype
    return dtype


class Fp8LlamaModel(LlamaModel):
    """LlamaModel with FP8 linear layers (see the module docstring); same forward contract."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__(config, weights)
        for i, layer in enumerate(self.layers):
            for w in LINEAR_WEIGHTS:
                name = f"layers.{i}.{w}"
                if weights[name].dtype != FP8 or name + SCALE_SUFFIX not in weights:
                    raise ValueError(f"FP8 engine: {name} is {weights[name].dtype} or has no scale")
                layer[w + SCALE_SUFFIX] = weights[name + SCALE_SUFFIX]

    def forward(self, input_ids, positions, meta, kv_caches, kv_scales=(1.0, 1.0)):
        eps = self.config.rms_norm_eps
        hidden = self.embed(input_ids)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            if residual is None:
                xq, xs, _ = tk.rms_norm_quant_fp8(hidden, layer["attn_norm"], eps)
                residual = hidden
            else:
                xq, xs, residual = tk.rms_norm_quant_fp8(hidden, layer["attn_norm"], eps, residual)
            hidden = self._attention_fp8(layer, xq, xs, positions, meta, k_cache, v_cache, kv_scales)
            xq, xs, residual = tk.rms_norm_quant_fp8(hidden, layer["mlp_norm"], eps, residual)
            hidden = self.reduce(tk.fused_mlp_fp8(xq, xs, layer["gate_up"], layer["gate_up_scale"], layer["down"],
                                                  layer["down_scale"], True, self.dtype))
        normed, _ = tk.fused_add_rms_norm(hidden, residual, self.weights["norm"], eps)
        return normed

    def _attention_fp8(self, layer, xq, xs, positions, meta, k_cache, v_cache, kv_scales):
        qkv = tk.fp8_gemm(xq, layer["qkv"], xs, layer["qkv_scale"], None, self.dtype)
        if meta.num_decodes == qkv.shape[0] <= FUSED_O_QUANT_MAX_TOKENS and layer["o_scale"].shape[-1] == 1:
            # a small decode step: attention hands o its input quantized per token
            q = self._rope_and_cache(qkv, positions, meta, k_cache, v_cache, kv_scales)
            hq, hs = tk.paged_attention_decode_quant_fp8(q, k_cache, v_cache, *meta.decode_part(), self.scale,
                                                         *kv_scales)
            return self.reduce(tk.fp8_gemm(hq, layer["o"], hs, layer["o_scale"], None, self.dtype))
        out = self._attend(qkv, positions, meta, k_cache, v_cache, kv_scales)
        return self.reduce(tk.fp8_linear(out, layer["o"], layer["o_scale"]))


# ---------------------------------------------------------------------------------------------
# FP4 engines: `BuildConfig(quantization="nvfp4" | "mxfp4" | "mxfp4_w4a8")`.
#
# Every linear weight of the decoder layers (qkv, o, gate_up, down) is stored packed, two e2m1
# codes a byte (uint8 [N, K/2], the layout of trtllm_kernels/fp4.py), with `<name>_scale`
# (NVFP4: float8_e4m3fn [N, K/16]; MXFP4: uint8 e8m0 [N, K/32]) and, for NVFP4,
# `<name>_global_scale` (fp32 [1]). Embeddings, norms and the LM head stay in the build dtype.
# Weight-only: activations stay in the activation dtype and every projection is one
# `fp4_linear` (W4A16, dequantized in registers); the MLP is gate_up GEMM, SiLU-and-mul, down GEMM.
# "mxfp4_w4a8" stores the same MXFP4 weights and runs every projection as `fp4_linear_w4a8`
# instead: its input quantized per token to fp8, the weights converted to e4m3 (W4A8).

FP4_FORMATS = ("nvfp4", "mxfp4", "mxfp4_w4a8")
GLOBAL_SUFFIX = "_global_scale"


def fp4_weight_format(quantization: str) -> str:
    """The FP4 weight format ("nvfp4" or "mxfp4") an FP4 engine stores."""
    return "mxfp4" if quantization == "mxfp4_w4a8" else quantization


def fp4_scale_names(config: ModelConfig, fmt: str) -> list[str]:
    """The extra tensors of an FP4 engine: scales (and NVFP4 global scales) per linear weight."""
    suffixes = (SCALE_SUFFIX, GLOBAL_SUFFIX) if fmt == "nvfp4" else (SCALE_SUFFIX,)
    return [f"layers.{i}.{w}{s}" for i in range(config.num_hidden_layers) for w in LINEAR_WEIGHTS for s in suffixes]


def extra_names(config: ModelConfig, quantization: str | None) -> list[str]:
    """Every tensor an engine of this quantization stores beyond `weight_names`."""
    if quantization == "fp8":
        return scale_names(config)
    if quantization in FP4_FORMATS:
        return fp4_scale_names(config, quantization)
    return []


def quantize_weights_fp4(config: ModelConfig, weights: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Our fused weights -> the same with packed FP4 linear weights and their scales."""
    if fmt not in FP4_FORMATS:
        raise ValueError(f"FP4 format must be one of {FP4_FORMATS}, got {fmt!r}")
    out = dict(weights)
    for i in range(config.num_hidden_layers):
        for w in LINEAR_WEIGHTS:
            name = f"layers.{i}.{w}"
            packed, scale, global_scale = tk.quantize_fp4(weights[name], fp4_weight_format(fmt))
            out[name], out[name + SCALE_SUFFIX] = packed.contiguous(), scale.contiguous()
            if global_scale is not None:
                out[name + GLOBAL_SUFFIX] = global_scale.contiguous()
    return out


def load_dtype_any(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """`load_dtype` for every engine kind: quantized weights (fp8, packed uint8) and all scales
    as stored, everything else in the activation dtype."""
    if tensor.dtype in (FP8, torch.uint8) or name.endswith(SCALE_SUFFIX):
        return tensor.dtype
    return dtype


class Fp4LlamaModel(LlamaModel):
    """LlamaModel with FP4 weight-only linear layers (NVFP4 or MXFP4, from the stored scales'
    dtype); same forward contract."""

    W4A8 = False  # W4A16; Fp4W4A8LlamaModel: fp8 activations

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__(config, weights)
        for i, layer in enumerate(self.layers):
            for w in LINEAR_WEIGHTS:
                name = f"layers.{i}.{w}"
                if weights[name].dtype != torch.uint8 or name + SCALE_SUFFIX not in weights:
                    raise ValueError(f"FP4 engine: {name} is {weights[name].dtype} or has no scale")
                layer[w + SCALE_SUFFIX] = weights[name + SCALE_SUFFIX]
                layer[w + GLOBAL_SUFFIX] = weights.get(name + GLOBAL_SUFFIX)

    def _linear(self, layer, w, x):
        if self.W4A8:
            return tk.fp4_linear_w4a8(x, layer[w], layer[w + SCALE_SUFFIX])
        return tk.fp4_linear(x, layer[w], layer[w + SCALE_SUFFIX], layer[w + GLOBAL_SUFFIX])

    def _mlp(self, layer, x):
        return self._linear(layer, "down", tk.silu_and_mul(self._linear(layer, "gate_up", x)))

    def _attention(self, layer, x, positions, meta, k_cache, v_cache, kv_scales):
        qkv = self._linear(layer, "qkv", x)
        out = self._attend(qkv, positions, meta, k_cache, v_cache, kv_scales)
        return self.reduce(self._linear(layer, "o", out))


class Fp4W4A8LlamaModel(Fp4LlamaModel):
    """Fp4LlamaModel on MXFP4 weights with its projections in W4A8 (`quantization="mxfp4_w4a8"`)."""

    W4A8 = True
