"""trtllm_kernels: fused kernels for serving LLMs on NVIDIA Hopper, as PyTorch ops.

Each op family is one module with a public function, a plain-PyTorch reference and a
`torch.ops.trtllm_kernels.<name>` registration (see `_library`). CUDA kernels, where they
exist, are registered behind the same ops when `trtllm_kernels.kernels` is imported, which
happens here whenever CUDA is available.
"""
import torch

from .activation import silu_and_mul
from .fp8 import (
    dequantize_fp8,
    fp8_gemm,
    fp8_gemm_silu_mul,
    fp8_linear,
    fused_mlp_fp8,
    quantize_fp8_block,
    quantize_fp8_per_channel,
    quantize_fp8_per_tensor,
    quantize_fp8_per_token,
    rms_norm_quant_fp8,
)
from .fp4 import (
    dequantize_fp4,
    fp4_gemm,
    fp4_gemm_w4a8,
    fp4_linear,
    fp4_linear_w4a8,
    quantize_fp4,
    quantize_mxfp4,
    quantize_nvfp4,
)
from .attention import paged_attention_decode, paged_attention_decode_quant_fp8, paged_attention_prefill
from .kv_cache import rope_and_write_kv_cache, write_kv_cache
from .linear import linear
from .mlp import fused_mlp, gemm_silu_mul
from .norm import fused_add_rms_norm, rms_norm
from .rotary import rope_cos_sin_cache, rotary_embedding

__version__ = "0.1.0"

if torch.cuda.is_available():
    from . import kernels  # noqa: F401  (registers the CUDA kernels behind the ops)

__all__ = [
    "dequantize_fp4",
    "dequantize_fp8",
    "fp4_gemm",
    "fp4_gemm_w4a8",
    "fp4_linear",
    "fp4_linear_w4a8",
    "quantize_fp4",
    "quantize_mxfp4",
    "quantize_nvfp4",
    "fp8_gemm",
    "fp8_gemm_silu_mul",
    "fp8_linear",
    "fused_mlp",
    "fused_mlp_fp8",
    "gemm_silu_mul",
    "quantize_fp8_block",
    "quantize_fp8_per_channel",
    "quantize_fp8_per_tensor",
    "quantize_fp8_per_token",
    "rms_norm_quant_fp8",
    "fused_add_rms_norm",
    "linear",
    "paged_attention_decode",
    "paged_attention_decode_quant_fp8",
    "rope_and_write_kv_cache",
    "paged_attention_prefill",
    "rms_norm",
    "rope_cos_sin_cache",
    "rotary_embedding",
    "silu_and_mul",
    "write_kv_cache",
]
