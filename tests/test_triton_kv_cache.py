"""Triton KV-cache write, rotary embedding and the fused RoPE + cache write, against the references.

Without a GPU these run under the Triton interpreter (conftest sets TRITON_INTERPRET=1) at small
shapes on CPU tensors; tests marked `gpu` cover real sizes, dispatch through the registered ops,
torch.compile and CUDA-graph capture. Caches start as NaN (written slots must be exactly the
reference's, every other slot must stay NaN), outputs start as NaN (all must be written), and q /
k / v are strided views of one fused qkv tensor, as the model hands them over.
"""
from __future__ import annotations

import pytest
import torch

from trtllm_kernels.kernels import triton_kv_cache as tkv
from trtllm_kernels.kv_cache import _rope_and_write_kv_cache_ref, _write_kv_cache_ref
from trtllm_kernels.rotary import _rotary_ref, rope_cos_sin_cache

FP8 = torch.float8_e4m3fn
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(tokens, hq, hkv, d, page, dtype, cache_dtype=None, pad_every=0, max_pos=4096,
                device=DEV):
    """A fused qkv [T, (hq + 2 hkv) * D] split into q, k, v views; NaN caches with spare blocks;
    distinct random slots (every `pad_every`-th token -1)."""
    cache_dtype = cache_dtype or dtype
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device=device).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(tokens, hq, d), k.view(tokens, hkv, d), v.reshape(tokens, hkv, d)
    num_blocks = 2 * (-(-tokens // page)) + 1
    kc = torch.full((num_blocks, hkv, page, d), float("nan"), device=device).to(cache_dtype)
    vc = kc.clone()
    slots = torch.randperm(num_blocks * page, device=device)[:tokens]
    if pad_every:
        slots[::pad_every] = -1
    positions = torch.randint(0, max_pos, (tokens,), device=device)
    cs = rope_cos_sin_cache(d, max_pos, 500000.0, device=device)
    return positions, q, k, v, cs, kc, vc, slots


def assert_same(out, ref, dtype):
    """Equal up to one rounding step of `dtype` (fp32 FMA contraction moves the last bit)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    nan = ref.float().isnan()
    assert torch.equal(out.float().isnan(), nan), "NaN pattern differs (a slot written or missed)"
    a, b = out.float()[~nan], ref.float()[~nan]
    if dtype == FP8:  # one e4m3 step: 2^-3 relative, or the subnormal step
        tol = b.abs() * 2 ** -3 + 2 ** -9
    else:
        tol = b.abs() * torch.finfo(dtype).eps + torch.finfo(dtype).tiny
    assert bool(((a - b).abs() <= tol).all()), f"max diff {float((a - b).abs().max()):.3g}"


def check_fused(tokens, hq, hkv, d, page, dtype, cache_dtype=None, pad_every=0, scales=(1.0, 1.0)):
    positions, q, k, v, cs, kc, vc, slots = make_inputs(tokens, hq, hkv, d, page, dtype, cache_dtype, pad_every)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = torch.full((tokens, hq, d), float("nan"), dtype=dtype, device=q.device)
    tkv.triton_rope_and_write_kv_cache(positions, q, k, v, cs, kc, vc, slots, *scales, out=out)
    q_ref = _rope_and_write_kv_cache_ref(positions, q, k, v, cs, kc_ref, vc_ref, slots, *scales)
    assert_same(out, q_ref, dtype)
    assert_same(kc, kc_ref, cache_dtype or dtype)
    assert_same(vc, vc_ref, cache_dtype or dtype)


# ------------------------------------------------------------------------------------------
# interpreter (CPU) tests; they also run on the GPU
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens,hq,hkv,d,page,dtype,pad_every", [
    (7, 6, 2, 64, 16, torch.float16, 3),   # odd count, GQA 3, padding slots
    (5, 4, 4, 32, 8, torch.float32, 0),
    (3, 3, 1, 48, 4, torch.float16, 2),    # D/2 = 24 is not a power of two, 3 heads padded to 4
])
def test_rope_and_write_kv_cache(tokens, hq, hkv, d, page, dtype, pad_every):
    check_fused(tokens, hq, hkv, d, page, dtype, pad_every=pad_every)


def test_rope_and_write_kv_cache_fp8():
    # large k so that some values saturate at +-448 after dividing by the scale
    check_fused(9, 4, 2, 64, 16, torch.float16, FP8, pad_every=4, scales=(0.004, 0.05))


def test_rotary_embedding():
    positions, q, k, _, cs, *_ = make_inputs(5, 6, 2, 64, 16, torch.float16)
    qo, ko = tkv.triton_rotary_embedding(positions, q, k, cs)
    q_ref, k_ref = _rotary_ref(positions, q, k, cs)
    assert_same(qo, q_ref, torch.float16)
    assert_same(ko, k_ref, torch.float16)


@pytest.mark.parametrize("cache_dtype,scales", [(None, (1.0, 1.0)), (FP8, (0.02, 0.5))])
def test_write_kv_cache(cache_dtype, scales):
    _, _, k, v, _, kc, vc, slots = make_inputs(11, 2, 2, 32, 8, torch.float32, cache_dtype, pad_every=5)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    tkv.triton_write_kv_cache(k, v, kc, vc, slots, *scales)
    _write_kv_cache_ref(k, v, kc_ref, vc_ref, slots, *scales)
    assert_same(kc, kc_ref, cache_dtype or torch.float32)
    assert_same(vc, vc_ref, cache_dtype or torch.float32)


def test_registered_as_cuda_kernels():
    import trtllm_kernels.kernels  # noqa: F401  (registers the kernels)
    from trtllm_kernels._library import cuda_kernel

    assert cuda_kernel("rope_and_write_kv_cache") is tkv.rope_and_write_kv_cache_cuda
    assert cuda_kernel("rotary_embedding") is tkv.rotary_embedding_cuda
    assert cuda_kernel("write_kv_cache") is tkv.write_kv_cache_cuda


def test_kernel_compiles_for_sm90():
    """Lower the fused kernel for Hopper at the Llama-3.1-8B shape with an FP8 cache."""
    import subprocess
    import sys
    import os

    script = (
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from trtllm_kernels.kernels import triton_kv_cache as m\n"
        "fn = m._rope_kv_kernel\n"
        "types = dict(POS='*i64', Q='*bf16', K='*bf16', V='*bf16', CS='*fp32', QO='*bf16', KO='*bf16',\n"
        "             KC='*fp8e4nv', VC='*fp8e4nv', SLOT='*i64', k_scale='fp32', v_scale='fp32')\n"
        "ce = dict(NUM_Q_HEADS=32, NUM_KV_HEADS=8, HQ_PAD=32, HKV_PAD=8, HALF=64, HALF_PAD=64, PAGE=16,\n"
        "          ROPE=True, WRITE=True, K_FP8=True, V_FP8=True)\n"
        "sig = {n: ('constexpr' if n in ce else types.get(n, 'i32')) for n in fn.arg_names}\n"
        "k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=ce),\n"
        "                   target=GPUTarget('cuda', 90, 32), options=dict(num_warps=4))\n"
        "assert k.asm.get('cubin')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-4000:]


# ------------------------------------------------------------------------------------------
# GPU tests (pytest -m gpu on the GPU machine)
# ------------------------------------------------------------------------------------------

BF16 = torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,hq,hkv,d,page,dtype,cache_dtype,pad_every", [
    (1, 32, 8, 128, 16, BF16, None, 0),
    (97, 32, 8, 128, 16, BF16, None, 7),
    (4096, 32, 8, 128, 64, BF16, None, 0),
    (257, 9, 3, 64, 32, torch.float16, None, 5),
    (33, 8, 8, 128, 16, torch.float32, None, 0),
    (1000, 32, 8, 128, 16, BF16, FP8, 9),
    (17, 12, 4, 80, 16, torch.float16, FP8, 0),  # D/2 = 40: masked half-tiles
])
def test_gpu_rope_and_write_kv_cache(tokens, hq, hkv, d, page, dtype, cache_dtype, pad_every):
    scales = (0.02, 0.03) if cache_dtype == FP8 else (1.0, 1.0)
    check_fused(tokens, hq, hkv, d, page, dtype, cache_dtype, pad_every, scales)


@pytest.mark.gpu
def test_gpu_ops_dispatch_compile_and_graph():
    """The three ops through torch.ops (torch.compile fullgraph and a CUDA-graph replay)."""
    import trtllm_kernels  # noqa: F401
    import trtllm_kernels.kernels  # noqa: F401
    from trtllm_kernels.kv_cache import rope_and_write_kv_cache, write_kv_cache
    from trtllm_kernels.rotary import rotary_embedding

    positions, q, k, v, cs, kc, vc, slots = make_inputs(64, 32, 8, 128, 16, BF16, FP8, pad_every=10)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = _rope_and_write_kv_cache_ref(positions, q, k, v, cs, kc_ref, vc_ref, slots, 0.02, 0.03)

    @torch.compile(fullgraph=True)
    def fused(positions, q, k, v, cs, kc, vc, slots):
        return rope_and_write_kv_cache(positions, q, k, v, cs, kc, vc, slots, 0.02, 0.03) * 2

    out = fused(positions, q, k, v, cs, kc, vc, slots)
    assert_same(out / 2, q_ref, BF16)
    assert_same(kc, kc_ref, FP8)
    assert_same(vc, vc_ref, FP8)

    qo, ko = rotary_embedding(positions, q, k, cs)
    q2, k2 = _rotary_ref(positions, q, k, cs)
    assert_same(qo, q2, BF16)
    assert_same(ko, k2, BF16)

    # capture the plain write and replay it with new values in the same buffers
    kc.fill_(float("nan"))
    vc.fill_(float("nan"))
    write_kv_cache(k, v, kc, vc, slots, 0.02, 0.03)  # warm up (compile) outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        write_kv_cache(k, v, kc, vc, slots, 0.02, 0.03)
    k.copy_(torch.randn_like(k))
    v.copy_(torch.randn_like(v))
    g.replay()
    torch.cuda.synchronize()
    kc_ref.fill_(float("nan"))
    vc_ref.fill_(float("nan"))
    _write_kv_cache_ref(k, v, kc_ref, vc_ref, slots, 0.02, 0.03)
    assert_same(kc, kc_ref, FP8)
    assert_same(vc, vc_ref, FP8)
