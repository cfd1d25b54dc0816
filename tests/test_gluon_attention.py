"""The Gluon (Hopper) paged prefill kernel against the reference.

CPU: the kernel lowers for sm_90a at the page sizes that take one and several TMA copies per
tile. GPU (Hopper): ragged batches, chunked prefill / prefix reuse, GQA, pages of 8 to 128,
NaN in every unused cache slot (see tests/test_triton_attention.make_cache), CUDA-graph replay
and the op's dispatch.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from trtllm_kernels.attention import _prefill_ref
from trtllm_kernels.kernels import triton_attention as ta

from sm90_lowering import compile_ptx, ptxas_spill_bytes, squeeze
from test_triton_attention import DEV, make_cache, assert_close

BF16, FP16 = torch.bfloat16, torch.float16
IS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _inputs(q_lens, seq_lens, hkv, group, head_dim, page, dtype):
    kc, vc, bt, sl = make_cache(seq_lens, hkv, head_dim, page, dtype)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32, device=DEV)
    qsl[1:] = torch.tensor(q_lens, device=DEV).cumsum(0)
    q = torch.randn(sum(q_lens), hkv * group, head_dim, device=DEV).to(dtype)
    return q, kc, vc, bt, sl, qsl


COMPILE = textwrap.dedent(
    """
    import sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon import language as gl
    from trtllm_kernels.kernels import gluon_attention as ga

    page, d, pack = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    fn = ga._paged_prefill_kernel
    def desc(box, tile):
        return f"tensordesc<bf16[{box},{d}],{gl.NVMMASharedLayout.get_default_for([tile, d], gl.bfloat16)!r}>"
    qblock = [ga.BLOCK_M // pack, pack, d]
    qdesc = f"tensordesc<bf16[{qblock[0]},{pack},{d}],{gl.NVMMASharedLayout.get_default_for(qblock, gl.bfloat16)!r}>"
    types = dict(QD=qdesc, KD=desc(min(page, ga.BLOCK_N), ga.BLOCK_N),
                 VD=desc(min(page, ga.BLOCK_N), ga.BLOCK_N), BT="*i32", SL="*i32", QSL="*i32", Sched="*i32", Out="*bf16",
                 qk_scale="fp32", v_scale="fp32")
    const = dict(NUM_HEADS=32, NUM_KV_HEADS=8, HEAD_DIM=d, PAGE=page, BLOCK_M=ga.BLOCK_M, BLOCK_N=ga.BLOCK_N,
                 K_STAGES=ga.K_STAGES, V_STAGES=ga.V_STAGES, ROWS=ga.ROWS, PACK=pack, SEARCH_ITERS=4, COMPUTE_REGS=ga.COMPUTE_REGS, LOADER_REGS=ga.LOADER_REGS,
                 num_warps=ga.NUM_WARPS)
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=ga.NUM_WARPS, maxnreg=ga.MAXNREG))
    open(sys.argv[4], "w").write(k.asm["ptx"])
    """
)


@pytest.mark.parametrize("page,head_dim,pack", [(16, 128, 4), (64, 128, 1), (128, 64, 8)])
def test_lowers_for_sm90(page, head_dim, pack):
    raw = compile_ptx(COMPILE, page, head_dim, pack)
    ptx = squeeze(raw)
    # the loader's TMA copies, asynchronous wgmma with a wait that leaves one group in flight,
    # and the register split between the partitions
    assert "cp.async.bulk.tensor" in ptx and "wgmma.wait_group.sync.aligned 1;" in ptx, "no async pipeline"
    assert "setmaxnreg.dec.sync.aligned.u32 24;" in ptx and "u32 240;" in ptx, "no loader partition"
    assert ptxas_spill_bytes(raw) <= 32  # a few scalars of the outer loop


# q_lens, seq_lens, hkv, group, head_dim, page, dtype
GPU_CASES = [
    ([4096] * 4, [4096] * 4, 2, 4, 128, 16, BF16),                       # the benchmark shape, 2 kv heads
    ([1000, 1, 517, 0, 64], [3000, 300, 517, 7, 64], 2, 3, 128, 32, FP16),  # chunked / prefix / empty
    ([129, 129] + [1] * 30, [2000, 129] + list(range(1, 31)), 8, 1, 64, 64, BF16),
    ([1024], [32768], 1, 8, 128, 64, BF16),                               # long cached prefix
    ([4095, 1, 300], [4095, 4000, 1000], 2, 4, 128, 128, BF16),           # pages larger than a tile
    ([333, 7, 64, 1], [1000, 70, 64, 9], 2, 4, 128, 8, BF16),             # eight copies per tile
    ([17, 200], [17, 263], 4, 2, 64, 16, FP16),
    ([40, 3, 500], [40, 90, 700], 3, 3, 64, 16, BF16),                   # the default model's heads
]


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
@pytest.mark.parametrize("q_lens,seq_lens,hkv,group,head_dim,page,dtype", GPU_CASES)
def test_gpu_prefill(q_lens, seq_lens, hkv, group, head_dim, page, dtype):
    from trtllm_kernels.kernels.gluon_attention import gluon_paged_prefill, supported

    q, kc, vc, bt, sl, qsl = _inputs(q_lens, seq_lens, hkv, group, head_dim, page, dtype)
    assert supported(q, kc, vc)
    out = torch.full_like(q, float("nan"))
    gluon_paged_prefill(q, kc, vc, bt, sl, qsl, head_dim ** -0.5, out=out)
    ref = _prefill_ref(q.float(), kc.float(), vc.float(), bt, sl, qsl, head_dim ** -0.5, 1.0, 1.0)
    rows = int(qsl[-1])
    assert_close(out[:rows], ref[:rows], dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
def test_gpu_op_dispatch_and_cuda_graph():
    q, kc, vc, bt, sl, qsl = _inputs([300, 1, 77], [900, 40, 77], 2, 4, 128, 16, BF16)
    assert ta.prefill_backend(q, kc, vc) == "triton"  # 378 tokens: below GLUON_PREFILL_MIN_TOKENS
    q, kc, vc, bt, sl, qsl = _inputs([1000, 1, 77], [1900, 40, 77], 2, 4, 128, 16, BF16)
    assert ta.prefill_backend(q, kc, vc) == "gluon"
    assert ta.prefill_backend(q.float(), kc.float(), vc.float()) == "triton"
    op = torch.ops.trtllm_kernels.paged_attention_prefill
    eager = op(q, kc, vc, bt, sl, qsl, 128 ** -0.5, 1.0, 1.0)
    ref = _prefill_ref(q.float(), kc.float(), vc.float(), bt, sl, qsl, 128 ** -0.5, 1.0, 1.0)
    assert_close(eager, ref, BF16)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = op(q, kc, vc, bt, sl, qsl, 128 ** -0.5, 1.0, 1.0)
    q.copy_(torch.randn_like(q))  # new inputs, same buffers
    g.replay()
    ref = _prefill_ref(q.float(), kc.float(), vc.float(), bt, sl, qsl, 128 ** -0.5, 1.0, 1.0)
    assert_close(out, ref, BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
@pytest.mark.parametrize("grid,pack", [(1, 4), (3, 1), (7, 2)])
def test_gpu_prefill_few_programs(grid, pack):
    # persistent programs walking many work items each: the ring's and Q buffers' phases carry
    # across items, including items with no queries and partial tiles; GQA packing 1, 2, 4
    from trtllm_kernels.kernels.gluon_attention import gluon_paged_prefill

    q, kc, vc, bt, sl, qsl = _inputs([1000, 1, 517, 0, 64, 129], [3000, 300, 517, 7, 64, 1000], 2, 4, 128, 16, BF16)
    out = torch.full_like(q, float("nan"))
    gluon_paged_prefill(q, kc, vc, bt, sl, qsl, 128 ** -0.5, out=out, grid=grid, pack=pack)
    ref = _prefill_ref(q.float(), kc.float(), vc.float(), bt, sl, qsl, 128 ** -0.5, 1.0, 1.0)
    assert_close(out, ref, BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="the Gluon kernel is for Hopper (sm_90)")
def test_gpu_prefill_strided_q():
    # q as the model passes it: a view into the fused qkv projection (row stride > Hq * D)
    from trtllm_kernels.kernels.gluon_attention import gluon_paged_prefill

    q, kc, vc, bt, sl, qsl = _inputs([300, 77], [900, 77], 2, 4, 128, 16, BF16)
    qkv = torch.randn(q.shape[0], 12, 128, device=DEV, dtype=BF16)
    qkv[:, :8] = q
    out = gluon_paged_prefill(qkv[:, :8], kc, vc, bt, sl, qsl, 128 ** -0.5)
    ref = _prefill_ref(q.float(), kc.float(), vc.float(), bt, sl, qsl, 128 ** -0.5, 1.0, 1.0)
    assert_close(out, ref, BF16)
