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
               k_scale=1.0, v_scale=1.0, extra_cols=1, spare_blocks=0):
    """A paged cache holding random K/V for each sequence, NaN everywhere else.

    Blocks are handed out in random order; block-table entries past a sequence's last block
    (and `extra_cols` more columns) point at an all-NaN block.
    """
    need = torch.tensor([cdiv(n, page) for n in seq_lens], device=device)
    lens = torch.tensor(seq_lens, device=device)
    used = int(need.sum())
    num_blocks = used + 2 + spare_blocks
    max_blocks = max(int(need.max()), 1) + extra_cols
    shape = (num_blocks, num_kv_heads, page, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=device)
    perm = torch.randperm(num_blocks, device=device)
    seqs = torch.arange(len(seq_lens), device=device)
    block_tables = torch.full((len(seq_lens), max_blocks), int(perm[-1]), dtype=torch.int32, device=device)
    rows = seqs.repeat_interleave(need)
    cols = torch.arange(used, device=device) - (need.cumsum(0) - need).repeat_interleave(need)
    block_tables[rows, cols] = perm[:used].to(torch.int32)
    tok_seq = seqs.repeat_interleave(lens)
    tok_pos = torch.arange(int(lens.sum()), device=device) - (lens.cumsum(0) - lens).repeat_interleave(lens)
    blk = block_tables[tok_seq, tok_pos // page].long()
    off = tok_pos % page
    kv = torch.randn(2, len(tok_pos), num_kv_heads, head_dim, device=device)
    k_cache[blk, :, off] = quantize_to_cache(kv[0], cache_dtype, k_scale)
    v_cache[blk, :, off] = quantize_to_cache(kv[1], cache_dtype, v_scale)
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


@pytest.mark.parametrize("f16_math", [False, True])
def test_decode_fp8_cache(f16_math):
    # f16_math: pages converted to fp16, the softmax scale folded into q (the GPU default)
    run_decode([17, 97], hkv=1, group=3, head_dim=64, page=32, dtype=torch.float16,
               cache_dtype=FP8, k_scale=0.05, v_scale=0.03, q_mult=2.0, block_n=32, num_splits=2,
               f16_math=f16_math)


@pytest.mark.parametrize("num_splits,head_dim", [(1, 128), (4, 128), (4, 64)])
def test_decode_quant_out(num_splits, head_dim):
    """The fp8 epilogue (the FP8 engine's o-projection input) gives the bits of the unfused
    output quantized per token, merged splits or not; a row of length 0 (a padded CUDA-graph
    batch) is zeros either way."""
    from trtllm_kernels.fp8 import _quantize_per_token_ref

    k_cache, v_cache, bt, sl = make_cache([1, 97, 40, 5], 2, head_dim, 16, torch.float16)
    sl[3] = 0
    q = torch.randn(4, 6, head_dim, device=DEV).to(torch.float16)
    out = torch.full_like(q, float("nan"))
    ta.triton_paged_decode(q, k_cache, v_cache, bt, sl, out=out, num_splits=num_splits, block_n=32,
                           poison_scratch=True)
    got, scale = ta.triton_paged_decode(q, k_cache, v_cache, bt, sl, num_splits=num_splits, block_n=32,
                                        poison_scratch=True, quant_out=True)
    want, want_scale = _quantize_per_token_ref(out.reshape(4, -1), 0)
    assert got.shape == (4, 6 * head_dim) and scale.shape == (4, 1)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)) and torch.equal(scale, want_scale)
    assert not out[:3].isnan().any() and (out[3] == 0).all()
    ref = _decode_ref(q[:3].float(), k_cache.float(), v_cache.float(), bt[:3], sl[:3], head_dim ** -0.5, 1.0, 1.0)
    assert_close(out[:3], ref, torch.float16)
    with pytest.raises(ValueError, match="contiguous"):
        ta.triton_paged_decode(q, k_cache, v_cache, bt, sl, out=out.transpose(1, 2), quant_out=True)


def test_decode_num_splits_rule():
    # programs that fill the GPU: no split; few programs and a long context: enough splits for
    # one wave, none under 256 tokens (unless a program per tile fits one wave); past one wave,
    # splits that keep the last wave busy
    assert ta.decode_num_splits(256, 8, 512, 64) == 1
    assert ta.decode_num_splits(64, 8, 4096, 64, 132, 4) == 1   # 512 programs, 528 slots
    s = ta.decode_num_splits(4, 8, 32768, 64, 132, 4)
    assert 8 <= s <= 16 and 32 * s <= 528
    assert ta.decode_num_splits(72, 8, 4096, 64, 132, 4) > 1     # 576 programs: no near-empty wave
    assert ta.decode_num_splits(1, 1, 64, 64) == 1
    assert ta.decode_num_splits(1, 8, 100_000, 64) <= ta.MAX_SPLITS
    # a program per tile still one wave (batch 1, 512-token tables): a split per tile
    assert ta.decode_num_splits(1, 8, 512, 64, 132, 4) == 8
    assert ta.decode_num_splits(1, 8, 4096, 64, 132, 4) == 32  # 512 programs of one tile: 32 (> 16)
    assert ta.decode_num_splits(2, 8, 4096, 64, 132, 4) == 16  # 1024: splits of 256+ tokens again


def test_launch_configs(monkeypatch):
    # the GPU tables (not the interpreter's): FP8 decode in fp16 math at 4 programs per SM,
    # prefill capped at 128 registers, and the tuning override
    monkeypatch.setattr(ta, "_interpreting", lambda: False)
    dec = ta.decode_config(128, FP8, torch.bfloat16)
    assert dec["F16_MATH"] and dec["maxnreg"] == 128 and dec["BLOCK_N"] == 64
    assert not ta.decode_config(128, torch.bfloat16, torch.bfloat16)["F16_MATH"]
    # many (sequence, kv head) programs: small 2-warp programs for FP8 pages at D 128 only
    many = ta.DECODE_SMALL_TILES_MIN_PROGRAMS
    small = ta.decode_config(128, FP8, torch.bfloat16, programs=many)
    assert (small["BLOCK_N"], small["num_warps"], small["per_sm"]) == (32, 2, 8) and small["F16_MATH"]
    assert ta.decode_config(128, FP8, torch.bfloat16, programs=many - 1) == dec
    assert ta.decode_config(128, torch.bfloat16, torch.bfloat16, programs=many)["num_warps"] == 4
    assert ta.decode_config(64, FP8, torch.bfloat16, programs=many)["num_warps"] == 4
    # long block tables: FP8 keeps two tiles in flight (6 stages); bf16 and short tables do not
    deep = ta.DECODE_DEEP_MIN_CONTEXT
    assert ta.decode_config(128, FP8, torch.bfloat16, many, deep)["num_stages"] == 6
    assert ta.decode_config(128, FP8, torch.bfloat16, 512, deep)["num_stages"] == 6
    assert ta.decode_config(128, FP8, torch.bfloat16, many, deep // 2)["num_stages"] == 3
    assert ta.decode_config(128, torch.bfloat16, torch.bfloat16, 512, deep)["num_stages"] == 3
    assert ta.prefill_config(128, torch.bfloat16, 16)["maxnreg"] == 128
    # FP8 pages: the same two-programs-per-SM tiles, each K/V tile converted once for 4 heads
    fp8_pre = ta.prefill_config(128, torch.bfloat16, 16, FP8)
    assert fp8_pre["maxnreg"] == 128 and fp8_pre["PACK"] == 4
    monkeypatch.setenv("TRTLLM_KERNELS_PREFILL_CONFIG", '{"BLOCK_N": 128, "num_stages": 2, "bogus": 1}')
    cfg = ta.prefill_config(128, torch.bfloat16, 16)
    assert cfg["BLOCK_N"] == 128 and cfg["num_stages"] == 2 and "bogus" not in cfg


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


@pytest.mark.parametrize("pack,page", [(2, 16), (4, 32)])
def test_prefill_gqa_packing(pack, page):
    # `pack` query heads of a kv head share a tile (rows interleave positions and heads):
    # the ragged batch of test_prefill, group 4
    run_prefill([17, 1, 30, 0], [17, 40, 97, 5], hkv=2, group=4, head_dim=64, page=page,
                dtype=torch.float16, block_m=32, block_n=32, pack=pack)


def test_prefill_pack_must_divide_the_group():
    with pytest.raises(ValueError, match="pack"):
        run_prefill([5], [5], hkv=1, group=3, head_dim=64, page=16, dtype=torch.float16,
                    block_m=32, block_n=32, pack=2)


@pytest.mark.parametrize("cache_dtype", [None, FP8])
def test_prefill_tma_descriptors(cache_dtype):
    # pages of 32 = BLOCK_N: K/V tiles through 2-D tensor descriptors, the last page of each
    # sequence partly NaN (zeroed before P @ V on the diagonal)
    scales = (0.05, 0.03) if cache_dtype == FP8 else (1.0, 1.0)
    run_prefill([17, 1, 30], [17, 40, 97], hkv=2, group=2, head_dim=64, page=32, dtype=torch.float16,
                cache_dtype=cache_dtype, k_scale=scales[0], v_scale=scales[1], block_m=16, block_n=32,
                use_tma=True)


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

    fp8 = sys.argv[1] == "fp8"
    dec = ta.decode_config(D, torch.float8_e4m3fn if fp8 else torch.bfloat16, torch.bfloat16)
    cache = torch.float8_e4m3fn if fp8 else torch.bfloat16
    pre = ta.prefill_config(D, torch.bfloat16, PAGE, cache)
    pre128 = ta.prefill_config(D, torch.bfloat16, 128, cache)
    decode_types = dict(Q=ptr("bf16"), K=ptr(dtype), V=ptr(dtype), BT=ptr("i32"), SL=ptr("i32"),
                        Out=ptr("bf16"), PartAcc=ptr("fp32"), PartM=ptr("fp32"), PartL=ptr("fp32"),
                        Counters=ptr("i32"), QOut=ptr("fp8e4nv"), QScale=ptr("fp32"),
                        qk_scale="fp32", v_scale="fp32", q_fold="fp32")
    decode_consts = dict(NUM_KV_HEADS=8, GROUP=GROUP, GROUP_PAD=16, MERGE_HEADS=GROUP, HEAD_DIM=D, PAGE=PAGE,
                         BLOCK_N=dec["BLOCK_N"], SPLIT=True, SPLITS_PAD=8, DOT_PREC="tf32", F16_MATH=fp8,
                         QUANT_OUT=False, ROW_PAD=4096, INTERP=False)
    jobs = [
        (ta._paged_decode_kernel,
         decode_types,
         decode_consts,
         dec["num_warps"], dec["num_stages"]),
        (ta._paged_decode_kernel,
         decode_types,
         dict(decode_consts, PAGE=128, SPLIT=False),
         dec["num_warps"], dec["num_stages"]),
        # the FP8 engine's o-projection input: splits merged and quantized in the epilogue,
        # launched with PDL as at batch 1
        (ta._paged_decode_kernel, decode_types, dict(decode_consts, QUANT_OUT=True, PDL=True),
         dec["num_warps"], dec["num_stages"]),
        (ta._paged_prefill_kernel,
         dict(Q=ptr("bf16"), K=ptr(dtype), V=ptr(dtype), KD=ptr(dtype), VD=ptr(dtype), BT=ptr("i32"),
              SL=ptr("i32"), QSL=ptr("i32"), Out=ptr("bf16"), qk_scale="fp32", v_scale="fp32"),
         dict(NUM_KV_HEADS=8, GROUP=GROUP, HEAD_DIM=D, PAGE=PAGE, BLOCK_M=pre["BLOCK_M"],
              BLOCK_N=pre["BLOCK_N"], SEARCH_ITERS=2, DOT_PREC="tf32", USE_TMA=False, PACK=pre.get("PACK", 1)),
         pre["num_warps"], pre["num_stages"]),
        # pages of 128: K/V tiles through TMA descriptors
        (ta._paged_prefill_kernel,
         dict(Q=ptr("bf16"), K=ptr(dtype), V=ptr(dtype), BT=ptr("i32"), SL=ptr("i32"),
              QSL=ptr("i32"), Out=ptr("bf16"), qk_scale="fp32", v_scale="fp32",
              KD=f"tensordesc<{dtype}[{pre128['BLOCK_N']},{D}]>", VD=f"tensordesc<{dtype}[{pre128['BLOCK_N']},{D}]>"),
         dict(NUM_KV_HEADS=8, GROUP=GROUP, HEAD_DIM=D, PAGE=128, BLOCK_M=pre128["BLOCK_M"],
              BLOCK_N=pre128["BLOCK_N"], SEARCH_ITERS=2, DOT_PREC="tf32", USE_TMA=True),
         pre128["num_warps"], pre128["num_stages"]),
    ]
    # many short sequences: the small 2-warp programs (FP8 pages only; for bf16 the same config again)
    small = ta.decode_config(D, cache, torch.bfloat16, programs=ta.DECODE_SMALL_TILES_MIN_PROGRAMS)
    jobs.append((ta._paged_decode_kernel, jobs[0][1],
                 dict(jobs[0][2], BLOCK_N=small["BLOCK_N"], SPLIT=False), small["num_warps"], small["num_stages"]))
    for fn, types, constexprs, warps, stages in jobs:
        signature = sig(fn, types)
        for name in constexprs:
            signature[name] = "constexpr"
        # what the JIT specializes at a real launch: 16-byte aligned pointers, strides that
        # are multiples of 16 (everything but the block-table stride and num_seqs here)
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name not in constexprs
                 and name not in ("stride_bt", "num_seqs", "num_splits", "qk_scale", "v_scale", "q_fold",
                                  "KD", "VD", "seq_counters")}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        cfg = dec if fn is ta._paged_decode_kernel else pre if constexprs.get("PAGE") == PAGE else pre128
        opts = dict(maxnreg=cfg["maxnreg"]) if cfg.get("maxnreg") else {}
        k = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages, **opts))
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
    assert res.stdout.count(" ok ") == 6, res.stdout


def test_registered_as_cuda_kernels():
    import trtllm_kernels.kernels  # noqa: F401  (registers the kernels)
    from trtllm_kernels._library import cuda_kernel

    assert cuda_kernel("paged_attention_decode") is ta.paged_attention_decode_cuda
    assert cuda_kernel("paged_attention_prefill") is ta.paged_attention_prefill_cuda


# ------------------------------------------------------------------------------------------
# GPU tests (pytest -m gpu on the GPU machine)
# ------------------------------------------------------------------------------------------

BF16, FP16 = torch.bfloat16, torch.float16


def lens_upto(batch, ctx, gen):
    """`batch` lengths in [1, ctx], the longest exactly ctx and (batch > 2) one of length 1."""
    if batch == 1:
        return [ctx]
    lens = torch.randint(1, ctx + 1, (batch,), generator=gen).tolist()
    lens[0] = ctx
    if batch > 2:
        lens[1] = 1
    return lens


# batch, ctx, hkv, group, head_dim, page, dtype, cache dtype (None = q's)
GPU_DECODE = [
    (1, 1, 2, 1, 128, 16, BF16, None),
    (1, 17, 2, 3, 64, 32, FP16, None),
    (7, 97, 2, 4, 128, 64, BF16, None),
    (3, 4095, 2, 1, 64, 64, FP16, None),
    (64, 4095, 8, 4, 128, 16, BF16, None),     # the main decode shape (32 / 8 heads)
    (256, 512, 8, 4, 128, 16, BF16, None),     # many short sequences: no split
    (256, 97, 2, 8, 128, 32, FP16, None),
    (4, 32768, 8, 4, 128, 16, BF16, None),     # few long sequences: split-KV
    (1, 32768, 1, 8, 64, 64, FP16, None),
    (2, 4095, 4, 3, 128, 32, torch.float32, None),
    (16, 4095, 8, 4, 128, 16, BF16, FP8),
    (256, 300, 8, 4, 128, 16, BF16, FP8),       # 2048 programs: the small 2-warp FP8 programs
    (256, 1500, 8, 4, 128, 32, BF16, FP8),      # the same, 6 stages (the 1000/1000 run's decode)
    (300, 130, 8, 4, 128, 64, BF16, FP8),
    (2, 32768, 4, 8, 128, 64, BF16, FP8),
    (33, 97, 3, 3, 64, 16, FP16, FP8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch,ctx,hkv,group,head_dim,page,dtype,cache_dtype", GPU_DECODE)
def test_gpu_decode(batch, ctx, hkv, group, head_dim, page, dtype, cache_dtype):
    gen = torch.Generator().manual_seed(batch * 7919 + ctx)
    scales = (0.04, 0.03) if cache_dtype == FP8 else (1.0, 1.0)
    run_decode(lens_upto(batch, ctx, gen), hkv, group, head_dim, page, dtype, cache_dtype, *scales)


@pytest.mark.gpu
@pytest.mark.parametrize("f16_math,block_n,maxnreg", [(False, 128, 168), (True, 64, 128), (True, 128, None)])
def test_gpu_decode_fp8_variants(f16_math, block_n, maxnreg):
    # FP8 pages converted to bf16 or to fp16 (q pre-scaled), large q to stress the fp16 range
    run_decode([1, 17, 97, 4095, 2048], 2, 4, 128, 16, BF16, FP8, 0.04, 0.03, q_mult=8.0,
               f16_math=f16_math, block_n=block_n, maxnreg=maxnreg)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3, 16, 64])
def test_gpu_decode_forced_splits(num_splits):
    run_decode([1, 17, 97, 4095, 2048], 2, 4, 128, 16, BF16, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("lens,num_splits", [([192], None), ([4095], None), ([1, 97, 0, 300, 64, 5, 2000], 3),
                                             ([4095] * 64, None), ([300] * 256, None)])
def test_gpu_decode_quant_out(lens, num_splits):
    """The fp8 epilogue at the engine's shapes (32 / 8 heads, D 128, batch 1 with its one-tile
    splits, a padded row of length 0): the bits of the unfused output quantized per token, and
    the registered op takes the same path."""
    import trtllm_kernels as tk
    from trtllm_kernels.fp8 import _quantize_per_token_ref

    kc, vc, bt, sl = make_cache([max(n, 1) for n in lens], 8, 128, 16, BF16)
    sl.copy_(torch.tensor(lens, dtype=torch.int32))
    q = torch.randn(len(lens), 32, 128, device=DEV, dtype=BF16)
    out = torch.full_like(q, float("nan"))
    ta.triton_paged_decode(q, kc, vc, bt, sl, out=out, num_splits=num_splits, poison_scratch=True)
    got, scale = ta.triton_paged_decode(q, kc, vc, bt, sl, num_splits=num_splits, poison_scratch=True,
                                        quant_out=True)
    want, want_scale = _quantize_per_token_ref(out.reshape(len(lens), -1), 0)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)) and torch.equal(scale, want_scale)
    live = sl > 0
    assert_close(out[live], _decode_ref(q[live].float(), kc.float(), vc.float(), bt[live], sl[live],
                                        128 ** -0.5, 1.0, 1.0), BF16)
    assert (out[~live] == 0).all()
    if num_splits is None:
        op_q, op_s = tk.paged_attention_decode_quant_fp8(q, kc, vc, bt, sl)
        assert torch.equal(op_q.view(torch.uint8), got.view(torch.uint8)) and torch.equal(op_s, scale)


# q_lens, seq_lens, hkv, group, head_dim, page, dtype, cache dtype
GPU_PREFILL = [
    ([4096] * 4, [4096] * 4, 2, 4, 128, 16, BF16, None),            # the main prefill shape
    ([1000, 1, 517, 0, 64], [3000, 300, 517, 7, 64], 2, 3, 128, 32, FP16, None),  # chunked / prefix
    ([129, 129] + [1] * 30, [2000, 129] + list(range(1, 31)), 8, 1, 64, 64, BF16, None),
    ([1024], [32768], 1, 8, 128, 64, BF16, None),                     # long cached prefix
    ([777, 1, 33], [5000, 4095, 97], 1, 8, 128, 16, BF16, FP8),
    ([300, 17], [300, 400], 2, 4, 64, 32, FP16, FP8),
    ([200, 3], [250, 3], 2, 2, 128, 16, torch.float32, None),
    ([4095, 1, 300], [4095, 4000, 1000], 2, 4, 128, 128, BF16, None),  # TMA, BLOCK_N <= page
    ([513, 97], [4097, 97], 8, 4, 128, 64, BF16, FP8),                 # TMA on FP8 pages
    ([128] * 6 + [1, 50], [128] * 6 + [300, 700], 2, 4, 128, 32, BF16, FP8),  # serving: FP8, PACK 4
]


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens,seq_lens,hkv,group,head_dim,page,dtype,cache_dtype", GPU_PREFILL)
def test_gpu_prefill(q_lens, seq_lens, hkv, group, head_dim, page, dtype, cache_dtype):
    scales = (0.04, 0.03) if cache_dtype == FP8 else (1.0, 1.0)
    run_prefill(q_lens, seq_lens, hkv, group, head_dim, page, dtype, cache_dtype, *scales)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n,num_warps,num_stages,maxnreg", [
    (64, 64, 4, 3, None), (128, 128, 8, 3, None), (128, 32, 4, 2, None), (128, 64, 8, 3, 128),
    (128, 128, 8, 2, None)])
def test_gpu_prefill_other_tiles(block_m, block_n, num_warps, num_stages, maxnreg):
    run_prefill([333, 1, 64], [1000, 70, 64], 2, 4, 128, 32, BF16, block_m=block_m,
                block_n=block_n, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


def _graph_inputs(seq_lens, q_lens, hkv=2, group=4, d=128, page=16, dtype=BF16):
    kc, vc, bt, sl = make_cache(seq_lens, hkv, d, page, dtype, extra_cols=3, spare_blocks=8)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32, device=DEV)
    qsl[1:] = torch.tensor(q_lens, device=DEV).cumsum(0)
    qd = torch.randn(len(seq_lens), hkv * group, d, device=DEV, dtype=dtype)
    qp = torch.randn(sum(q_lens), hkv * group, d, device=DEV, dtype=dtype)
    return qd, qp, kc, vc, bt, sl, qsl


def _dispatched_prefill(q, kc, vc, bt, sl, qsl):
    """The kernel the registered prefill op runs for these inputs (Gluon on Hopper, else Triton)."""
    if ta.prefill_backend(q, kc, vc) == "gluon":
        from trtllm_kernels.kernels.gluon_attention import gluon_paged_prefill

        return gluon_paged_prefill(q, kc, vc, bt, sl, qsl)
    return ta.triton_paged_prefill(q, kc, vc, bt, sl, qsl)


@pytest.mark.gpu
def test_gpu_ops_dispatch():
    import trtllm_kernels
    import trtllm_kernels.kernels  # noqa: F401

    qd, qp, kc, vc, bt, sl, qsl = _graph_inputs([1, 97, 4095], [1, 50, 300])
    out = torch.ops.trtllm_kernels.paged_attention_decode(qd, kc, vc, bt, sl, 128 ** -0.5, 1.0, 1.0)
    assert torch.equal(out, ta.triton_paged_decode(qd, kc, vc, bt, sl))
    assert_close(out, _decode_ref(qd.float(), kc.float(), vc.float(), bt, sl, 128 ** -0.5, 1.0, 1.0), BF16)
    out = trtllm_kernels.paged_attention_prefill(qp, kc, vc, bt, sl, qsl)
    assert torch.equal(out, _dispatched_prefill(qp, kc, vc, bt, sl, qsl))
    assert_close(out, _prefill_ref(qp.float(), kc.float(), vc.float(), bt, sl, qsl, 128 ** -0.5, 1.0, 1.0), BF16)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    import trtllm_kernels
    import trtllm_kernels.kernels  # noqa: F401

    qd, qp, kc, vc, bt, sl, qsl = _graph_inputs([5, 97, 2000], [5, 20, 1])

    @torch.compile(fullgraph=True)
    def step(qd, qp, kc, vc, bt, sl, qsl):
        d = trtllm_kernels.paged_attention_decode(qd, kc, vc, bt, sl)
        p = trtllm_kernels.paged_attention_prefill(qp, kc, vc, bt, sl, qsl)
        return d * 2, p * 4  # exact in any dtype

    d, p = step(qd, qp, kc, vc, bt, sl, qsl)
    assert torch.equal(d, ta.triton_paged_decode(qd, kc, vc, bt, sl) * 2)
    assert torch.equal(p, _dispatched_prefill(qp, kc, vc, bt, sl, qsl) * 4)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 64])  # 64: the prefill's K/V tiles through TMA descriptors
def test_gpu_cuda_graph_capture_and_replay(page):
    """Capture decode + prefill once, then replay with new queries and longer sequences."""
    import trtllm_kernels
    import trtllm_kernels.kernels  # noqa: F401

    qd, qp, kc, vc, bt, sl, qsl = _graph_inputs([17, 97, 300], [1, 30, 300], page=page)
    scale = 128 ** -0.5

    def step():
        return (trtllm_kernels.paged_attention_decode(qd, kc, vc, bt, sl),
                trtllm_kernels.paged_attention_prefill(qp, kc, vc, bt, sl, qsl))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_d, out_p = step()

    # new inputs in the same buffers: new queries, longer sequences (within the block
    # table's spare columns), a different split of the prefill tokens
    qd.copy_(torch.randn_like(qd))
    qp.copy_(torch.randn_like(qp))
    max_len = bt.shape[1] * page
    new_lens = [min(17 + 40, max_len), min(97 + 40, max_len), 300]
    kc2, vc2, bt2, sl2 = make_cache(new_lens, kc.shape[1], 128, page, kc.dtype)
    assert bt2.shape[1] <= bt.shape[1] and kc2.shape[0] <= kc.shape[0]
    kc.fill_(float("nan"))
    vc.fill_(float("nan"))
    kc[: kc2.shape[0]] = kc2
    vc[: vc2.shape[0]] = vc2
    bt.fill_(kc2.shape[0])  # an all-NaN block past the new ones
    bt[:, : bt2.shape[1]] = bt2
    sl.copy_(sl2)
    qsl.copy_(torch.tensor([0, 10, 31, 331], dtype=torch.int32, device=DEV))  # q_lens 10, 21, 300
    g.replay()
    torch.cuda.synchronize()
    assert_close(out_d, _decode_ref(qd.float(), kc.float(), vc.float(), bt, sl, scale, 1.0, 1.0), BF16)
    # again into poisoned outputs: the splits' arrival counters were left at zero
    first = out_d.clone()
    out_d.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_d, first)
    assert_close(out_p, _prefill_ref(qp.float(), kc.float(), vc.float(), bt, sl, qsl, scale, 1.0, 1.0), BF16)
