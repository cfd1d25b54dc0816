"""FP4 (e2m1) weights: NVFP4 and MXFP4 quantization, dequantization and the weight-only GEMM.

Hopper has no FP4 tensor cores, so FP4 is weight-only here: 4-bit weights in memory,
dequantized in registers and multiplied on the bf16/fp16 tensor cores with fp32 accumulation
(W4A16). Kernels: `trtllm_kernels.kernels.triton_fp4`.

Element format, e2m1 (OCP Microscaling Formats (MX) v1.0, section 5.3.3 "FP4"): 1 sign bit,
2 exponent bits (bias 1), 1 mantissa bit; no Inf, no NaN. Code c = s<<3 | e<<1 | m, value
(-1)^s * 2^(e-1) * (1 + m/2) for e > 0 and (-1)^s * m/2 for e = 0 (a subnormal), so the
magnitudes are {0, 0.5, 1, 1.5, 2, 3, 4, 6} for codes 0..7. Rounding into e2m1 is
round-to-nearest, ties to the even code (the one with m = 0), saturating at +-6 (the MX
spec's clamp to the largest normal). The sign of a value that rounds to zero is kept (-0.1
becomes code 8, -0).

Two scaled formats, both over groups of consecutive values along K of a weight w [N, K]:
- NVFP4 (NVIDIA: "NVFP4", two-level scaling as introduced with Blackwell's fifth-generation
  tensor cores and implemented by TensorRT Model Optimizer / TensorRT-LLM): one e4m3
  (`float8_e4m3fn`) scale per 16 values and one fp32 global scale per tensor;
  w ~= e2m1 * scale_e4m3 * global. Quantization (the ModelOpt / TensorRT-LLM recipe):
  global = amax(|w|) / (6 * 448) (1 if amax is 0), so the largest block scale lands at 448;
  scale_b = e4m3_rne(min((amax_b / 6) / global, 448)); q = e2m1_rne(w / (scale_b * global)),
  q = 0 where scale_b * global is 0 (a block that underflows the e4m3 scale). All in fp32.
- MXFP4 (OCP MX v1.0, section 6.3 "Conversion from vector of scalar format to MX"): one
  e8m0 scale (a power of two, uint8 code, bias 127) per 32 values and no global scale;
  shared_exp = floor(log2(amax_b)) - emax_elem with emax_elem = 2 for e2m1 (6 = 1.5 * 2^2),
  clamped to the e8m0 range [-127, 127] (an all-zero block gets -127); scale code
  shared_exp + 127; q = e2m1_rne(w / 2^shared_exp), values of the block's top binade above 6
  clamp to 6 (the spec's behaviour).

Special values (documented choice; e2m1 has no Inf/NaN): a block holding a NaN or +-Inf gets
a NaN scale (e4m3 0x7F for NVFP4, e8m0 0xFF for MXFP4, the formats' NaN encodings) and all
its codes 0, so the whole block dequantizes to NaN; NVFP4's global amax is taken over the
finite values only. Subnormal inputs are ordinary values (they quantize to 0 unless their
block is as small). Scales underflowing e4m3 quantize as e4m3 subnormals (or 0, see above).

Packed layout (chosen for the GEMM's loads; also in docs/formats.md). A weight [N, K] is
stored as `packed` uint8 [N, K/2] with the two halves of K in the two nibbles of a byte:
byte j of row n holds code(w[n, j]) in its low nibble and code(w[n, K/2 + j]) in its high
nibble. A GEMM step that reads bytes [j0, j0 + B) of a row gets two contiguous K ranges,
[j0, j0 + B) and [K/2 + j0, K/2 + j0 + B): it splits the nibbles with one AND and one shift,
multiplies each half on the tensor cores against the matching contiguous activation columns,
and needs no interleaving shuffle in registers. Rows are contiguous (16-byte vector loads of
K/2 bytes). Scales: [N, K/16] float8_e4m3fn (NVFP4) or [N, K/32] uint8 (MXFP4), row-major,
group g of row n covering w[n, g*G : (g+1)*G]; the global scale is fp32 [1]. K must be a
multiple of 2 * G (32 for NVFP4, 64 for MXFP4) so no group straddles the two halves.

Ops (each with a plain-PyTorch reference as its CPU kernel and a Triton CUDA kernel):
`fp4_dequantize` and `fp4_gemm` (y = x @ dequant(w)^T in x's dtype, fp32 accumulation).

W4A8 (`fp4_gemm_w4a8`, MXFP4 only): the activations are quantized per token to e4m3 (the
scales of `trtllm_kernels.fp8.quantize_fp8_per_token`) and the weights converted to e4m3 in
registers, for Hopper's fp8 tensor cores (twice the bf16 rate). A power-of-two scale folds into
e4m3 without rounding: a group with scale byte e is multiplied as e2m1 * 2^(e - E + 6) in e4m3
(at most 384), E the largest scale byte of its row, and the row's fp32 accumulators by
2^(E - 133) after. That is exact for groups within 14 binades of the row's largest (e4m3's
subnormals reach 0.5 * 2^-8); smaller groups round to nearest even in e4m3 (the CUDA kernel
takes E over each K share it splits the row into). NVFP4's e4m3 scales times e2m1 codes need
up to 5 significant bits, e4m3 has 4: it stays W4A16.
Quantization runs once per weight at build time as vectorized PyTorch on any device
(`quantize_nvfp4` / `quantize_mxfp4`), checked bit for bit against `*_reference`, literal
per-element implementations of the definitions above.
"""
from __future__ import annotations

import torch

from ._library import define_op

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; 8..15 are their negatives
E2M1_MAX = 6.0
E2M1_EMAX = 2  # emax_elem of e2m1 in the MX spec (6 = 1.5 * 2^2)
E4M3_MAX = 448.0
NVFP4_GROUP = 16
MXFP4_GROUP = 32
E8M0_BIAS = 127
E8M0_NAN = 255
FP8 = torch.float8_e4m3fn

# round-to-nearest-even boundaries between consecutive e2m1 magnitudes: at boundary i (between
# codes i and i + 1) a tie goes to the even code, i.e. down for even i and up for odd i
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_size_of(scale: torch.Tensor) -> int:
    """The format from the scale's dtype: float8_e4m3fn -> NVFP4 (16), uint8 -> MXFP4 (32)."""
    if scale.dtype == FP8:
        return NVFP4_GROUP
    if scale.dtype == torch.uint8:
        return MXFP4_GROUP
    raise TypeError(f"an FP4 scale is float8_e4m3fn (NVFP4) or uint8 e8m0 (MXFP4), got {scale.dtype}")


# ---------------------------------------------------------------------------------------------
# Codes, packing


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e2m1 codes (0..15) -> float32 values."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def _e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """float32 v (already divided by its scale) -> e2m1 codes, RNE, saturating (vectorized)."""
    a = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for i, b in enumerate(_E2M1_BOUNDS):
        code += (a >= b if i % 2 else a > b).to(torch.uint8)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] -> packed uint8 [N, K/2]: low nibble column j, high nibble K/2 + j."""
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"codes must be [N, K] with K even, got {tuple(codes.shape)}")
    half = codes.shape[1] // 2
    return (codes[:, :half] | (codes[:, half:] << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [N, K/2] -> codes uint8 [N, K] (the inverse of `pack_fp4`)."""
    return torch.cat([packed & 0xF, packed >> 4], dim=1)


def _e8m0_decode(scale: torch.Tensor) -> torch.Tensor:
    """e8m0 codes -> float32 2^(code - 127); 255 -> NaN."""
    s = torch.ldexp(torch.ones_like(scale, dtype=torch.float32), scale.to(torch.int32) - E8M0_BIAS)
    return torch.where(scale == E8M0_NAN, torch.full_like(s, float("nan")), s)


def _check_weight(w: torch.Tensor, group: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"FP4 quantization takes a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if w.shape[1] % (2 * group):
        raise ValueError(f"K = {w.shape[1]} must be a multiple of {2 * group} for this FP4 format "
                         "(no scale group may straddle the packed halves)")
    if not w.is_floating_point():
        raise TypeError(f"FP4 quantization takes a floating-point weight, got {w.dtype}")


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    return w.float().reshape(w.shape[0], w.shape[1] // group, group)


# ---------------------------------------------------------------------------------------------
# Quantization (vectorized; the production path)


def _finite_amax(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return torch.where(torch.isfinite(a), a, torch.zeros_like(a)).amax() if x.numel() else x.new_zeros(())


def _quantize_nvfp4(w: torch.Tensor):
    wg = _groups(w, NVFP4_GROUP)
    amax = _finite_amax(wg)
    g = torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax)).reshape(1)
    bad = ~torch.isfinite(wg).all(-1)  # blocks with NaN / Inf
    bmax = wg.abs().amax(-1)
    s = ((bmax / E2M1_MAX) / g).clamp(max=E4M3_MAX)
    s = torch.where(bad, torch.zeros_like(s), s).to(FP8)
    denom = s.float() * g
    v = wg / denom[..., None]
    v = torch.where((denom > 0)[..., None], v, torch.zeros_like(v))
    codes = _e2m1_encode(v)
    codes = torch.where(bad[..., None], torch.zeros_like(codes), codes).reshape(w.shape)
    s = torch.where(bad, torch.full_like(s.float(), float("nan")), s.float()).to(FP8)
    return pack_fp4(codes), s, g


def _quantize_mxfp4(w: torch.Tensor):
    wg = _groups(w, MXFP4_GROUP)
    bad = ~torch.isfinite(wg).all(-1)
    bmax = torch.where(bad, torch.zeros_like(wg[..., 0]), wg.abs().amax(-1))
    _, e = torch.frexp(bmax)  # bmax = f * 2^e, f in [0.5, 1): floor(log2 bmax) = e - 1
    exp = torch.where(bmax > 0, e - 1 - E2M1_EMAX, torch.full_like(e, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)
    v = torch.ldexp(wg, -exp[..., None])  # exact: a power-of-two scaling
    codes = _e2m1_encode(v)
    codes = torch.where(bad[..., None], torch.zeros_like(codes), codes).reshape(w.shape)
    scale = torch.where(bad, torch.full_like(exp, E8M0_NAN), exp + E8M0_BIAS).to(torch.uint8)
    return pack_fp4(codes), scale


_quantize_nvfp4_op = define_op(
    "fp4_quantize_nvfp4(Tensor w) -> (Tensor, Tensor, Tensor)",
    _quantize_nvfp4,
    lambda w: (w.new_empty(w.shape[0], w.shape[1] // 2, dtype=torch.uint8),
               w.new_empty(w.shape[0], w.shape[1] // NVFP4_GROUP, dtype=FP8), w.new_empty(1, dtype=torch.float32)),
)
_quantize_mxfp4_op = define_op(
    "fp4_quantize_mxfp4(Tensor w) -> (Tensor, Tensor)",
    _quantize_mxfp4,
    lambda w: (w.new_empty(w.shape[0], w.shape[1] // 2, dtype=torch.uint8),
               w.new_empty(w.shape[0], w.shape[1] // MXFP4_GROUP, dtype=torch.uint8)),
)


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 quantization of a weight w [N, K] (fp32/fp16/bf16, K % 32 == 0).

    Returns (packed uint8 [N, K/2], scale float8_e4m3fn [N, K/16], global_scale fp32 [1]) with
    w ~= e2m1 * scale * global_scale (layout and rounding: the module docstring).
    """
    _check_weight(w, NVFP4_GROUP)
    return _quantize_nvfp4_op(w)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 quantization of a weight w [N, K] (fp32/fp16/bf16, K % 64 == 0).

    Returns (packed uint8 [N, K/2], scale uint8 e8m0 [N, K/32]) with w ~= e2m1 * 2^(scale - 127).
    """
    _check_weight(w, MXFP4_GROUP)
    return _quantize_mxfp4_op(w)


def quantize_fp4(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`quantize_nvfp4` or `quantize_mxfp4` by name ("nvfp4" / "mxfp4"); MXFP4's global scale is None."""
    if fmt == "nvfp4":
        return quantize_nvfp4(w)
    if fmt == "mxfp4":
        return (*quantize_mxfp4(w), None)
    raise ValueError(f"FP4 format must be 'nvfp4' or 'mxfp4', got {fmt!r}")


# ---------------------------------------------------------------------------------------------
# References written from the definitions: per element, nearest value of the format's grid,
# ties to the even code. Slow; the oracle for the quantizers above.


def _e4m3_grid() -> torch.Tensor:
    """All finite non-negative float8_e4m3fn values in code order (OCP 8-bit FP spec, E4M3:
    bias 7, subnormals m/8 * 2^-6, no Inf, S.1111.111 is NaN, so the largest is 448)."""
    vals = [m / 8 * 2.0 ** -6 for m in range(8)]
    vals += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8)]
    return torch.tensor(vals[:-1], dtype=torch.float64)  # drop S.1111.111 (NaN)


def _round_to_grid(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """|x| -> index of the nearest grid value (grid ascending), ties to the even index;
    beyond the grid's end, its last index (saturation)."""
    a = x.double().abs().reshape(-1, 1)
    d = (a - grid.reshape(1, -1)).abs()
    best = d.min(-1, keepdim=True).values
    cand = d == best
    idx = torch.arange(grid.numel()).expand_as(d)
    even = cand & (idx % 2 == 0)
    pick = torch.where(even.any(-1), torch.where(even, idx, grid.numel()).min(-1).values,
                       torch.where(cand, idx, grid.numel()).min(-1).values)
    return pick.reshape(x.shape)


def _e2m1_reference(v: torch.Tensor) -> torch.Tensor:
    mag = _round_to_grid(v, torch.tensor(E2M1_VALUES, dtype=torch.float64)).to(torch.uint8)
    return mag | (torch.signbit(v).to(torch.uint8) << 3)


def nvfp4_quantize_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 from the definition: (codes uint8 [N, K], scale float8_e4m3fn [N, K/16], global [1])."""
    n, k = w.shape
    wf = w.float()
    finite = wf[torch.isfinite(wf)].abs()
    amax = finite.max() if finite.numel() else torch.tensor(0.0)
    g = (amax / torch.tensor(E2M1_MAX * E4M3_MAX, dtype=torch.float32)) if amax > 0 else torch.tensor(1.0)
    grid = _e4m3_grid()
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, k // NVFP4_GROUP, dtype=torch.float32)
    for r in range(n):
        for b in range(k // NVFP4_GROUP):
            blk = wf[r, b * NVFP4_GROUP:(b + 1) * NVFP4_GROUP]
            if not torch.isfinite(blk).all():
                scales[r, b] = float("nan")
                continue
            want = (blk.abs().max() / torch.tensor(E2M1_MAX)) / g  # fp32, as specified
            s = float(grid[_round_to_grid(want.reshape(1), grid)])  # saturates at 448
            scales[r, b] = s
            denom = torch.tensor(s, dtype=torch.float32) * g
            if denom == 0:
                continue
            codes[r, b * NVFP4_GROUP:(b + 1) * NVFP4_GROUP] = _e2m1_reference(blk / denom)
    return codes, scales.to(FP8), g.reshape(1).float()


def mxfp4_quantize_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 from OCP MX v1.0 section 6.3: (codes uint8 [N, K], scale uint8 e8m0 [N, K/32])."""
    n, k = w.shape
    wf = w.float()
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, k // MXFP4_GROUP, dtype=torch.uint8)
    for r in range(n):
        for b in range(k // MXFP4_GROUP):
            blk = wf[r, b * MXFP4_GROUP:(b + 1) * MXFP4_GROUP]
            if not torch.isfinite(blk).all():
                scales[r, b] = E8M0_NAN
                continue
            amax = float(blk.abs().max())
            import math

            shared = math.floor(math.log2(amax)) - E2M1_EMAX if amax > 0 else -E8M0_BIAS
            shared = max(-E8M0_BIAS, min(E8M0_BIAS, shared))
            scales[r, b] = shared + E8M0_BIAS
            v = blk.double() / 2.0 ** shared  # exact in float64
            codes[r, b * MXFP4_GROUP:(b + 1) * MXFP4_GROUP] = _e2m1_reference(v)
    return codes, scales


# ---------------------------------------------------------------------------------------------
# Dequantization


def _check_packed(w: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None) -> int:
    group = group_size_of(scale)
    if w.dtype != torch.uint8 or w.dim() != 2:
        raise ValueError(f"packed FP4 weight must be uint8 [N, K/2], got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape[0], 2 * w.shape[1]
    if k % (2 * group):
        raise ValueError(f"K = {k} must be a multiple of {2 * group}")
    if tuple(scale.shape) != (n, k // group):
        raise ValueError(f"scale must be [{n}, {k // group}] for weight {tuple(w.shape)}, got {tuple(scale.shape)}")
    if group == NVFP4_GROUP:
        if global_scale is None or global_scale.numel() != 1 or global_scale.dtype != torch.float32:
            raise ValueError("NVFP4 needs a float32 global_scale of one element")
    elif global_scale is not None:
        raise ValueError("MXFP4 has no global scale: pass None")
    return group


def _dequantize_ref(w, scale, global_scale, dtype):
    group = group_size_of(scale)
    vals = e2m1_decode(unpack_fp4(w))
    s = scale.float() if group == NVFP4_GROUP else _e8m0_decode(scale)
    out = (vals.reshape(w.shape[0], -1, group) * s[..., None]).reshape(vals.shape)
    if global_scale is not None:
        out = out * global_scale.float()
    return out.to(dtype)


_fp4_dequantize = define_op(
    "fp4_dequantize(Tensor w, Tensor scale, Tensor? global_scale, ScalarType dtype) -> Tensor",
    _dequantize_ref,
    lambda w, scale, global_scale, dtype: w.new_empty(w.shape[0], 2 * w.shape[1], dtype=dtype),
)


def dequantize_fp4(w: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed FP4 w [N, K/2] with its scales -> [N, K] of dtype (float32 by default: exact).

    scale float8_e4m3fn [N, K/16] + global_scale fp32 [1] (NVFP4) or uint8 [N, K/32] and None
    (MXFP4). A NaN scale gives a NaN block (see the module docstring).
    """
    _check_packed(w, scale, global_scale)
    return _fp4_dequantize(w, scale, global_scale, dtype)


# ---------------------------------------------------------------------------------------------
# Weight-only GEMM


def _fp4_gemm_ref(x, w, scale, global_scale):
    out = x.float() @ _dequantize_ref(w, scale, global_scale, torch.float32).t()
    return out.to(x.dtype)


_fp4_gemm = define_op(
    "fp4_gemm(Tensor x, Tensor w, Tensor scale, Tensor? global_scale) -> Tensor",
    _fp4_gemm_ref,
    lambda x, w, scale, global_scale: x.new_empty(x.shape[0], w.shape[0]),
)


def fp4_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
             global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W4A16: y = x @ dequant(w)^T, [M, N] of x's dtype, fp32 accumulation.

    x: [M, K] bf16 / fp16 / fp32 activations; w: packed FP4 [N, K/2] (layout: module docstring);
    scale / global_scale: as `dequantize_fp4` (NVFP4 or MXFP4, told apart by scale's dtype).
    On CUDA the weights are dequantized in registers and multiplied on the tensor cores in x's
    dtype (the global scale is applied to the fp32 accumulator); fp32 x runs exact fp32 dots.
    """
    _check_packed(w, scale, global_scale)
    if x.dim() != 2 or x.shape[1] != 2 * w.shape[1]:
        raise ValueError(f"x must be [M, {2 * w.shape[1]}] for weight {tuple(w.shape)}, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    return _fp4_gemm(x, w, scale, global_scale)


def _w4a8_weight_ref(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed MXFP4 w -> float32 [N, K], the values the W4A8 GEMM multiplies (module docstring)."""
    n = w.shape[0]
    e = scale.to(torch.int32)
    top = e.amax(dim=1, keepdim=True)
    codes = e2m1_decode(unpack_fp4(w)).reshape(n, -1, MXFP4_GROUP)
    rel = torch.ldexp(codes, (e - top + 6)[..., None].float()).to(FP8).float()
    out = rel * torch.ldexp(torch.ones_like(top, dtype=torch.float32), (top - E8M0_BIAS - 6).float())[..., None]
    return out.masked_fill((e == E8M0_NAN)[..., None], float("nan")).reshape(n, -1)


def _fp4_gemm_w4a8_ref(x, w, scale):
    from .fp8 import _quantize_per_token_ref

    xq, xs = _quantize_per_token_ref(x, 0)
    return ((xq.float() * xs) @ _w4a8_weight_ref(w, scale).t()).to(x.dtype)


_fp4_gemm_w4a8 = define_op(
    "fp4_gemm_w4a8(Tensor x, Tensor w, Tensor scale) -> Tensor",
    _fp4_gemm_w4a8_ref,
    lambda x, w, scale: x.new_empty(x.shape[0], w.shape[0]),
)


def fp4_gemm_w4a8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W4A8: y = fp8(x) @ dequant(w)^T, [M, N] of x's dtype: x quantized per token to e4m3, MXFP4
    w (scale uint8 [N, K/32]) multiplied as e4m3 (module docstring), fp32 accumulation. On
    Hopper with bf16 x: the fp8 variant of csrc/fp4_wgmma.cu, an fp8 GEMM from 256 tokens, and at
    1-16 tokens the W4A16 kernel on the fp8 activations dequantized to bf16 (kernels.triton_fp4.
    fp4_gemm_w4a8_cuda says why); elsewhere the reference math."""
    if group_size_of(scale) != MXFP4_GROUP:
        raise ValueError("W4A8 takes MXFP4 weights (uint8 e8m0 scales); NVFP4 stays W4A16 (fp4_gemm)")
    _check_packed(w, scale, None)
    if x.dim() != 2 or x.shape[1] != 2 * w.shape[1]:
        raise ValueError(f"x must be [M, {2 * w.shape[1]}] for weight {tuple(w.shape)}, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    return _fp4_gemm_w4a8(x, w, scale)


def fp4_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
               global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`fp4_gemm` over activations x [..., K] -> [..., N]."""
    k = x.shape[-1]
    out = fp4_gemm(x.reshape(-1, k), w, scale, global_scale)
    return out.reshape(*x.shape[:-1], w.shape[0])


def fp4_linear_w4a8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`fp4_gemm_w4a8` over activations x [..., K] -> [..., N]."""
    out = fp4_gemm_w4a8(x.reshape(-1, x.shape[-1]), w, scale)
    return out.reshape(*x.shape[:-1], w.shape[0])


__all__ = [
    "E2M1_VALUES", "MXFP4_GROUP", "NVFP4_GROUP", "dequantize_fp4", "e2m1_decode", "fp4_gemm", "fp4_gemm_w4a8",
    "fp4_linear", "fp4_linear_w4a8", "mxfp4_quantize_reference", "nvfp4_quantize_reference", "pack_fp4",
    "quantize_fp4", "quantize_mxfp4", "quantize_nvfp4", "unpack_fp4",
]
