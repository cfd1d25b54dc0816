"""The decode-step FP8 GEMM in Gluon (kernels/gluon_decode_gemm.py): 1-16 tokens, the weight's
first tiles requested before the PDL wait.

CPU: every variant lowers for sm_90a without spills; with PDL the only TMA loads before the
first `griddepcontrol.wait` are the weight's, and without PDL there is no wait. GPU (Hopper):
the three ways the FP8 engine calls it (per-token scales, per-1x128-group scales, the GLU
epilogue with and without fp8 output) against the ops' references over the 8B shapes and
ragged N / K, split-K, PDL on against off bit for bit, and the ops' dispatch.
"""
from __future__ import annotations

import re
import textwrap

import pytest
import torch

import trtllm_kernels as tk
from trtllm_kernels import fp8 as f8

from accuracy import similarity_gap
from sm90_lowering import compile_ptx, ptxas_spill_bytes, squeeze

IS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9

COMPILE = textwrap.dedent(
    """
    import sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon import language as gl
    from trtllm_kernels.kernels import gluon_decode_gemm as g

    fn = g._decode_gemm_kernel
    glu, quant, group, split, pdl = (int(x) for x in sys.argv[1:6])
    rows = g.GLU_ROWS if glu else g.W_ROWS
    def desc(shape):
        layout = gl.NVMMASharedLayout.get_default_for(shape, gl.float8e4nv)
        return f"tensordesc<fp8e4nv[{shape[0]},{shape[1]}],{layout!r}>"
    types = dict(WD=desc([rows, g.BK]), XD=desc([g.TOKENS, g.BK]), WS="*fp32", XS="*fp32",
                 Out="*fp8e4nv" if quant else "*bf16", OS="*fp32", P="*fp32", Counters="*i32")
    const = dict(ROWS=rows, HALVES=g.HALVES, STAGES=g.STAGES[bool(glu)], SPLIT_K=split, GLU=bool(glu),
                 QUANT_OUT=bool(quant), GROUP_SCALES=bool(group), PDL=bool(pdl), GLU_TRIGGER=bool(glu),
                 num_warps=g.NUM_WARPS[bool(glu)])
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=g.NUM_WARPS[bool(glu)]))
    assert k.metadata.shared <= 232448, k.metadata.shared  # H100's shared memory per block
    open(sys.argv[6], "w").write(k.asm["ptx"])
    """
)


@pytest.mark.parametrize("glu,quant,group,split,pdl", [(0, 0, 0, 1, 1), (0, 0, 0, 2, 1), (0, 0, 1, 2, 1),
                                                       (1, 1, 0, 1, 1), (1, 0, 0, 1, 1), (0, 0, 0, 2, 0)])
def test_lowers_for_sm90_with_the_weight_before_the_wait(glu, quant, group, split, pdl):
    raw = compile_ptx(COMPILE, glu, quant, group, split, pdl)
    ptx = squeeze(raw)
    assert "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3" in ptx
    # a slot's products are waited for at once, so the slot is refilled a step early
    assert "wgmma.wait_group.sync.aligned 0;" in ptx and "wgmma.wait_group.sync.aligned 1;" not in ptx
    loads = [(m.start(), m.group(1)) for m in re.finditer(r"cp\.async\.bulk\.tensor\.2d\.shared::cluster\.global"
                                                          r"\S* \[%r\d+\], \[(%rd\d+),", ptx)]
    weight = re.search(r"mov\.b64 (%rd\d+), _decode_gemm_kernel_param_0;", ptx).group(1)
    weight = re.search(rf"cvta\.param\.u64 (%rd\d+), {weight};", ptx).group(1)
    wait = ptx.find("griddepcontrol.wait")
    if pdl:
        before = {d for pos, d in loads if pos < wait}
        assert before == {weight}, (before, weight)  # the weight's tiles, and only they, before the wait
        assert any(d != weight for pos, d in loads if pos > wait)
    else:
        assert wait == -1
    # the GLU gate_up lets the down GEMM after it start (with PDL); nothing else triggers
    assert ("griddepcontrol.launch_dependents" in ptx) == bool(glu and pdl)
    assert ptxas_spill_bytes(raw) == 0


def test_not_taken_without_a_hopper_gpu():
    from trtllm_kernels.kernels import gluon_decode_gemm as g
    from trtllm_kernels.kernels.triton_fp8 import MODE_ROW

    a = torch.zeros(1, 128, dtype=torch.float8_e4m3fn)
    assert not g.supported(a, torch.zeros(64, 128, dtype=torch.float8_e4m3fn), MODE_ROW, MODE_ROW, None, False)


# ------------------------------------------------------------------------------------------
# GPU

gpu = pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")


def _weights(n, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tk.quantize_fp8_per_channel(torch.randn(n, k, device="cuda", generator=g) * k ** -0.5)


def _acts(m, k, group, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g) * torch.rand(m, 1, device="cuda", generator=g).add(0.1) * 3
    return tk.quantize_fp8_per_token(x.to(torch.bfloat16), group)


@pytest.fixture
def calls(monkeypatch):
    """Counts the launches of the Gluon kernel (so a test fails if the ops took another path)."""
    from trtllm_kernels.kernels import gluon_decode_gemm as g

    seen = []
    real = g.decode_gemm
    monkeypatch.setattr(g, "decode_gemm", lambda *a, **kw: (seen.append(1), real(*a, **kw))[1])
    return seen


# (n, k): the 8B qkv / o / down shapes, ragged N, K of a partial last step
PLAIN = [(6144, 4096), (4096, 4096), (4096, 14336), (1000, 384), (136, 208)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("nk", PLAIN, ids=str)
@pytest.mark.parametrize("group", [0, 128])
def test_gpu_matches_the_reference(m, nk, group, calls):
    n, k = nk
    a, sa = _acts(m, k, group, m + n)
    b, sb = _weights(n, k, k)
    out = tk.fp8_gemm(a, b, sa, sb)
    assert calls, "the op took another kernel"
    ref = f8._fp8_gemm_ref(a, b, sa, sb, None, torch.float32)
    assert similarity_gap(out, ref) < 1e-5
    assert float((out.float() - ref).abs().max()) <= 1.6e-2 * float(ref.abs().max()) + 1e-3


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("inter,k", [(14336, 4096), (256, 384)])
@pytest.mark.parametrize("quant", [False, True])
def test_gpu_glu_epilogue(m, inter, k, quant, calls):
    a, sa = _acts(m, k, 0, m)
    b, sb = _weights(2 * inter, k, inter)
    h, hs = tk.fp8_gemm_silu_mul(a, b, sa, sb, quant)
    assert calls
    exact = f8._silu_mul_f32(f8._dequant_a(a, sa) @ f8._dequant_b(b, sb).t())
    if quant:  # the reference's quantization of the exact product: equal but for rounding flips
        rq, rs = f8._quantize_per_token_ref(exact, 128)
        torch.testing.assert_close(hs, rs, rtol=1e-2, atol=0)
        assert similarity_gap(f8.dequantize_fp8(h, hs), f8.dequantize_fp8(rq, rs)) < 1e-4
    else:
        assert similarity_gap(h, exact) < 1e-5


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", ["plain", "split", "group", "glu"])
def test_gpu_pdl_gives_the_bits_of_plain_launches(case, monkeypatch, calls):
    """Launched with PDL the kernel requests its weight before waiting for the kernel before it:
    the same bits as a plain launch, right after a kernel that writes its activations and lets it
    start early (RMSNorm+quant; for down the GLU gate_up GEMM)."""
    from trtllm_kernels.kernels import triton_tiles as tt

    n, k = {"plain": (6144, 4096), "split": (4096, 4096), "group": (4096, 14336), "glu": (2 * 14336, 4096)}[case]
    x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
    b, sb = _weights(n, k, 1)
    norm = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    gu, gus = _weights(2 * k, 4096, 2) if case == "group" else (None, None)  # group: a [gate; up] 4096 -> k

    def run():
        if case == "group":  # written by the GLU gate_up GEMM, which lets the down GEMM start early
            xq, xs, _ = tk.rms_norm_quant_fp8(x[:, :4096].contiguous(), norm[:4096], 1e-5)
            a, sa = tk.fp8_gemm_silu_mul(xq, gu, xs, gus, True)
        else:  # written by RMSNorm+quant, which lets a PDL launch start early
            a, sa, _ = tk.rms_norm_quant_fp8(x, norm, 1e-5)
        if case == "glu":
            return tk.fp8_gemm_silu_mul(a, b, sa, sb, True)[0].float()
        return tk.fp8_gemm(a, b, sa, sb)

    for _ in range(3):
        x.normal_()
        monkeypatch.setattr(tt, "PDL", 0)
        expect = run()
        monkeypatch.setattr(tt, "PDL", 1)
        assert torch.equal(run(), expect)
    assert calls


@pytest.mark.gpu
@gpu
def test_gpu_dispatch(monkeypatch, calls):
    """1-16 tokens with per-token or per-group activation scales and per-channel weights take
    the Gluon kernel; 17 tokens, block-scaled weights and TRTLLM_KERNELS_DECODE_GEMM=triton do not."""
    from trtllm_kernels.kernels import gluon_decode_gemm as g

    b, sb = _weights(256, 512, 0)
    for m, expect in ((16, 1), (17, 0)):
        calls.clear()
        a, sa = _acts(m, 512, 0, 0)
        tk.fp8_gemm(a, b, sa, sb)
        assert len(calls) == expect, m
    calls.clear()
    bq, bs = tk.quantize_fp8_block(torch.randn(256, 512, device="cuda"))
    a, sa = _acts(1, 512, 128, 0)
    tk.fp8_gemm(a, bq, sa, bs)
    monkeypatch.setattr(g, "DECODE_GEMM", "triton")
    a, sa = _acts(1, 512, 0, 0)
    tk.fp8_gemm(a, b, sa, sb)
    assert not calls
