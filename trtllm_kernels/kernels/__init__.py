"""CUDA kernels (Triton and csrc) registered behind the `trtllm_kernels::` ops.

Importing this module registers every kernel whose dependencies are present; ops without a
kernel keep running their reference implementation on CUDA tensors.
"""

# Triton paged attention: trtllm_kernels::paged_attention_decode / _prefill. A missing or
# broken triton leaves those ops on their reference implementation.
try:
    from . import triton_attention as _triton_attention
except ImportError:  # no triton installed
    pass
except Exception as _e:  # triton present but failing to initialise
    import warnings as _warnings

    _warnings.warn(f"Triton paged attention unavailable, ops use the reference: {_e!r}")
else:
    _triton_attention.register()
