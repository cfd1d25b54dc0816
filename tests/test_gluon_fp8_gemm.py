"""The Gluon (Hopper) FP8 GEMM with per-group activation scales against the op's reference.

CPU: the kernel lowers for sm_90a (TMA, asynchronous wgmma, the register split) without ptxas
serializing the wgmmas (warning C7514) and without spills, both variants. GPU (Hopper): ragged
M and N, K of odd and even step counts, few persistent programs, rows of every scale size
(zeros included), CUDA-graph replay.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

import trtllm_kernels as tk
from trtllm_kernels.fp8 import _fp8_gemm_ref

from sm90_lowering import compile_ptx, ptxas_spill_bytes, squeeze

IS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9

COMPILE = textwrap.dedent(
    """
    import sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon import language as gl
    from trtllm_kernels.kernels import gluon_fp8_gemm as g

    fn = g._group_scaled_gemm_kernel
    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([rows, g.GROUP_K], gl.float8e4nv)
        return f"tensordesc<fp8e4nv[{rows},{g.GROUP_K}],{layout!r}>"
    block_n = int(sys.argv[2])
    types = dict(AD=desc(g.BLOCK_M), BD=desc(block_n), AS="*fp32", BS="*fp32", Out="*bf16")
    const = dict(BLOCK_M=g.BLOCK_M, BLOCK_N=block_n, ROWS=g.ROWS, STAGES=g.STAGES, GROUP_M=g.GROUP_M,
                 PIPELINE=sys.argv[1] == "1", COMPUTE_REGS=g.COMPUTE_REGS, LOADER_REGS=g.LOADER_REGS,
                 num_warps=g.NUM_WARPS)
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=g.NUM_WARPS, maxnreg=g.MAXNREG))
    open(sys.argv[3], "w").write(k.asm["ptx"])
    """
)


@pytest.mark.parametrize("pipeline,block_n", [(0, 128), (1, 128), (1, 64)])
def test_lowers_for_sm90(pipeline, block_n):
    raw = compile_ptx(COMPILE, pipeline, block_n)
    ptx = squeeze(raw)
    assert "cp.async.bulk.tensor" in ptx and "wgmma.mma_async" in ptx, "no TMA / wgmma"
    assert "setmaxnreg.dec.sync.aligned.u32 24;" in ptx and "u32 240;" in ptx, "no loader partition"
    if pipeline:
        assert "wgmma.wait_group.sync.aligned 1;" in ptx, "the pair's second product is not left in flight"
    assert ptxas_spill_bytes(raw) == 0


def _inputs(m, n, k, zero_rows=()):
    g = torch.Generator(device="cuda").manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, device="cuda", generator=g) * torch.rand(m, 1, device="cuda", generator=g).add(0.1) * 3
    x[list(zero_rows)] = 0  # all-zero groups: scale 0 is allowed
    a, sa = tk.quantize_fp8_per_token(x.to(torch.bfloat16), 128)
    b, sb = tk.quantize_fp8_per_channel(torch.randn(n, k, device="cuda", generator=g) * k ** -0.5)
    return a, b, sa, sb


def _check(out, a, b, sa, sb):
    ref = _fp8_gemm_ref(a, b, sa, sb, None, torch.bfloat16).float()
    err = (out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    assert err < 1e-2, float(err)


# m, n, k: the 8B down shape at decode and prefill sizes, ragged M and N, odd and even K steps
GPU_CASES = [(1, 4096, 14336), (7, 1000, 384), (64, 4096, 1024), (129, 4096, 14336), (1000, 4096, 14336),
             (4096, 4096, 14336), (300, 136, 640), (2048, 2048, 256)]


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
@pytest.mark.parametrize("m,n,k", GPU_CASES)
@pytest.mark.parametrize("pipeline,block_n", [(False, 128), (True, 128), (True, 64)])
def test_gpu_matches_reference(m, n, k, pipeline, block_n):
    from trtllm_kernels.kernels.gluon_fp8_gemm import gluon_group_scaled_gemm, supported

    a, b, sa, sb = _inputs(m, n, k, zero_rows=(0,))
    assert supported(a, b, sa, sb)
    if pipeline and (k // 128) % 2:
        with pytest.raises(ValueError, match="even number"):
            gluon_group_scaled_gemm(a, b, sa, sb, pipeline=True)
        return
    out = gluon_group_scaled_gemm(a, b, sa, sb, pipeline=pipeline, block_n=block_n)
    _check(out, a, b, sa, sb)
    assert (out[0] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
@pytest.mark.parametrize("grid,stages", [(1, 6), (3, 3), (7, 4)])
def test_gpu_few_programs_carry_the_ring(grid, stages):
    # each persistent program walks many tiles: the ring's phases carry from tile to tile
    from trtllm_kernels.kernels.gluon_fp8_gemm import gluon_group_scaled_gemm

    a, b, sa, sb = _inputs(517, 1000, 1280)
    _check(gluon_group_scaled_gemm(a, b, sa, sb, grid=grid, stages=stages), a, b, sa, sb)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
def test_gpu_cuda_graph_replay():
    from trtllm_kernels.kernels.gluon_fp8_gemm import gluon_group_scaled_gemm

    a, b, sa, sb = _inputs(256, 4096, 14336)
    gluon_group_scaled_gemm(a, b, sa, sb)  # compile outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = gluon_group_scaled_gemm(a, b, sa, sb)
    a2, _, sa2, _ = _inputs(256, 4096, 14336, zero_rows=(5,))
    a.copy_(a2)
    sa.copy_(sa2)
    g.replay()
    _check(out, a, b, sa, sb)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
def test_gpu_op_dispatch(monkeypatch):
    """tk.fp8_gemm with group-scaled activations runs the Gluon kernel from
    GLUON_GROUP_GEMM_MIN_M rows (and so does the fused MLP's down GEMM), Triton below it and
    for other scale modes; the results match the reference either way."""
    from trtllm_kernels.kernels import gluon_fp8_gemm as g
    from trtllm_kernels.kernels import triton_fp8 as tf

    calls = []
    real = g.gluon_group_scaled_gemm
    monkeypatch.setattr(g, "gluon_group_scaled_gemm", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    lo = tf.GLUON_GROUP_GEMM_MIN_M
    for m, k in ((lo - 1, 1024), (lo, 1024), (lo + 100, 1152)):  # odd K steps at the last
        a, b, sa, sb = _inputs(m, 512, k)
        _check(tk.fp8_gemm(a, b, sa, sb, None, torch.bfloat16), a, b, sa, sb)
        pa, psa = tk.quantize_fp8_per_token(tk.dequantize_fp8(a, sa).to(torch.bfloat16))
        tk.fp8_gemm(pa, b, psa, sb, None, torch.bfloat16)  # per-token scales: Triton
    assert calls == [lo, lo + 100]
    a, b, sa, sb = _inputs(lo, 512, 1024)
    monkeypatch.setenv("TRTLLM_KERNELS_GROUP_GEMM_BACKEND", "triton")
    assert tf.gemm_backend(a, b, sa, sb, None, torch.bfloat16) == "triton"
    monkeypatch.setenv("TRTLLM_KERNELS_GROUP_GEMM_BACKEND", "gluon")
    assert tf.gemm_backend(a[:3], b, sa[:3], sb, None, torch.bfloat16) == "gluon"
    assert tf.gemm_backend(a, b, sa, sb, torch.zeros(512, device="cuda"), torch.bfloat16) == "triton"  # bias
    monkeypatch.delenv("TRTLLM_KERNELS_GROUP_GEMM_BACKEND")
    x, xs = tk.quantize_fp8_per_token(torch.randn(lo, 256, device="cuda", dtype=torch.bfloat16))
    wgu, sgu = tk.quantize_fp8_per_channel(torch.randn(512, 256, device="cuda") / 16)
    wd, sd = tk.quantize_fp8_per_channel(torch.randn(256, 256, device="cuda") / 16)
    got = tk.fused_mlp_fp8(x, xs, wgu, sgu, wd, sd)
    from trtllm_kernels.fp8 import _fused_mlp_fp8_ref

    ref = _fused_mlp_fp8_ref(x, xs, wgu, sgu, wd, sd, True, torch.bfloat16).float()
    assert calls[-1] == lo and (got.float() - ref).abs().max() / ref.abs().max() < 2e-2
