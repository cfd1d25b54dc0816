"""csrc kernels: every .cu file compiles for sm_90a on any machine with nvcc (no GPU needed),
and on the GPU each kernel matches its op's reference."""
import subprocess

import pytest
import torch

import trtllm_kernels as tk
from trtllm_kernels.kernels import csrc
from trtllm_kernels.norm import _fused_add_rms_norm_ref, _rms_norm_ref

nvcc = csrc.nvcc_path()


@pytest.mark.skipif(nvcc is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", csrc.sources(), ids=lambda p: p.name)
def test_compiles_for_sm90a(source, tmp_path):
    out = tmp_path / (source.stem + ".cubin")
    cmd = csrc.nvcc_command(nvcc, [source], out, (9, 0), shared=False)
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size > 0


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden", [(1, 576), (7, 4096), (33, 8192), (5, 127), (256, 5120), (3, 16384)])
def test_rms_norm_kernel(rows, hidden, dtype):
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    torch.testing.assert_close(csrc.rms_norm_cuda(x, w, 1e-5), _rms_norm_ref(x, w, 1e-5), **TOL[dtype])
    out, res = csrc.fused_add_rms_norm_cuda(x, r, w, 1e-5)
    ref_out, ref_res = _fused_add_rms_norm_ref(x, r, w, 1e-5)
    torch.testing.assert_close(res, ref_res, **TOL[dtype])
    torch.testing.assert_close(out, ref_out, **TOL[dtype])


@pytest.mark.gpu
def test_rms_norm_op_dispatches_to_the_kernel_and_captures_in_a_graph():
    from trtllm_kernels._library import cuda_kernel

    assert cuda_kernel("fused_add_rms_norm") is csrc.fused_add_rms_norm_cuda
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    eager = tk.fused_add_rms_norm(x, r, w, 1e-6)
    graph = torch.cuda.CUDAGraph()
    tk.fused_add_rms_norm(x, r, w, 1e-6)  # warm up outside capture
    with torch.cuda.graph(graph):
        captured = tk.fused_add_rms_norm(x, r, w, 1e-6)
    x.copy_(torch.randn_like(x))
    graph.replay()
    expect = _fused_add_rms_norm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(captured[0], expect[0], **TOL[torch.bfloat16])
    assert not torch.equal(captured[0], eager[0])
    compiled = torch.compile(lambda a, b: tk.fused_add_rms_norm(a, b, w, 1e-6), fullgraph=True)
    torch.testing.assert_close(compiled(x, r)[0], expect[0], **TOL[torch.bfloat16])
