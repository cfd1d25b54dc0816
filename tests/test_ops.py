"""The op contract on CPU: every trtllm_kernels:: op against an independent formulation of the
same math, opcheck on a representative case, and clear errors for bad arguments."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import trtllm_kernels as tk
from trtllm_kernels import _library

OPS = torch.ops.trtllm_kernels


def test_every_op_has_an_opcheck_case():
    """opcheck checks the schema and the fake kernel; every defined op must be covered."""
    assert {op.__name__ for op, *_ in _opcheck_cases()} == set(_library.defined_ops())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (7, 576), (3, 5, 64)])
def test_rms_norm(shape, dtype):
    x, w = torch.randn(shape, dtype=dtype), torch.randn(shape[-1], dtype=dtype)
    expect = F.rms_norm(x.float(), (shape[-1],), w.float(), eps=1e-5).to(dtype)
    torch.testing.assert_close(tk.rms_norm(x, w, 1e-5), expect)
    r = torch.randn(shape, dtype=dtype)
    out, res = tk.fused_add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(res, (x.float() + r.float()).to(dtype))
    torch.testing.assert_close(out, F.rms_norm(res.float(), (shape[-1],), w.float(), eps=1e-5).to(dtype))


def test_silu_and_mul_and_linear():
    x = torch.randn(5, 2 * 48)
    torch.testing.assert_close(tk.silu_and_mul(x), x[:, :48] * torch.sigmoid(x[:, :48]) * x[:, 48:])
    w, b = torch.randn(17, 48), torch.randn(17)
    y = torch.randn(3, 48)
    torch.testing.assert_close(tk.linear(y, w, b), y @ w.T + b)
    with pytest.raises(ValueError, match="even"):
        tk.silu_and_mul(torch.randn(3, 5))
    with pytest.raises(ValueError, match="weight must be"):
        tk.linear(y, torch.randn(17, 47))


def test_rotary_matches_complex_rotation():
    T, H, D = 9, 4, 16
    positions = torch.randint(0, 100, (T,))
    q, k = torch.randn(T, H, D), torch.randn(T, 2, D)
    cache = tk.rope_cos_sin_cache(D, 128, theta=10000.0)
    q2, k2 = tk.rotary_embedding(positions, q, k, cache)
    # Independent formulation: pairs (x[i], x[i + D/2]) as complex numbers times e^{i p f}.
    freqs = 1.0 / 10000.0 ** (torch.arange(0, D, 2).double() / D)
    rot = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), positions[:, None].double() * freqs)
    for x, y in ((q, q2), (k, k2)):
        z = torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double()) * rot[:, None]
        torch.testing.assert_close(y.double(), torch.cat([z.real, z.imag], -1), atol=1e-5, rtol=1e-5)


def test_llama3_rope_scaling_keeps_high_frequencies():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base = tk.rotary.rope_inv_freq(128, 500000.0)
    scaled = tk.rotary.rope_inv_freq(128, 500000.0, scaling)
    assert torch.equal(scaled[:8], base[:8])  # short wavelengths untouched
    torch.testing.assert_close(scaled[-4:], base[-4:] / 8)  # long ones divided by the factor
    with pytest.raises(ValueError, match="yarn"):
        tk.rotary.rope_inv_freq(128, 1e4, {"rope_type": "yarn"})


def make_paged_cache(k, v, page, num_blocks_extra=3, dtype=None):
    """Contiguous per-sequence K/V lists [Hkv, L, D] -> a NaN-filled paged cache whose blocks
    are handed out in random order, with the block tables and lengths."""
    Hkv, D = k[0].shape[0], k[0].shape[2]
    need = [-(-x.shape[1] // page) for x in k]
    total = sum(need) + num_blocks_extra
    dtype = dtype or k[0].dtype
    kc = torch.full((total, Hkv, page, D), float("nan"), dtype=k[0].dtype)
    vc = kc.clone()
    perm = torch.randperm(total).tolist()
    tables = []
    for ks, vs, n in zip(k, v, need):
        blocks = [perm.pop() for _ in range(n)]
        tables.append(blocks + [0] * (max(need) - n))
        slots = torch.tensor([blocks[p // page] * page + p % page for p in range(ks.shape[1])])
        tk.write_kv_cache(ks.transpose(0, 1), vs.transpose(0, 1), kc, vc, slots)
    return kc, vc, torch.tensor(tables, dtype=torch.int32), torch.tensor([x.shape[1] for x in k], dtype=torch.int32)


def sdpa_reference(q, k, v, causal_offset):
    """q [Hq, Lq, D], k/v [Hkv, L, D]; query j sits at position causal_offset + j."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0).double(), v.repeat_interleave(group, 0).double()
    mask = torch.arange(k.shape[1])[None, :] <= (causal_offset + torch.arange(q.shape[1]))[:, None]
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask)


@pytest.mark.parametrize("page", [4, 16])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_paged_attention_prefill_and_decode(page, heads):
    Hq, Hkv, D = *heads, 32
    lens, qlens = [1, 17, 40, 9], [1, 5, 40, 1]  # a decode, a chunk over a cached prefix, a full prefill
    k = [torch.randn(Hkv, n, D) for n in lens]
    v = [torch.randn(Hkv, n, D) for n in lens]
    kc, vc, tables, seq_lens = make_paged_cache(k, v, page)
    q = torch.randn(sum(qlens), Hq, D)
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    out = tk.paged_attention_prefill(q, kc, vc, tables, seq_lens, qsl)
    for i, (n, m) in enumerate(zip(lens, qlens)):
        qi = q[qsl[i]:qsl[i + 1]].transpose(0, 1)
        expect = sdpa_reference(qi, k[i], v[i], n - m).transpose(0, 1)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]].double(), expect, atol=1e-5, rtol=1e-5)
    # Decode on the same cache: the last query of every sequence.
    qd = torch.randn(len(lens), Hq, D)
    outd = tk.paged_attention_decode(qd, kc, vc, tables, seq_lens)
    for i, n in enumerate(lens):
        expect = sdpa_reference(qd[i][:, None], k[i], v[i], n - 1)[:, 0]
        torch.testing.assert_close(outd[i].double(), expect, atol=1e-5, rtol=1e-5)
    assert not out.isnan().any() and not outd.isnan().any()


def test_fp8_kv_cache_round_trip():
    k, v = torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    kc = torch.full((4, 2, 8, 16), float("nan")).to(torch.float8_e4m3fn)
    vc = kc.clone()
    slots = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 11, -1])  # the last token is padding
    tk.write_kv_cache(k, v, kc, vc, slots, k_scale=0.05, v_scale=0.1)
    for cache, x, scale in ((kc, k, 0.05), (vc, v, 0.1)):
        got = torch.stack([cache[s // 8, :, s % 8].float() * scale for s in slots[:9].tolist()])
        torch.testing.assert_close(got, x[:9], atol=scale * 2 ** -6, rtol=2 ** -3)
        assert cache.float().isnan().all(dim=-1).sum() == 4 * 2 * 8 - 9 * 2  # nothing else written


def test_attention_rejects_bad_arguments():
    kc = torch.zeros(4, 2, 8, 16)
    q = torch.randn(3, 4, 16)
    tables = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        tk.paged_attention_decode(q, kc, kc, tables.long(), torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple"):
        tk.paged_attention_decode(torch.randn(3, 3, 16), kc, kc, tables, torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="query_start_loc"):
        tk.paged_attention_prefill(q, kc, kc, tables, torch.ones(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))


def _opcheck_cases():
    kc = torch.randn(6, 2, 4, 16)
    vc = torch.randn(6, 2, 4, 16)
    tables = torch.tensor([[0, 1, 2], [3, 4, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([9, 6], dtype=torch.int32)
    return [
        (OPS.rms_norm, (torch.randn(3, 8), torch.randn(8), 1e-6)),
        (OPS.fused_add_rms_norm, (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), 1e-6)),
        (OPS.silu_and_mul, (torch.randn(3, 8),)),
        (OPS.linear, (torch.randn(3, 8), torch.randn(5, 8), None)),
        (OPS.rotary_embedding, (torch.tensor([0, 5, 7]), torch.randn(3, 4, 16), torch.randn(3, 2, 16),
                                tk.rope_cos_sin_cache(16, 8))),
        (OPS.write_kv_cache, (torch.randn(3, 2, 16), torch.randn(3, 2, 16), kc.clone(), vc.clone(),
                              torch.tensor([0, 5, 9]), 1.0, 1.0)),
        (OPS.rope_and_write_kv_cache, (torch.tensor([0, 5, 7]), torch.randn(3, 4, 16), torch.randn(3, 2, 16),
                                       torch.randn(3, 2, 16), tk.rope_cos_sin_cache(16, 8), kc.clone(), vc.clone(),
                                       torch.tensor([0, 5, -1]), 1.0, 1.0)),
        (OPS.paged_attention_decode, (torch.randn(2, 4, 16), kc, vc, tables, seq_lens, 0.25, 1.0, 1.0)),
        (OPS.paged_attention_decode_quant_fp8, (torch.randn(2, 16, 16), kc, vc, tables, seq_lens, 0.25, 1.0, 1.0)),
        (OPS.paged_attention_prefill, (torch.randn(5, 4, 16), kc, vc, tables, seq_lens,
                                       torch.tensor([0, 3, 5], dtype=torch.int32), 0.25, 1.0, 1.0)),
    ] + _fp8_opcheck_cases() + _fp4_opcheck_cases()


def _fp8_opcheck_cases():
    """trtllm_kernels/fp8.py (issue 4)."""
    def q(*shape):
        return (torch.randn(*shape) * 10).to(torch.float8_e4m3fn)

    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    s3, s1 = torch.rand(3, 1) + 0.1, torch.rand(1) + 0.1
    # CPU torch has no allclose for fp8, which opcheck's schema test runs on the inputs
    fp8_in = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    return [
        (OPS.fp8_quantize_per_tensor, (torch.randn(3, 8), None)),
        (OPS.fp8_quantize_per_token, (torch.randn(3, 200), 128)),
        (OPS.fp8_quantize_block, (torch.randn(5, 8), 128)),
        (OPS.fp8_gemm, (q(3, 8), q(5, 8), s3, torch.rand(5, 1), None, torch.bfloat16), fp8_in),
        (OPS.fp8_gemm_silu_mul, (q(3, 8), q(4, 8), s3, s1, True, torch.float32), fp8_in),
        (OPS.fused_mlp_fp8, (q(3, 8), s3, q(4, 8), s1, q(8, 2), torch.rand(8, 1), True, torch.float32), fp8_in),
        (OPS.rms_norm_quant_fp8, (x, r, w, 1e-6)),
        # trtllm_kernels/mlp.py: the bf16 fused MLP
        (OPS.gemm_silu_mul, (torch.randn(3, 8), torch.randn(6, 8))),
        (OPS.fused_mlp, (torch.randn(3, 8), torch.randn(6, 8), torch.randn(8, 3))),
    ]


def _fp4_opcheck_cases():
    """trtllm_kernels/fp4.py (issue 5); NVFP4's float8 scales skip the schema test as above."""
    w = torch.randn(5, 64)
    pn, sn, gn = tk.quantize_nvfp4(w)
    pm, sm = tk.quantize_mxfp4(w)
    fp8_in = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    return [
        (OPS.fp4_quantize_nvfp4, (w,), fp8_in),
        (OPS.fp4_quantize_mxfp4, (w,)),
        (OPS.fp4_dequantize, (pm, sm, None, torch.bfloat16)),
        (OPS.fp4_gemm, (torch.randn(3, 64), pn, sn, gn), fp8_in),
        (OPS.fp4_gemm_w4a8, (torch.randn(3, 64, dtype=torch.bfloat16), pm, sm)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args, *test_utils = _opcheck_cases()[case]  # an optional third item: opcheck's test_utils
    opcheck(op, args, **({"test_utils": test_utils[0]} if test_utils else {}))
