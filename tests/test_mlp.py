"""The bf16 / fp16 fused MLP (trtllm_kernels/mlp.py, kernels/triton_mlp.py).

- CPU: the reference against an independent float64 formulation; the Triton kernel under the
  interpreter at small, odd shapes, swapped and not, GLU and plain; opcheck; bad arguments;
  lowering for sm_90 (wgmma in the large-M configuration).
- gpu: real Llama-3.1-8B shapes over M in {1, 7, 16, 64, 256, 1000, 4096}, CUDA graphs and
  torch.compile.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import trtllm_kernels as tk
from trtllm_kernels import mlp
from trtllm_kernels.kernels import triton_mlp as tm

from accuracy import similarity_gap

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _weights(h, inter, dtype, device=DEV, h_out=None):
    wgu = (torch.randn(2 * inter, h, device=device) * h ** -0.5).to(dtype)
    wd = (torch.randn(h_out or h, inter, device=device) * inter ** -0.5).to(dtype)
    return wgu, wd


def _float64_mlp(x, wgu, wd):
    gu = x.double() @ wgu.double().t()
    inter = wgu.shape[0] // 2
    h = F.silu(gu[..., :inter]) * gu[..., inter:]
    return h, h.to(x.dtype).double() @ wd.double().t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
def test_reference_matches_float64(dtype, lead):
    x = torch.randn(*lead, 64, dtype=dtype)
    wgu, wd = _weights(64, 48, dtype, "cpu", h_out=40)
    h64, y64 = _float64_mlp(x, wgu, wd)
    h = tk.gemm_silu_mul(x, wgu)
    y = tk.fused_mlp(x, wgu, wd)
    assert h.shape == (*lead, 48) and y.shape == (*lead, 40) and y.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(h.double(), h64, **tol)
    torch.testing.assert_close(y.double(), y64, **tol)
    # the same as the unfused ops of the float model
    unfused = tk.linear(tk.silu_and_mul(tk.linear(x, wgu)), wd)
    assert similarity_gap(y, unfused) < (1e-10 if dtype == torch.float32 else 1e-4)


def test_bad_arguments():
    x = torch.randn(3, 64)
    wgu, wd = _weights(64, 48, torch.float32, "cpu")
    with pytest.raises(ValueError):
        tk.fused_mlp(x, wgu[:-1], wd)  # odd number of gate_up rows
    with pytest.raises(ValueError):
        tk.fused_mlp(x, wgu[:, :32], wd)  # H mismatch
    with pytest.raises(ValueError):
        tk.fused_mlp(x, wgu, wd[:, :40])  # I mismatch
    with pytest.raises(ValueError):
        tk.fused_mlp(x, wgu.bfloat16(), wd)
    with pytest.raises(TypeError):
        tk.gemm_silu_mul(x.to(torch.int32), wgu)


def test_opcheck():
    x = torch.randn(3, 64)
    wgu, wd = _weights(64, 48, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.trtllm_kernels.fused_mlp.default, (x, wgu, wd))
    torch.library.opcheck(torch.ops.trtllm_kernels.gemm_silu_mul.default, (x, wgu))


# (swap, BLOCK_M, BLOCK_N, BLOCK_K): both orientations, a K tail (EVEN_K False), ragged M / N
CFGS = [(True, 16, 16, 32), (False, 16, 32, 32), (False, 32, 16, 64)]


@pytest.mark.parametrize("cfg", CFGS, ids=str)
@pytest.mark.parametrize("mhi", [(1, 64, 48), (7, 72, 40), (33, 96, 64)], ids=str)
def test_triton_kernels_match_reference(cfg, mhi):
    m, h, inter = mhi
    swap, bm, bn, bk = cfg
    c = dict(swap=swap, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2, num_warps=4, num_stages=1)
    x = torch.randn(m, h, device=DEV)
    wgu, wd = _weights(h, inter, torch.float32, DEV, h_out=h + 8)
    hh = torch.full((m, inter), float("nan"), device=DEV)
    tm._launch(x, wgu, hh, glu=True, cfg=c)
    torch.testing.assert_close(hh, mlp._gemm_silu_mul_ref(x, wgu), atol=1e-4, rtol=1e-4)
    y = torch.full((m, h + 8), float("nan"), device=DEV)
    tm._launch(hh, wd, y, glu=False, cfg=c)
    torch.testing.assert_close(y, hh @ wd.t(), atol=1e-4, rtol=1e-4)


def test_triton_fused_mlp_bf16_through_the_cuda_entry():
    x = torch.randn(5, 64, device=DEV, dtype=torch.bfloat16)
    wgu, wd = _weights(64, 48, torch.bfloat16, DEV)
    y = tm.fused_mlp_cuda(x, wgu, wd)
    ref = mlp._fused_mlp_ref(x, wgu, wd)
    assert y.dtype == torch.bfloat16 and similarity_gap(y, ref) < 1e-4


def test_registered_as_cuda_kernels():
    import trtllm_kernels.kernels  # noqa: F401
    from trtllm_kernels._library import cuda_kernel

    assert cuda_kernel("fused_mlp") is tm.fused_mlp_cuda
    assert cuda_kernel("gemm_silu_mul") is tm.gemm_silu_mul_cuda


COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from trtllm_kernels.kernels import triton_mlp as tm

    fn = tm._mlp_gemm_kernel
    for m, glu in [(4096, True), (4096, False), (1, True), (16, False), (64, True)]:
        cfg = tm.mlp_config(m, 14336, 4096, glu)
        swap = cfg.pop("swap")
        cx = dict(GLU=glu, GLU_ON_A=swap, EVEN_K=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], INTERP=False)
        sig = {n: dict(A="*bf16", B="*bf16", C="*bf16").get(n, "i32") for n in fn.arg_names}
        sig.update({n: "constexpr" for n in cx})
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n in ("A", "B", "C", "K", "stride_am", "stride_bn", "stride_cm")}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        print("gemm", m, glu, "wgmma" in k.asm["ptx"])
    """
)


def test_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("gemm")]
    assert len(lines) == 5, res.stdout
    assert all(line.endswith("True") for line in lines if line.startswith("gemm 4096")), res.stdout


# ------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16, 64, 256, 1000, 4096])
def test_gpu_llama_shapes(m):
    h, inter = 4096, 14336
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    wgu, wd = _weights(h, inter, torch.bfloat16, "cuda")
    hh = tk.gemm_silu_mul(x, wgu)
    y = tk.fused_mlp(x, wgu, wd)
    assert not y.isnan().any() and y.dtype == torch.bfloat16
    href = mlp._gemm_silu_mul_ref(x, wgu)
    assert similarity_gap(hh, href) < 2e-5, m
    assert similarity_gap(y, mlp._fused_mlp_ref(x, wgu, wd)) < 2e-5, m


@pytest.mark.gpu
@pytest.mark.parametrize("mhi", [(3, 577, 300), (100, 1000, 129), (513, 576, 1536)], ids=str)
def test_gpu_odd_shapes(mhi):
    m, h, inter = mhi
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    wgu, wd = _weights(h, inter, torch.bfloat16, "cuda")
    assert similarity_gap(tk.fused_mlp(x, wgu, wd), mlp._fused_mlp_ref(x, wgu, wd)) < 2e-5


@pytest.mark.gpu
def test_gpu_graph_capture_and_compile():
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    wgu, wd = _weights(4096, 14336, torch.bfloat16, "cuda")
    tk.fused_mlp(x, wgu, wd)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tk.fused_mlp(x, wgu, wd)
    x.copy_(torch.randn_like(x))
    graph.replay()
    ref = mlp._fused_mlp_ref(x, wgu, wd)
    assert similarity_gap(y, ref) < 2e-5
    compiled = torch.compile(lambda a: tk.fused_mlp(a, wgu, wd), fullgraph=True)
    assert similarity_gap(compiled(x), ref) < 2e-5
