"""The Gluon (Hopper) FP8 GEMMs, per-1x128-group and per-token activation scales (the latter
also with the GLU epilogue), against the ops' references.

CPU: the kernels lower for sm_90a (TMA, asynchronous wgmma, the register split) without ptxas
serializing the wgmmas (warning C7514) and without spills, every variant. GPU (Hopper): ragged
M and N, K of odd and even step counts (and not a multiple of 128), few persistent programs,
rows of every scale size (zeros included), CUDA-graph replay, the ops' dispatch.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

import trtllm_kernels as tk
from trtllm_kernels import fp8 as f8
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


TOKEN_COMPILE = textwrap.dedent(
    """
    import sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon import language as gl
    from trtllm_kernels.kernels import gluon_fp8_gemm as g

    fn = g._token_scaled_gemm_kernel
    def desc(shape, dtype, name):
        layout = gl.NVMMASharedLayout.get_default_for(shape, dtype)
        return f"tensordesc<{name}[{shape[0]},{shape[1]}],{layout!r}>"
    block_n, glu, quant, group = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1", sys.argv[4] == "1"
    fp8 = (gl.float8e4nv, "fp8e4nv")
    types = dict(AD=desc([g.BLOCK_M, g.GROUP_K], *fp8), BD=desc([block_n, g.GROUP_K], *fp8), AS="*fp32",
                 BS="*fp32", OD=desc([g.ROWS, block_n], *(fp8 if quant else (gl.bfloat16, "bf16"))), OS="*fp32")
    const = dict(BLOCK_M=g.BLOCK_M, BLOCK_N=block_n, ROWS=g.ROWS, GROUP_M=g.GROUP_M, GLU=glu, QUANT_OUT=quant,
                 GROUP_SCALES=group,
                 STAGES=g.TOKEN_STAGES[(2 * block_n if glu else block_n, glu)], COMPUTE_REGS=g.COMPUTE_REGS,
                 LOADER_REGS=g.LOADER_REGS, num_warps=g.NUM_WARPS)
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=g.NUM_WARPS, maxnreg=g.MAXNREG))
    assert k.metadata.shared <= 232448, k.metadata.shared  # H100's shared memory per block
    open(sys.argv[5], "w").write(k.asm["ptx"])
    """
)


@pytest.mark.parametrize("block_n,glu,quant,group", [(256, 0, 0, 0), (128, 0, 0, 0), (128, 1, 0, 0), (128, 1, 1, 0),
                                                     (256, 0, 0, 1), (128, 0, 0, 1)])
def test_token_kernel_lowers_for_sm90(block_n, glu, quant, group):
    raw = compile_ptx(TOKEN_COMPILE, block_n, glu, quant, group)
    ptx = squeeze(raw)
    assert "cp.async.bulk.tensor.2d.shared::cluster.global" in ptx, "no TMA loads"
    assert "cp.async.bulk.tensor.2d.global.shared::cta" in ptx, "no TMA store of the output tile"
    assert "setmaxnreg.dec.sync.aligned.u32 24;" in ptx and "u32 240;" in ptx, "no loader partition"
    if group:  # each step's product is waited for before the accumulator is rescaled
        assert "wgmma.wait_group.sync.aligned 0;" in ptx and "wgmma.wait_group.sync.aligned 1;" not in ptx
    else:  # one K step's product(s) left in flight while the next step's are issued
        assert f"wgmma.wait_group.sync.aligned {2 if glu else 1};" in ptx
    assert ptxas_spill_bytes(raw) == 0


@pytest.mark.parametrize("pipeline,block_n", [(0, 128), (1, 128), (1, 64)])
def test_lowers_for_sm90(pipeline, block_n):
    raw = compile_ptx(COMPILE, pipeline, block_n)
    ptx = squeeze(raw)
    assert "cp.async.bulk.tensor" in ptx and "wgmma.mma_async" in ptx, "no TMA / wgmma"
    assert "setmaxnreg.dec.sync.aligned.u32 24;" in ptx and "u32 240;" in ptx, "no loader partition"
    if pipeline:
        assert "wgmma.wait_group.sync.aligned 1;" in ptx, "the pair's second product is not left in flight"
    assert ptxas_spill_bytes(raw) == 0


def _inputs(m, n, k, zero_rows=(), group=128):
    """fp8 activations [m, k] with one scale per 1 x `group` (0: per token), some rows all zero,
    and a per-channel fp8 weight [n, k]."""
    g = torch.Generator(device="cuda").manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, device="cuda", generator=g) * torch.rand(m, 1, device="cuda", generator=g).add(0.1) * 3
    x[list(zero_rows)] = 0  # all-zero groups: scale 0 is allowed
    a, sa = tk.quantize_fp8_per_token(x.to(torch.bfloat16), group)
    b, sb = tk.quantize_fp8_per_channel(torch.randn(n, k, device="cuda", generator=g) * k ** -0.5)
    return a, b, sa, sb


# Hopper's fp8 wgmma adds into its accumulator with fewer bits than fp32: kernels that chain all
# of K in the tensor cores (the token kernel, the chained group-scaled one) drift with K, ~1.2% of
# the largest output at K 14336 (H100); the promoting kernel adds each 128-step in fp32 (~0.5%).
CHAIN_TOL = 2e-2


def _check(out, a, b, sa, sb, tol=1e-2):
    ref = _fp8_gemm_ref(a, b, sa, sb, None, torch.bfloat16).float()
    err = (out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    assert err < tol, float(err)


# m, n, k: the 8B down shape at decode and prefill sizes, ragged M and N, odd and even K steps
GPU_CASES = [(1, 4096, 14336), (7, 1000, 384), (64, 4096, 1024), (129, 4096, 14336), (1000, 4096, 14336),
             (4096, 4096, 14336), (300, 136, 640), (2048, 2048, 256)]


def test_group_kernel_rule():
    """The chained kernel where its tiles are 256 wide (from 640 rows on the 8B down shape:
    1.06-1.18x the promoting kernel there, H100), the promoting one below (the chained kernel's
    128-wide tiles were 0.70-0.89x of it at 256-512 rows)."""
    from trtllm_kernels.kernels.gluon_fp8_gemm import group_kernel

    assert [group_kernel(m, 4096, 132) for m in (256, 512, 640, 1024, 4096, 8192)] == \
        ["promote", "promote", "chain", "chain", "chain", "chain"]


# the group-scaled kernels: the chained token kernel (scales as ratios) at both tile widths, the
# promoting kernel with and without its pairs, at both of its widths
GROUP_KERNELS = [("chain", None, 256), ("chain", None, 128), ("promote", False, 128), ("promote", True, 128),
                 ("promote", True, 64)]


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
@pytest.mark.parametrize("m,n,k", GPU_CASES)
@pytest.mark.parametrize("kernel,pipeline,block_n", GROUP_KERNELS)
def test_gpu_matches_reference(m, n, k, kernel, pipeline, block_n):
    from trtllm_kernels.kernels.gluon_fp8_gemm import gluon_group_scaled_gemm, supported

    a, b, sa, sb = _inputs(m, n, k, zero_rows=(0,))
    assert supported(a, b, sa, sb)
    if pipeline and (k // 128) % 2:
        with pytest.raises(ValueError, match="even number"):
            gluon_group_scaled_gemm(a, b, sa, sb, pipeline=True, kernel=kernel)
        return
    out = gluon_group_scaled_gemm(a, b, sa, sb, pipeline=pipeline, block_n=block_n, kernel=kernel)
    _check(out, a, b, sa, sb, CHAIN_TOL if kernel == "chain" else 1e-2)
    assert (out[0] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
@pytest.mark.parametrize("kernel,pipeline,block_n", GROUP_KERNELS)
def test_gpu_group_scales_spread(kernel, pipeline, block_n):
    """Rows whose groups' scales differ by up to 10^8, or are all-zero groups (the smallest scale)
    between others: each row within 1% of its own largest output (the chained kernel carries the
    sum in units of each group's scale in turn)."""
    from trtllm_kernels.kernels.gluon_fp8_gemm import gluon_group_scaled_gemm

    m, n, k = 640, 512, 1024
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(m, k, device="cuda", generator=g)
    x[1, 128:384] = 0
    x[2].view(-1, 128).mul_(torch.tensor([1e4, 1e-4] * 4, device="cuda")[:, None])
    x[3, 512:640] *= 1e6
    x[4, :128] = 0
    a, sa = tk.quantize_fp8_per_token(x.to(torch.bfloat16), 128)
    b, sb = tk.quantize_fp8_per_channel(torch.randn(n, k, device="cuda", generator=g) * k ** -0.5)
    out = gluon_group_scaled_gemm(a, b, sa, sb, pipeline=pipeline, block_n=block_n, kernel=kernel).float()
    ref = _fp8_gemm_ref(a, b, sa, sb, None, torch.bfloat16).float()
    err = (out - ref).abs().amax(1) / ref.abs().amax(1)
    assert err.max() < 1e-2, err[:8]


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
@pytest.mark.parametrize("grid,stages", [(1, 6), (3, 3), (7, 4)])
@pytest.mark.parametrize("kernel", ["chain", "promote"])
def test_gpu_few_programs_carry_the_ring(grid, stages, kernel):
    # each persistent program walks many tiles: the ring's phases carry from tile to tile
    from trtllm_kernels.kernels.gluon_fp8_gemm import gluon_group_scaled_gemm

    a, b, sa, sb = _inputs(517, 1000, 1280)
    stages = min(stages, 3) if kernel == "chain" else stages  # the chained kernel's ring: 3 fit either width
    _check(gluon_group_scaled_gemm(a, b, sa, sb, grid=grid, stages=stages, kernel=kernel), a, b, sa, sb)


# m, n, k: the 8B qkv / o / gate_up shapes at decode and prefill sizes, ragged M and N, K not a
# multiple of 128 (TMA fills the last step with zeros)
TOKEN_CASES = [(1, 6144, 4096), (129, 4096, 4096), (1000, 6144, 4096), (4096, 28672, 4096), (300, 144, 640),
               (517, 1008, 208), (2048, 4096, 14336)]


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
@pytest.mark.parametrize("m,n,k", TOKEN_CASES)
@pytest.mark.parametrize("block_n", [128, 256])
def test_gpu_token_matches_reference(m, n, k, block_n):
    from trtllm_kernels.kernels.gluon_fp8_gemm import gluon_token_scaled_gemm, token_supported

    a, b, sa, sb = _inputs(m, n, k, zero_rows=(0,), group=0)
    assert token_supported(a, b, sa, sb)
    out, scale = gluon_token_scaled_gemm(a, b, sa, sb, block_n=block_n)
    assert scale is None
    _check(out, a, b, sa, sb)
    assert (out[0] == 0).all()


# m, I, K: the 8B gate_up (I 14336) at decode and prefill sizes, ragged M and I
GLU_CASES = [(1, 14336, 4096), (600, 14336, 4096), (4096, 14336, 4096), (333, 400, 272)]


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
@pytest.mark.parametrize("m,inter,k", GLU_CASES)
@pytest.mark.parametrize("quant", [True, False])
def test_gpu_token_glu_matches_reference(m, inter, k, quant):
    from trtllm_kernels.kernels.gluon_fp8_gemm import gluon_token_scaled_gemm, token_supported

    a, b, sa, sb = _inputs(m, 2 * inter, k, zero_rows=(0,), group=0)
    assert token_supported(a, b, sa, sb, glu=True)
    h, none = gluon_token_scaled_gemm(a, b, sa, sb, glu=True)
    want = f8._fp8_gemm_silu_mul_ref(a, b, sa, sb, False, torch.float32)[0]
    assert none is None and h.dtype == torch.bfloat16
    assert (h.float() - want).abs().max() <= 1e-2 * want.abs().max()
    assert (h[0] == 0).all()
    if quant:
        # Hopper's fp8 wgmma accumulates with reduced precision (Triton's default on sm_90, as in
        # the Triton kernel), an error relative to the products' size, not to each output: a
        # small group's scale can be off the float32 reference's by percents. So the fp8
        # epilogue is checked against the quantization of the same accumulators' bf16 output
        # (the same tiles, the same order): scales within bf16 rounding, values within one step.
        q, scale = gluon_token_scaled_gemm(a, b, sa, sb, glu=True, quant_out=True)
        want_q, want_scale = f8._quantize_per_token_ref(h, 128)
        assert q.dtype == f8.FP8 and scale.shape == want_scale.shape
        torch.testing.assert_close(scale, want_scale, rtol=2 ** -7, atol=0)
        assert (q.float() - want_q.float()).abs().le(want_q.float().abs() * 2 ** -3 + 2 ** -9).all()
        assert (q[0].float() == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
@pytest.mark.parametrize("grid,block_n,glu", [(1, 256, False), (5, 128, False), (3, 128, True)])
def test_gpu_token_few_programs_carry_the_ring(grid, block_n, glu):
    from trtllm_kernels.kernels.gluon_fp8_gemm import gluon_token_scaled_gemm

    a, b, sa, sb = _inputs(517, 1024, 1280, group=0)
    out = gluon_token_scaled_gemm(a, b, sa, sb, glu=glu, block_n=None if glu else block_n, grid=grid)[0]
    if glu:
        want = f8._fp8_gemm_silu_mul_ref(a, b, sa, sb, False, torch.bfloat16)[0].float()
        assert (out.float() - want).abs().max() <= 1e-2 * want.abs().max()
    else:
        _check(out, a, b, sa, sb)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
@pytest.mark.parametrize("group,m,k", [(128, 256, 14336), (128, 1024, 14336), (0, 640, 4096)],
                         ids=["group_promote", "group_chain", "token"])
def test_gpu_cuda_graph_replay(group, m, k):
    from trtllm_kernels.kernels.gluon_fp8_gemm import gluon_group_scaled_gemm, gluon_token_scaled_gemm

    def gemm(a, b, sa, sb):
        return gluon_group_scaled_gemm(a, b, sa, sb) if group else gluon_token_scaled_gemm(a, b, sa, sb)[0]

    a, b, sa, sb = _inputs(m, 4096, k, group=group)
    gemm(a, b, sa, sb)  # compile outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = gemm(a, b, sa, sb)
    a2, _, sa2, _ = _inputs(m, 4096, k, zero_rows=(5,), group=group)
    a.copy_(a2)
    sa.copy_(sa2)
    g.replay()
    _check(out, a, b, sa, sb, 1e-2 if m == 256 else CHAIN_TOL)  # 256 rows: the promoting kernel


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
def test_gpu_op_dispatch(monkeypatch):
    """tk.fp8_gemm runs the group-scaled Gluon kernel for group-scaled activations (and so does
    the fused MLP's down GEMM) from GLUON_GROUP_GEMM_MIN_M rows, the token-scaled one for
    per-token activations (and the GLU gate_up) from GLUON_TOKEN_GEMM_MIN_M, Triton below and
    for other scale modes; the results match the references either way."""
    from trtllm_kernels.fp8 import _fused_mlp_fp8_ref
    from trtllm_kernels.kernels import gluon_fp8_gemm as g
    from trtllm_kernels.kernels import triton_fp8 as tf

    calls = []
    for name in ("gluon_group_scaled_gemm", "gluon_token_scaled_gemm"):
        real = getattr(g, name)
        monkeypatch.setattr(g, name, lambda *a, _n=name, _f=real, **kw: calls.append((_n[6:11], a[0].shape[0])) or _f(*a, **kw))
    lo, tlo = tf.GLUON_GROUP_GEMM_MIN_M, tf.GLUON_TOKEN_GEMM_MIN_M
    for m, k in ((lo - 1, 1024), (lo, 1024), (lo + 100, 1152)):  # odd K steps at the last
        a, b, sa, sb = _inputs(m, 512, k)
        _check(tk.fp8_gemm(a, b, sa, sb, None, torch.bfloat16), a, b, sa, sb)
    for m in (tlo - 1, tlo):
        a, b, sa, sb = _inputs(m, 512, 1024, group=0)
        _check(tk.fp8_gemm(a, b, sa, sb, None, torch.bfloat16), a, b, sa, sb)
        _check(tk.fp8_gemm(a, b, sa.expand(m, 8).contiguous(), sb, None, torch.bfloat16), a, b, sa, sb)  # groups
        _check(tk.fp8_gemm(a, b, sa.amax().reshape(1), sb, None, torch.bfloat16), a, b,
               sa.amax().expand(m, 1), sb)  # per-tensor: Triton
    want = [("group", m) for m in (lo - 1, lo, lo + 100) if m >= lo]
    for m in (tlo - 1, tlo):
        want += [("token", m)] * (m >= tlo) + [("group", m)] * (m >= lo)
    assert calls == want
    a, b, sa, sb = _inputs(lo, 512, 1024)
    monkeypatch.setenv("TRTLLM_KERNELS_FP8_GEMM_BACKEND", "triton")
    assert tf.gemm_backend(a, b, sa, sb, None, torch.bfloat16) == "triton"
    monkeypatch.setenv("TRTLLM_KERNELS_FP8_GEMM_BACKEND", "gluon")
    assert tf.gemm_backend(a[:3], b, sa[:3], sb, None, torch.bfloat16) == "gluon_group"
    assert tf.gemm_backend(a, b, sa, sb, torch.zeros(512, device="cuda"), torch.bfloat16) == "triton"  # bias
    ta, tb, tsa, tsb = _inputs(3, 512, 1024, group=0)
    assert tf.gemm_backend(ta, tb, tsa, tsb, None, torch.bfloat16) == "gluon_token"
    assert tf.gemm_backend(ta, tb[:504], tsa, tsb[:504], None, torch.bfloat16) == "triton"  # N % 16: no TMA store
    monkeypatch.delenv("TRTLLM_KERNELS_FP8_GEMM_BACKEND")
    # the fused MLP: GLU gate_up on the token kernel, down on the group kernel
    calls.clear()
    x, xs = tk.quantize_fp8_per_token(torch.randn(max(lo, tlo), 256, device="cuda", dtype=torch.bfloat16))
    wgu, sgu = tk.quantize_fp8_per_channel(torch.randn(512, 256, device="cuda") / 16)
    wd, sd = tk.quantize_fp8_per_channel(torch.randn(256, 256, device="cuda") / 16)
    got = tk.fused_mlp_fp8(x, xs, wgu, sgu, wd, sd)
    ref = _fused_mlp_fp8_ref(x, xs, wgu, sgu, wd, sd, True, torch.bfloat16).float()
    assert calls == [("token", x.shape[0]), ("group", x.shape[0])]
    assert (got.float() - ref).abs().max() / ref.abs().max() < 2e-2
