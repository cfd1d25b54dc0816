"""FP8 engines: `BuildConfig(quantization="fp8")`.

At build time every linear weight of the decoder layers (qkv, o, gate_up, down) is quantized
to float8_e4m3fn with one fp32 scale per output channel (`<name>_scale`, [N, 1]); embeddings,
norms and the LM head stay in the build dtype. At run time activations are quantized
dynamically, per token:
- the two RMSNorms of each layer are fused with the residual add and the quantization of
  their output (`rms_norm_quant_fp8`), so qkv and the MLP read fp8 directly;
- attention's output is quantized per token before the o projection (`fp8_linear`);
- the MLP is one op (`fused_mlp_fp8`): gate_up GEMM with SiLU-and-mul and a re-quantization
  to fp8 (one scale per 1 x 128 group of each token) in its epilogue, then the down GEMM.
Every GEMM accumulates in fp32 and writes the activation dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import trtllm_kernels as tk

from .config import ModelConfig
from .model import LlamaModel

LINEAR_WEIGHTS = ("qkv", "o", "gate_up", "down")
SCALE_SUFFIX = "_scale"
FP8 = torch.float8_e4m3fn


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
        hidden = F.embedding(input_ids, self.weights["embed"])
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            if residual is None:
                xq, xs, _ = tk.rms_norm_quant_fp8(hidden, layer["attn_norm"], eps)
                residual = hidden
            else:
                xq, xs, residual = tk.rms_norm_quant_fp8(hidden, layer["attn_norm"], eps, residual)
            hidden = self._attention_fp8(layer, xq, xs, positions, meta, k_cache, v_cache, kv_scales)
            xq, xs, residual = tk.rms_norm_quant_fp8(hidden, layer["mlp_norm"], eps, residual)
            hidden = tk.fused_mlp_fp8(xq, xs, layer["gate_up"], layer["gate_up_scale"], layer["down"],
                                      layer["down_scale"], True, self.dtype)
        normed, _ = tk.fused_add_rms_norm(hidden, residual, self.weights["norm"], eps)
        return normed

    def _attention_fp8(self, layer, xq, xs, positions, meta, k_cache, v_cache, kv_scales):
        qkv = tk.fp8_gemm(xq, layer["qkv"], xs, layer["qkv_scale"], None, self.dtype)
        out = self._attend(qkv, positions, meta, k_cache, v_cache, kv_scales)
        return tk.fp8_linear(out, layer["o"], layer["o_scale"])
