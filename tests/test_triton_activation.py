"""Triton SiLU-and-mul against the reference (interpreter on CPU, the real kernel on GPU)."""
import pytest
import torch

from trtllm_kernels.activation import _silu_and_mul_ref
from trtllm_kernels.kernels.triton_activation import triton_silu_and_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(1, 2 * 48), (5, 2 * 1536), (3, 2, 2 * 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul(shape, dtype):
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    torch.testing.assert_close(triton_silu_and_mul(x), _silu_and_mul_ref(x), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64, 16384])
def test_silu_and_mul_gpu_bf16_llama_width(rows):
    x = torch.randn(rows, 2 * 14336, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(torch.ops.trtllm_kernels.silu_and_mul(x), _silu_and_mul_ref(x), atol=1.6e-2, rtol=1.6e-2)
