"""FP8 (e4m3): quantization, GEMM with bf16 output, the fused MLP, and RMSNorm fused with
the residual add and an FP8 quantization of its output.

Format (also in docs/formats.md): values are `torch.float8_e4m3fn` (max 448, saturated on
the way in), scales are float32 and `x ~= q * scale`. Scale granularities:

| name      | of            | scale shape                          | used for                     |
| --------- | ------------- | ------------------------------------ | ---------------------------- |
| tensor    | anything      | [1]                                  | static activations, weights  |
| token     | x [M, K]      | [M, 1] (one per row)                 | dynamic activations          |
| group     | x [M, K]      | [M, cdiv(K, 128)] (1 x 128 groups)   | activations of block GEMMs   |
| channel   | w [N, K]      | [N, 1] (one per output channel)      | weights (the engine's choice)|
| block     | w [N, K]      | [cdiv(N, 128), cdiv(K, 128)]         | weights (DeepSeek-style)     |

Dynamic scales are `max(amax, 1e-12) / 448` of the values they cover, so the largest value
maps to 448 exactly. An FP8 GEMM takes A [M, K] (activations) and B [N, K] (weights, as
nn.Linear stores them, K contiguous: the layout Hopper's FP8 wgmma wants for both operands)
and returns (A * sa) @ (B * sb)^T in bf16 (or fp16/fp32), accumulated in fp32. A's scale may
be tensor, token or group; B's tensor, channel or block. The granularity is read from the
scale's shape, and every pairing is allowed. Group and block scales cover 128 columns of K.

Every op here has a plain-PyTorch reference that dequantizes to float32 and computes the
exact math (the test oracle and the CPU kernel), and a CUDA kernel in
`trtllm_kernels.kernels.triton_fp8`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._library import define_op

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_BLOCK = 128  # group / block scales cover 128 values of K (and 128 rows of N for blocks)
AMAX_MIN = 1e-12


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _saturate(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 x / scale -> fp8, saturating at +-448."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _dynamic_scale(amax: torch.Tensor) -> torch.Tensor:
    return amax.float().clamp_min(AMAX_MIN) / FP8_MAX


def expand_scale(scale: torch.Tensor, rows: int, cols: int, row_block: int = 1) -> torch.Tensor:
    """A scale of any granularity -> float32 [rows, cols], one factor per element.

    scale: [1] or [1, 1] (tensor), [rows, 1] (token / channel), [rows, cdiv(cols, 128)]
    (group: row_block 1) or [cdiv(rows, 128), cdiv(cols, 128)] (block: row_block 128).
    """
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(1, 1).expand(rows, cols)
    if s.dim() != 2:
        raise ValueError(f"scale must be [1] or 2-D, got shape {tuple(scale.shape)}")
    if s.shape == (rows, 1):
        return s.expand(rows, cols)
    want = (_cdiv(rows, row_block), _cdiv(cols, SCALE_BLOCK))
    if s.shape != want:
        raise ValueError(f"scale of shape {tuple(s.shape)} fits none of [1], [{rows}, 1], {list(want)}")
    s = s.repeat_interleave(SCALE_BLOCK, dim=1)[:, :cols]
    if row_block > 1:
        s = s.repeat_interleave(row_block, dim=0)[:rows]
    return s


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: bool = False) -> torch.Tensor:
    """fp8 q [..., K] and its scale -> float32. `block`: scale is [cdiv(N,128), cdiv(K,128)]
    of a 2-D weight (otherwise group / token / tensor scales of rows of q)."""
    q2 = q.reshape(-1, q.shape[-1]) if q.dim() != 2 else q
    s = scale.reshape(-1, scale.shape[-1]) if scale.dim() > 2 else scale
    out = q2.float() * expand_scale(s, q2.shape[0], q2.shape[1], SCALE_BLOCK if block else 1)
    return out.reshape(q.shape)


# ---------------------------------------------------------------------------------------------
# Quantization


def _quantize_per_tensor_ref(x: torch.Tensor, scale: torch.Tensor | None):
    xf = x.float()
    if scale is None:
        scale = _dynamic_scale(xf.abs().amax() if xf.numel() else xf.new_zeros(()))
    scale = scale.float().reshape(1).clone()
    return _saturate(xf, scale), scale


def _quantize_per_token_ref(x: torch.Tensor, group_size: int):
    xf = x.float()
    k = x.shape[-1]
    if group_size <= 0 or group_size >= k:
        scale = _dynamic_scale(xf.abs().amax(-1, keepdim=True)) if k else xf.new_ones(*x.shape[:-1], 1)
        if group_size > 0:
            scale = scale.expand(*x.shape[:-1], _cdiv(k, group_size)).contiguous()
        return _saturate(xf, scale[..., :1]), scale
    groups = _cdiv(k, group_size)
    pad = groups * group_size - k
    xp = F.pad(xf, (0, pad)).reshape(*x.shape[:-1], groups, group_size)
    scale = _dynamic_scale(xp.abs().amax(-1))
    q = _saturate(xp, scale[..., None]).reshape(*x.shape[:-1], groups * group_size)[..., :k]
    return q.contiguous(), scale


def _quantize_block_ref(w: torch.Tensor, block: int):
    n, k = w.shape
    nb, kb = _cdiv(n, block), _cdiv(k, block)
    wp = F.pad(w.float(), (0, kb * block - k, 0, nb * block - n))
    tiles = wp.reshape(nb, block, kb, block)
    scale = _dynamic_scale(tiles.abs().amax(dim=(1, 3)))
    q = _saturate(tiles, scale[:, None, :, None]).reshape(nb * block, kb * block)[:n, :k]
    return q.contiguous(), scale


_quantize_per_tensor = define_op(
    "fp8_quantize_per_tensor(Tensor x, Tensor? scale) -> (Tensor, Tensor)",
    _quantize_per_tensor_ref,
    lambda x, scale: (torch.empty_like(x, dtype=FP8), x.new_empty(1, dtype=torch.float32)),
)
_quantize_per_token = define_op(
    "fp8_quantize_per_token(Tensor x, int group_size) -> (Tensor, Tensor)",
    _quantize_per_token_ref,
    lambda x, group_size: (
        torch.empty_like(x, dtype=FP8),
        x.new_empty(*x.shape[:-1], _cdiv(x.shape[-1], group_size) if group_size > 0 else 1,
                    dtype=torch.float32),
    ),
)
_quantize_block = define_op(
    "fp8_quantize_block(Tensor w, int block) -> (Tensor, Tensor)",
    _quantize_block_ref,
    lambda w, block: (torch.empty_like(w, dtype=FP8),
                      w.new_empty(_cdiv(w.shape[0], block), _cdiv(w.shape[1], block), dtype=torch.float32)),
)


def quantize_fp8_per_tensor(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, fp32/fp16/bf16) -> (q fp8 of x's shape, scale fp32 [1]).

    scale given (a [1] or 0-d fp32 tensor): static quantization with it; None: dynamic,
    amax(|x|) / 448 (a reduction over the whole tensor before the quantizing pass).
    """
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"a per-tensor scale has one element, got shape {tuple(scale.shape)}")
    return _quantize_per_tensor(x, scale)


def quantize_fp8_per_token(x: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (row) quantization of activations x [..., K].

    group_size 0: one scale per row, scale [..., 1]. group_size g > 0: one scale per
    1 x g group of each row, scale [..., cdiv(K, g)] (g = 128 feeds a block-scaled GEMM).
    Returns (q fp8 of x's shape, scale fp32).
    """
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0, got {group_size}")
    return _quantize_per_token(x, group_size)


def quantize_fp8_block(w: torch.Tensor, block: int = SCALE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """128 x 128 block quantization of a 2-D weight w [N, K] -> (q fp8 [N, K], scale fp32
    [cdiv(N, block), cdiv(K, block)]). The GEMM kernels take block = 128 only."""
    if w.dim() != 2:
        raise ValueError(f"block quantization takes a 2-D weight, got shape {tuple(w.shape)}")
    return _quantize_block(w, block)


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel weight quantization, w [N, K] -> (q fp8 [N, K], scale fp32 [N, 1])."""
    if w.dim() != 2:
        raise ValueError(f"per-channel quantization takes a 2-D weight, got shape {tuple(w.shape)}")
    return _quantize_per_token(w, 0)


# ---------------------------------------------------------------------------------------------
# GEMM


def _dequant_a(a, a_scale):
    return a.float() * expand_scale(a_scale, a.shape[0], a.shape[1], 1)


def _dequant_b(b, b_scale):
    return b.float() * expand_scale(b_scale, b.shape[0], b.shape[1], SCALE_BLOCK)


def _fp8_gemm_ref(a, b, a_scale, b_scale, bias, out_dtype):
    out = _dequant_a(a, a_scale) @ _dequant_b(b, b_scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _fp8_gemm_fake(a, b, a_scale, b_scale, bias, out_dtype):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


_fp8_gemm = define_op(
    "fp8_gemm(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
    _fp8_gemm_ref, _fp8_gemm_fake,
)


def _silu_mul_f32(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def _fp8_gemm_silu_mul_ref(a, b, a_scale, b_scale, quant_out, out_dtype):
    h = _silu_mul_f32(_dequant_a(a, a_scale) @ _dequant_b(b, b_scale).t())
    if quant_out:
        return _quantize_per_token_ref(h, SCALE_BLOCK)
    return h.to(out_dtype), h.new_empty(0)


def _fp8_gemm_silu_mul_fake(a, b, a_scale, b_scale, quant_out, out_dtype):
    inter = b.shape[0] // 2
    if quant_out:
        return (a.new_empty(a.shape[0], inter, dtype=FP8),
                a.new_empty(a.shape[0], _cdiv(inter, SCALE_BLOCK), dtype=torch.float32))
    return a.new_empty(a.shape[0], inter, dtype=out_dtype), a.new_empty(0, dtype=torch.float32)


_fp8_gemm_silu_mul = define_op(
    "fp8_gemm_silu_mul(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, bool quant_out, "
    "ScalarType out_dtype) -> (Tensor, Tensor)",
    _fp8_gemm_silu_mul_ref, _fp8_gemm_silu_mul_fake,
)


def _fused_mlp_fp8_ref(x, x_scale, w_gate_up, gate_up_scale, w_down, down_scale, quant_intermediate, out_dtype):
    h, h_scale = _fp8_gemm_silu_mul_ref(x, w_gate_up, x_scale, gate_up_scale, quant_intermediate, out_dtype)
    if not quant_intermediate:
        h, h_scale = _quantize_per_token_ref(h, SCALE_BLOCK)
    return _fp8_gemm_ref(h, w_down, h_scale, down_scale, None, out_dtype)


_fused_mlp_fp8 = define_op(
    "fused_mlp_fp8(Tensor x, Tensor x_scale, Tensor w_gate_up, Tensor gate_up_scale, Tensor w_down, "
    "Tensor down_scale, bool quant_intermediate, ScalarType out_dtype) -> Tensor",
    _fused_mlp_fp8_ref,
    lambda x, xs, wgu, sgu, wd, sd, qi, out_dtype: x.new_empty(x.shape[0], wd.shape[0], dtype=out_dtype),
)


def _check_gemm(a, b, a_scale, b_scale, glu=False):
    if a.dtype != FP8 or b.dtype != FP8:
        raise TypeError(f"FP8 GEMM takes float8_e4m3fn a and b, got {a.dtype}, {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a must be [M, K] and b [N, K], got {tuple(a.shape)}, {tuple(b.shape)}")
    if glu and b.shape[0] % 2:
        raise ValueError(f"gate_up weight must have an even number of rows, got {b.shape[0]}")
    m, k = a.shape
    n = b.shape[0]
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise TypeError("scales must be float32")
    if not (a_scale.numel() == 1 or tuple(a_scale.shape) in ((m, 1), (m, _cdiv(k, SCALE_BLOCK)))):
        raise ValueError(f"a_scale must be [1], [{m}, 1] or [{m}, {_cdiv(k, SCALE_BLOCK)}], got {tuple(a_scale.shape)}")
    if not (b_scale.numel() == 1 or tuple(b_scale.shape) in ((n, 1), (_cdiv(n, SCALE_BLOCK), _cdiv(k, SCALE_BLOCK)))):
        raise ValueError(f"b_scale must be [1], [{n}, 1] or [{_cdiv(n, SCALE_BLOCK)}, {_cdiv(k, SCALE_BLOCK)}], "
                         f"got {tuple(b_scale.shape)}")


def fp8_gemm(
    a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale)^T (+ bias) -> [M, N] of out_dtype, fp32 accumulation.

    a: fp8 [M, K] (activations); b: fp8 [N, K] (weights, nn.Linear layout).
    a_scale: fp32 [1] (tensor), [M, 1] (token) or [M, cdiv(K, 128)] (group).
    b_scale: fp32 [1] (tensor), [N, 1] (channel) or [cdiv(N, 128), cdiv(K, 128)] (block).
    bias: [N] or None (added in fp32).
    """
    _check_gemm(a, b, a_scale, b_scale)
    return _fp8_gemm(a, b, a_scale, b_scale, bias, out_dtype)


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(weight)^T (+ bias) for activations x [..., K] (fp32/fp16/bf16),
    quantized dynamically per token (per 1 x 128 group when the weight has block scales).
    weight: fp8 [N, K]; weight_scale as `fp8_gemm`'s b_scale. Returns [..., N] of x's dtype.
    """
    k = x.shape[-1]
    block = weight_scale.dim() == 2 and weight_scale.shape[0] != weight.shape[0] and weight_scale.numel() > 1
    q, s = quantize_fp8_per_token(x.reshape(-1, k), SCALE_BLOCK if block else 0)
    out = fp8_gemm(q, weight, s, weight_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_gemm_silu_mul(
    a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
    quant_out: bool = False, out_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's first half: h = silu(g) * u where [g | u] = (a * sa) @ (b * sb)^T, computed in
    the GEMM's epilogue from the fp32 accumulators.

    b: fp8 [2I, K], the gate rows then the up rows (the engine's fused gate_up weight); scales
    as in `fp8_gemm` (block scales need I % 128 == 0 so no block straddles gate and up).
    quant_out False: returns (h [M, I] of out_dtype, an empty tensor). True: returns h
    quantized to fp8 with one scale per 1 x 128 group, (q [M, I], scale fp32 [M, cdiv(I, 128)]),
    ready to be the A operand of the down GEMM.
    """
    _check_gemm(a, b, a_scale, b_scale, glu=True)
    if b_scale.numel() > 1 and b_scale.shape[0] != b.shape[0] and (b.shape[0] // 2) % SCALE_BLOCK:
        raise ValueError("block-scaled gate_up weights need an intermediate size that is a multiple of 128")
    return _fp8_gemm_silu_mul(a, b, a_scale, b_scale, quant_out, out_dtype)


def fused_mlp_fp8(
    x: torch.Tensor, x_scale: torch.Tensor, w_gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
    w_down: torch.Tensor, down_scale: torch.Tensor, quant_intermediate: bool = True,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The Llama MLP on FP8: down(silu(gate(x)) * up(x)), one registered op.

    x: fp8 [M, H] with x_scale ([1], [M, 1] or [M, cdiv(H, 128)]); w_gate_up: fp8 [2I, H];
    w_down: fp8 [H_out, I]; weight scales as `fp8_gemm`'s b_scale. The intermediate h is
    quantized to fp8 per 1 x 128 group, in the gate_up GEMM's epilogue when quant_intermediate
    (else written in out_dtype and quantized by a separate pass: same math, one more round
    trip). Returns [M, H_out] of out_dtype.
    """
    _check_gemm(x, w_gate_up, x_scale, gate_up_scale, glu=True)
    if w_down.dtype != FP8 or w_down.shape[1] * 2 != w_gate_up.shape[0]:
        raise ValueError(f"w_down must be fp8 [H, {w_gate_up.shape[0] // 2}], got {w_down.dtype} {tuple(w_down.shape)}")
    return _fused_mlp_fp8(x, x_scale, w_gate_up, gate_up_scale, w_down, down_scale, quant_intermediate, out_dtype)


# ---------------------------------------------------------------------------------------------
# RMSNorm (+ residual) + FP8 quantization of the output


def _rms_norm_quant_fp8_ref(x, residual, weight, eps):
    if residual is not None:
        s = (x.float() + residual.float()).to(x.dtype)  # rounded, as the unfused model stores it
        res_out = s
    else:
        s, res_out = x, x.new_empty(0)
    sf = s.float()
    y = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    q, scale = _quantize_per_token_ref(y, 0)
    return q, scale, res_out


def _rms_norm_quant_fp8_fake(x, residual, weight, eps):
    return (torch.empty_like(x, dtype=FP8), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32),
            torch.empty_like(x) if residual is not None else x.new_empty(0))


_rms_norm_quant_fp8 = define_op(
    "rms_norm_quant_fp8(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)",
    _rms_norm_quant_fp8_ref, _rms_norm_quant_fp8_fake,
)


def rms_norm_quant_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RMSNorm of s = x (+ residual), quantized to fp8 per token, in one pass.

    x, residual: [..., H] of one dtype (fp32/fp16/bf16); weight: [H]. The normed row is kept
    in fp32 (never rounded to x's dtype) and quantized with scale max|y| / 448.
    Returns (q fp8 [..., H], scale fp32 [..., 1], s) where s = x + residual rounded to x's
    dtype (the next residual), or None when residual is None.
    """
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must match x's shape and dtype")
    q, scale, s = _rms_norm_quant_fp8(x, residual, weight, eps)
    return q, scale, (s if residual is not None else None)


__all__ = [
    "FP8", "FP8_MAX", "dequantize_fp8", "expand_scale", "fp8_gemm", "fp8_gemm_silu_mul", "fp8_linear",
    "fused_mlp_fp8", "quantize_fp8_block", "quantize_fp8_per_channel", "quantize_fp8_per_tensor",
    "quantize_fp8_per_token", "rms_norm_quant_fp8",
]
