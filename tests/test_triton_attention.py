"""Triton paged attention (decode + prefill) against the reference implementations.

Without a GPU these run under the Triton interpreter (conftest sets TRITON_INTERPRET=1) at
small shapes, calling the launchers directly on CPU tensors; bf16 is GPU-only (the
interpreter's bf16 tl.dot is wrong). Tests marked `gpu` cover real sizes, dispatch through
`torch.ops.trtllm_kernels`, torch.compile and CUDA-graph capture.

Every case poisons the output with NaN, fills unused cache blocks and the slots past each
sequence's end with NaN, and points unused block-table entries at an all-NaN block, so a
read past a sequence's end or a row left unwritten shows up as NaN.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from trtllm_kernels.attention import _decode_ref, _prefill_ref
from trtllm_kernels.kv_cache import quantize_to_cache
from trtllm_kernels.kernels import triton_attention as ta

FP8 = torch.float8_e4m3fn
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"

# relative error of the whole output (||out - ref|| / ||ref||) and max abs error relative
# to max |ref|, per compute dtype; the reference runs in fp32 on the same (rounded) inputs
TOL = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.2e-2, 5e-2),
}


def cdiv(a, b):
    return -(-a // b)


def make_cache(seq_lens, num_kv_heads, head_dim, page, cache_dtype, device=DEV,
               k_scale=1.0, v_scale=1.0, extra_cols=1):
    """A paged cache holding random K/V for each sequence, NaN everywhere else.

    Blocks are handed out in random order; block-table entries past a sequence's last block
    point at an all-NaN block.
    """
    need = [cdiv(n, page) for n in seq_lens]
    num_blocks = sum(need) + 2
    max_blocks = max(max(need), 1) + extra_cols
    shape = (num_blocks, num_kv_heads, page, head_dim)
    k_cache = torch.full(shape, float("nan"), device=device).to(cache_dtype)
    v_cache = torch.full(shape, float("nan"), device=device).to(cache_dtype)
    perm = torch.randperm(num_blocks, device=device)
    nan_block = int(perm[-1])
    block_tables = torch.full((len(seq_lens), max_blocks), nan_block, dtype=torch.int32, device=device)
    nxt = 0
    for i, n in enumerate(seq_lens):
        blocks = perm[nxt : nxt + need[i]]
        nxt += need[i]
        block_tables[i, : need[i]] = blocks.to(torch.int32)
        for j, blk in enumerate(blocks.tolist()):
            cnt = min(page, n - j * page)
            kv = torch.randn(2, num_kv_heads, cnt, head_dim, device=device)
            k_cache[blk, :, :cnt] = quantize_to_cache(kv[0], cache_dtype, k_scale)
            v_cache[blk, :, :cnt] = quantize_to_cache(kv[1], cache_dtype, v_scale)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, block_tables, seq_lens_t


def assert_close(out, ref, dtype):
    assert not out.isnan().any(), f"{int(out.isnan().sum())} NaN outputs (unwritten or read past the end)"
    rel_tol, max_tol = TOL[dtype]
    out, ref = out.double(), ref.double()
    scale = ref.abs().max().clamp_min(1e-6)
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    mx = ((out - ref).abs().max() / scale).item()
    assert rel <= rel_tol and mx <= max_tol, f"rel err {rel:.3g} (tol {rel_tol}), max err {mx:.3g} (tol {max_tol})"


def run_decode(seq_lens, hkv, group, head_dim, page, dtype, cache_dtype=None, k_scale=1.0,
               v_scale=1.0, q_mult=1.0, **kw):
    cache_dtype = cache_dtype or dtype
    k_cache, v_cache, bt, sl = make_cache(seq_lens, hkv, head_dim, page, cache_dtype,
                                          k_scale=k_scale, v_scale=v_scale)
    q = (torch.randn(len(seq_lens), hkv * group, head_dim, device=DEV) * q_mult).to(dtype)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    ta.triton_paged_decode(q, k_cache, v_cache, bt, sl, scale, k_scale, v_scale, out=out,
                           poison_scratch=True, **kw)
    ref = _decode_ref(q.float(), k_cache if cache_dtype == FP8 else k_cache.float(),
                      v_cache if cache_dtype == FP8 else v_cache.float(), bt, sl, scale, k_scale, v_scale)
    assert_close(out, ref, dtype)
    return out


def run_prefill(q_lens, seq_lens, hkv, group, head_dim, page, dtype, cache_dtype=None,
                k_scale=1.0, v_scale=1.0, **kw):
    cache_dtype = cache_dtype or dtype
    k_cache, v_cache, bt, sl = make_cache(seq_lens, hkv, head_dim, page, cache_dtype,
                                          k_scale=k_scale, v_scale=v_scale)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32, device=DEV)
    qsl[1:] = torch.tensor(q_lens, device=DEV).cumsum(0)
    q = torch.randn(sum(q_lens), hkv * group, head_dim, device=DEV).to(dtype)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    ta.triton_paged_prefill(q, k_cache, v_cache, bt, sl, qsl, scale, k_scale, v_scale, out=out, **kw)
    ref = _prefill_ref(q.float(), k_cache if cache_dtype == FP8 else k_cache.float(),
                       v_cache if cache_dtype == FP8 else v_cache.float(), bt, sl, qsl, scale,
                       k_scale, v_scale)
    assert_close(out, ref, dtype)
    return out


# ------------------------------------------------------------------------------------------
# interpreter (CPU) tests; they also run on the GPU
# ------------------------------------------------------------------------------------------

# (dtype, gqa group, page, BLOCK_N): BLOCK_N > page takes the per-row page lookup,
# BLOCK_N <= page the one-page-per-tile path
DECODE_CASES = [
    (torch.float16, 1, 16, 32),
    (torch.float32, 3, 32, 16),
]


@pytest.mark.parametrize("dtype,group,page,block_n", DECODE_CASES)
def test_decode(dtype, group, page, block_n):
    run_decode([1, 17, 97], hkv=2, group=group, head_dim=64, page=page, dtype=dtype,
               block_n=block_n, num_splits=1)


def test_decode_split_kv():
    # 4 splits of 32 tokens over a 128-token table: the 1- and 17-token rows use one split,
    # the 97-token row four; poisoned scratch checks the reduce reads only filled splits
    run_decode([1, 17, 97, 64], hkv=2, group=3, head_dim=64, page=16, dtype=torch.float16,
               block_n=32, num_splits=4)


def test_decode_fp8_cache():
    run_decode([17, 97], hkv=1, group=3, head_dim=64, page=32, dtype=torch.float16,
               cache_dtype=FP8, k_scale=0.05, v_scale=0.03, q_mult=2.0, block_n=32, num_splits=2)


def test_decode_num_splits_rule():
    # large batch: no split; small batch and long context: many splits, none under 512 tokens
    assert ta.decode_num_splits(256, 8, 512, 64) == 1
    assert ta.decode_num_splits(64, 8, 4096, 64) in (2, 3, 4)
    s = ta.decode_num_splits(4, 8, 32768, 64)
    assert 16 <= s <= ta.MAX_SPLITS and 32768 / s >= 512
    assert ta.decode_num_splits(1, 1, 64, 64) == 1
    assert ta.decode_num_splits(1, 8, 100_000, 64) <= ta.MAX_SPLITS


PREFILL_CASES = [
    # dtype, group, page, BLOCK_M, BLOCK_N
    (torch.float16, 1, 16, 16, 32),
    (torch.float32, 3, 32, 16, 16),
]


@pytest.mark.parametrize("dtype,group,page,block_m,block_n", PREFILL_CASES)
def test_prefill(dtype, group, page, block_m, block_n):
    # a whole prefill (17/17), a decode row (1/40), a cached prefix (30 new of 97) and a
    # sequence with no queries this step (0/5)
    run_prefill([17, 1, 30, 0], [17, 40, 97, 5], hkv=2, group=group, head_dim=64, page=page,
                dtype=dtype, block_m=block_m, block_n=block_n)


def test_prefill_fp8_cache():
    run_prefill([20, 1], [45, 9], hkv=1, group=3, head_dim=64, page=16, dtype=torch.float16,
                cache_dtype=FP8, k_scale=0.05, v_scale=0.03, block_m=16, block_n=32)


COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from trtllm_kernels.kernels import triton_attention as ta

    target = GPUTarget("cuda", 90, 32)
    D, GROUP, PAGE = 128, 4, 16
    dtype = {"bf16": "bf16", "fp8": "fp8e4nv"}[sys.argv[1]]
    ptr = lambda t: "*" + t
    def sig(fn, types):
        return {name: types.get(name, "i32") for name in fn.arg_names}

    dec = ta.decode_config(D, torch.bfloat16, torch.bfloat16)
    pre = ta.prefill_config(D, torch.bfloat16)
    jobs = [
        (ta._paged_decode_kernel,
         dict(Q=ptr("bf16"), K=ptr(dtype), V=ptr(dtype), BT=ptr("i32"), SL=ptr("i32"),
              Out=ptr("bf16"), PartAcc=ptr("fp32"), PartM=ptr("fp32"), PartL=ptr("fp32"),
              qk_scale="fp32", v_scale="fp32"),
         dict(NUM_KV_HEADS=8, GROUP=GROUP, GROUP_PAD=16, HEAD_DIM=D, PAGE=PAGE,
              BLOCK_N=dec["BLOCK_N"], NUM_SPLITS=4, DOT_PREC="tf32"),
         dec["num_warps"], dec["num_stages"]),
        (ta._paged_decode_kernel,
         dict(Q=ptr("bf16"), K=ptr(dtype), V=ptr(dtype), BT=ptr("i32"), SL=ptr("i32"),
              Out=ptr("bf16"), PartAcc=ptr("fp32"), PartM=ptr("fp32"), PartL=ptr("fp32"),
              qk_scale="fp32", v_scale="fp32"),
         dict(NUM_KV_HEADS=8, GROUP=GROUP, GROUP_PAD=16, HEAD_DIM=D, PAGE=128,
              BLOCK_N=dec["BLOCK_N"], NUM_SPLITS=1, DOT_PREC="tf32"),
         dec["num_warps"], dec["num_stages"]),
        (ta._decode_reduce_kernel,
         dict(PartAcc=ptr("fp32"), PartM=ptr("fp32"), PartL=ptr("fp32"), SL=ptr("i32"),
              Out=ptr("bf16")),
         dict(NUM_HEADS=32, NUM_SPLITS=4, SPLITS_PAD=4, HEAD_DIM=D), 4, 1),
        (ta._paged_prefill_kernel,
         dict(Q=ptr("bf16"), K=ptr(dtype), V=ptr(dtype), BT=ptr("i32"), SL=ptr("i32"),
              QSL=ptr("i32"), Out=ptr("bf16"), qk_scale="fp32", v_scale="fp32"),
         dict(GROUP=GROUP, HEAD_DIM=D, PAGE=PAGE, BLOCK_M=pre["BLOCK_M"], BLOCK_N=pre["BLOCK_N"],
              SEARCH_ITERS=2, DOT_PREC="tf32"),
         pre["num_warps"], pre["num_stages"]),
    ]
    for fn, types, constexprs, warps, stages in jobs:
        signature = sig(fn, types)
        for name in constexprs:
            signature[name] = "constexpr"
        # what the JIT specializes at a real launch: 16-byte aligned pointers, strides that
        # are multiples of 16 (everything but the block-table stride and num_seqs here)
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name not in constexprs and name not in ("stride_bt", "num_seqs", "qk_scale", "v_scale")}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
        assert k.asm.get("cubin"), fn.__name__
        print(fn.__name__, "ok", "mma" in k.asm["ptx"], k.metadata.shared)
    """
)


@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_kernels_compile_for_sm90(kv):
    """Lower every kernel for Hopper (sm_90) at the main GPU config, D=128 bf16 (and FP8 KV)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, kv], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count(" ok ") == 4, res.stdout
