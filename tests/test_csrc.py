"""csrc kernels: every .cu file compiles for sm_90a on any machine with nvcc (no GPU needed),
and on the GPU each kernel matches its op's reference."""
import re
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


@pytest.mark.skipif(nvcc is None, reason="nvcc not installed")
@pytest.mark.parametrize("name", ["fp4_wgmma.cu", "paged_decode.cu"])
def test_register_resident_kernels_do_not_spill(name, tmp_path):
    """The wgmma FP4 GEMM and the decode kernels keep their MMA fragments, accumulators and
    loads in flight in registers, at the budget their launch bounds give (the wgmma kernel's
    four-warpgroup blocks: 128 a thread); a spill to local memory there costs more than it saves."""
    source = next(s for s in csrc.sources() if s.name == name)
    cmd = csrc.nvcc_command(nvcc, [source], tmp_path / "k.cubin", (9, 0), shared=False) + ["-Xptxas", "-v"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", result.stderr)]
    assert spills and max(spills) == 0, result.stderr[-3000:]


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


# ------------------------------------------------------------------------------------------
# paged decode attention (csrc/paged_decode.cu); inputs and checks as tests/test_triton_attention.py:
# NaN-poisoned outputs and split scratch, NaN in every unused cache slot and block
# ------------------------------------------------------------------------------------------

from trtllm_kernels.attention import _decode_ref  # noqa: E402
from trtllm_kernels.kernels import triton_attention as ta  # noqa: E402

from test_triton_attention import assert_close, make_cache  # noqa: E402

FP8, BF16, FP16 = torch.float8_e4m3fn, torch.bfloat16, torch.float16


def test_decode_dispatch_rule_and_support_checks(monkeypatch):
    # CPU tensors never go to the CUDA kernel; the env switch picks Triton whatever the rule
    q = torch.randn(2, 8, 128, dtype=BF16)
    kc = torch.randn(4, 2, 16, 128, dtype=BF16)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    assert not csrc.paged_decode_supported(q, kc, kc, bt)
    monkeypatch.setenv("TRTLLM_KERNELS_DECODE_BACKEND", "cuda")
    assert ta.decode_backend(q, kc, kc, bt) == "triton"
    monkeypatch.setenv("TRTLLM_KERNELS_DECODE_BACKEND", "triton")
    assert ta.decode_backend(q, kc, kc, bt) == "triton"
    assert [csrc.decode_group_pad(g) for g in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    # the measured rule: CUDA for FP8 pages at D 64 / 128 in the tensor-core kernel's pages, else Triton
    assert ta.cuda_decode_preferred(128, 16, FP8) and ta.cuda_decode_preferred(64, 64, FP8)
    assert not ta.cuda_decode_preferred(128, 16, BF16)
    assert not ta.cuda_decode_preferred(256, 16, FP8)
    assert not ta.cuda_decode_preferred(128, 48, FP8) and not ta.cuda_decode_preferred(128, 8, FP8)
    # its splits fill one wave of resident warps: H200, 132 SMs x 12 warps
    assert csrc.mma_decode_num_splits(64 * 8, 1584, 4096 // 16) == 3
    assert csrc.mma_decode_num_splits(1024 * 8, 1584, 512 // 16) == 1
    assert csrc.mma_decode_num_splits(4 * 8, 1584, 32768 // 16) == 49
    assert csrc.mma_decode_num_splits(1, 1584, 32768 // 16) == ta.MAX_SPLITS
    assert csrc.mma_decode_num_splits(1, 1584, 300 // 16) == 1  # no split under 256 tokens
    monkeypatch.delenv("TRTLLM_KERNELS_CSRC_DECODE_VARIANT", raising=False)
    # tensor cores where pages are powers of two of 16+ tokens, else the CUDA-core tilings
    assert [csrc.decode_variant(128, 4, p) for p in (16, 8, 48, 64, 128)] == [2, 0, 0, 2, 2]


def run_csrc_decode(seq_lens, hkv, group, head_dim, page, dtype, cache_dtype=None, k_scale=1.0, v_scale=1.0,
                    q_mult=1.0, **kw):
    cache_dtype = cache_dtype or dtype
    k_cache, v_cache, bt, sl = make_cache(seq_lens, hkv, head_dim, page, cache_dtype, k_scale=k_scale, v_scale=v_scale)
    q = (torch.randn(len(seq_lens), hkv * group, head_dim, device="cuda") * q_mult).to(dtype)
    assert csrc.paged_decode_supported(q, k_cache, v_cache, bt)
    out = torch.full_like(q, float("nan"))
    csrc.paged_decode_cuda(q, k_cache, v_cache, bt, sl, head_dim ** -0.5, k_scale, v_scale, out=out,
                           poison_scratch=True, **kw)
    ref = _decode_ref(q.float(), k_cache if cache_dtype == FP8 else k_cache.float(),
                      v_cache if cache_dtype == FP8 else v_cache.float(), bt, sl, head_dim ** -0.5, k_scale, v_scale)
    assert_close(out, ref, dtype)
    return out


CTX = [1, 17, 97, 4095]
# seq_lens, hkv, group, head_dim, page, dtype, cache dtype
GPU_CSRC_DECODE = [
    (CTX, 2, 1, 128, 16, BF16, None),
    (CTX, 2, 3, 128, 32, FP16, None),      # the default model's ratio (padded to 4)
    (CTX[::-1], 8, 4, 128, 64, BF16, None),
    (CTX, 1, 8, 64, 16, FP16, None),
    (CTX, 4, 8, 128, 32, BF16, None),
    (CTX, 3, 3, 64, 64, BF16, None),
    (CTX, 2, 4, 64, 32, FP16, None),
    (CTX, 2, 2, 128, 16, FP16, None),
    (CTX, 2, 4, 128, 16, BF16, FP8),
    (CTX, 3, 3, 64, 64, FP16, FP8),
    (CTX, 1, 8, 128, 32, BF16, FP8),
    ([1, 15, 16, 17, 63, 64, 65, 1500], 2, 6, 128, 32, BF16, FP8),  # every tail position of a warp step
    ([32768, 5, 4096], 2, 4, 128, 16, BF16, None),  # long context: split-KV
]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [0, 2])  # CUDA cores, tensor cores
@pytest.mark.parametrize("seq_lens,hkv,group,head_dim,page,dtype,cache_dtype", GPU_CSRC_DECODE)
def test_gpu_csrc_decode(seq_lens, hkv, group, head_dim, page, dtype, cache_dtype, variant):
    scales = (0.04, 0.03) if cache_dtype == FP8 else (1.0, 1.0)
    run_csrc_decode(seq_lens, hkv, group, head_dim, page, dtype, cache_dtype, *scales, variant=variant)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [0, 2])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 16, 64])
def test_gpu_csrc_decode_forced_splits(num_splits, variant):
    # splits past a sequence's end are never written (the scratch is NaN) and never read
    run_csrc_decode([1, 17, 97, 4095, 2048], 2, 4, 128, 16, BF16, num_splits=num_splits, variant=variant)


@pytest.mark.gpu
def test_gpu_csrc_decode_variant_checks():
    # pages of 8 or 48: only the CUDA-core kernel takes them; asking for the tensor-core one is an error
    for page in (8, 48):
        run_csrc_decode([1, 17, 97], 2, 4, 128, page, BF16)
        with pytest.raises(ValueError, match="variant"):
            run_csrc_decode([17], 2, 4, 128, page, BF16, variant=2)


@pytest.mark.gpu
def test_gpu_csrc_decode_batch_256_and_large_q():
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 513, (256,), generator=gen).tolist()
    run_csrc_decode(lens, 8, 4, 128, 16, BF16)
    for variant in (0, 2):
        run_csrc_decode([17, 97, 4095], 2, 4, 128, 16, BF16, FP8, 0.04, 0.03, q_mult=8.0, variant=variant)


@pytest.mark.gpu
def test_gpu_csrc_decode_behind_the_op_and_in_a_cuda_graph(monkeypatch):
    import trtllm_kernels

    monkeypatch.setenv("TRTLLM_KERNELS_DECODE_BACKEND", "cuda")
    kc, vc, bt, sl = make_cache([17, 97, 3000], 2, 128, 16, BF16, extra_cols=3, spare_blocks=8)
    q = torch.randn(3, 8, 128, device="cuda", dtype=BF16)
    assert ta.decode_backend(q, kc, vc, bt) == "cuda"
    out = trtllm_kernels.paged_attention_decode(q, kc, vc, bt, sl)
    assert torch.equal(out, csrc.paged_decode_cuda(q, kc, vc, bt, sl))
    ws = torch.empty(3 * 8 * 4 * 130, device="cuda")
    csrc.paged_decode_cuda(q, kc, vc, bt, sl, num_splits=4, workspace=ws)  # warm up outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = csrc.paged_decode_cuda(q, kc, vc, bt, sl, num_splits=4, workspace=ws)
        auto = trtllm_kernels.paged_attention_decode(q, kc, vc, bt, sl)
    q.copy_(torch.randn_like(q))
    sl.copy_(torch.tensor([10, 1, 2900], dtype=torch.int32, device="cuda"))  # shorter: fewer splits hold tokens
    g.replay()
    ref = _decode_ref(q.float(), kc.float(), vc.float(), bt, sl, 128 ** -0.5, 1.0, 1.0)
    assert_close(captured, ref, BF16)
    assert_close(auto, ref, BF16)
    with pytest.raises(ValueError, match="workspace"):
        csrc.paged_decode_cuda(q, kc, vc, bt, sl, num_splits=4, workspace=ws[:10])
