"""CUDA kernels (Triton and csrc) registered behind the `trtllm_kernels::` ops.

Importing this module registers every kernel whose dependencies are present; ops without a
kernel keep running their reference implementation on CUDA tensors. `trtllm_kernels` imports
it whenever CUDA is available.
"""
import warnings as _warnings

# Triton paged attention: trtllm_kernels::paged_attention_decode / _prefill. A missing or
# broken triton leaves those ops on their reference implementation.
try:
    from . import triton_attention as _triton_attention
except ImportError:  # no triton installed
    pass
except Exception as _e:  # triton present but failing to initialise
    _warnings.warn(f"Triton paged attention unavailable, ops use the reference: {_e!r}")
else:
    _triton_attention.register()

# Triton KV-cache write, rotary embedding and the fused RoPE + cache write.
try:
    from . import triton_kv_cache as _triton_kv_cache
except ImportError:
    pass
except Exception as _e:
    _warnings.warn(f"Triton KV-cache kernels unavailable, ops use the reference: {_e!r}")
else:
    _triton_kv_cache.register()

try:
    from . import triton_activation as _triton_activation
except ImportError:
    pass
else:
    _triton_activation.register()

# Triton FP8 quantization, GEMM, fused MLP and RMSNorm + quant (trtllm_kernels/fp8.py ops).
try:
    from . import triton_fp8 as _triton_fp8
except ImportError:
    pass
except Exception as _e:
    _warnings.warn(f"Triton FP8 kernels unavailable, ops use the reference: {_e!r}")
else:
    _triton_fp8.register()

# Triton bf16 fused MLP (trtllm_kernels/mlp.py ops): gate_up GEMM + SiLU-and-mul, down GEMM.
try:
    from . import triton_mlp as _triton_mlp
except ImportError:
    pass
except Exception as _e:
    _warnings.warn(f"Triton MLP kernels unavailable, ops use the reference: {_e!r}")
else:
    _triton_mlp.register()

# Triton FP4 weight-only GEMM and dequantization (trtllm_kernels/fp4.py ops).
try:
    from . import triton_fp4 as _triton_fp4
except ImportError:
    pass
except Exception as _e:
    _warnings.warn(f"Triton FP4 kernels unavailable, ops use the reference: {_e!r}")
else:
    _triton_fp4.register()

# csrc kernels (RMSNorm): compiled by nvcc on first use, so only where nvcc is found.
from . import csrc as _csrc  # noqa: E402

if _csrc.nvcc_path() is not None:
    _csrc.register()
