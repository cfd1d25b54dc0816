"""The plugin specs of trtllm_kernels: one per fused op, each calling the torch op in `run`.

| plugin                       | torch op                                   |
| ---------------------------- | ------------------------------------------ |
| TrtllmPagedAttentionDecode   | paged_attention_decode                     |
| TrtllmPagedAttentionPrefill  | paged_attention_prefill (context / chunks) |
| TrtllmRopeWriteKVCache       | rope_and_write_kv_cache, on a fused qkv    |
| TrtllmFp8Gemm                | fp8_gemm, or fp8_linear (quantize_a=1)     |
| TrtllmFusedMlpFp8            | fused_mlp_fp8                              |
| TrtllmFusedMlp               | fused_mlp (bf16 / fp16)                    |
| TrtllmRmsNorm                | rms_norm / fused_add_rms_norm / rms_norm_quant_fp8 |
| TrtllmFp4Gemm                | fp4_gemm (W4A16, NVFP4 / MXFP4), W4A8      |

A new plugin is a PluginSpec subclass added to SPECS: the IPluginV3 class, creator, ONNX node
and tests follow from it.

In-place KV cache: TensorRT has no in-place inputs, so TrtllmRopeWriteKVCache writes into the
k_cache / v_cache buffers it is given (network inputs the caller owns, as TensorRT-LLM's
attention plugin writes into its cache pool) and returns the rotated q. Attention takes that
q as its input, so the data dependence orders the cache write before the read.
"""
from __future__ import annotations

from .spec import FLOATS, FP8_TYPES, INTS, FieldSpec, PluginSpec

BYTES = ("uint8", "int8")


def _same(pos):
    return lambda t: (t[pos],)


def _fixed(*types):
    return lambda t: types


def _write(out, value) -> None:
    """Copy a result into TensorRT's output buffer (the ops return new tensors)."""
    if tuple(value.shape) != tuple(out.shape) or value.dtype != out.dtype:
        raise ValueError(f"op returned {tuple(value.shape)} {value.dtype}, the plugin declared "
                         f"{tuple(out.shape)} {out.dtype}")
    out.copy_(value)


_SCALES = (
    FieldSpec("k_scale", "f32", 1.0, doc="FP8 cache: stored = saturate(k / k_scale)"),
    FieldSpec("v_scale", "f32", 1.0, doc="FP8 cache: stored = saturate(v / v_scale)"),
)


class _AttentionBase(PluginSpec):
    fields = (FieldSpec("scale", "f32", 0.0, doc="softmax scale; 0 means head_dim ** -0.5"),) + _SCALES

    def output_names(self):
        return ["out"]

    def output_dtypes(self, input_dtypes):
        return [input_dtypes[0]]

    def output_shapes(self, inputs, ex):
        return [list(inputs[0])]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        q, kc, vc, bt, sl = shapes[:5]
        if tuple(kc) != tuple(vc):
            raise ValueError(f"{self.name}: k_cache {tuple(kc)} and v_cache {tuple(vc)} differ")
        if q[2] != kc[3] or q[1] % kc[1]:
            raise ValueError(f"{self.name}: q {tuple(q)} does not fit cache [N, Hkv, bs, D] {tuple(kc)}")
        if sl[0] != bt[0]:
            raise ValueError(f"{self.name}: seq_lens {tuple(sl)} and block_tables {tuple(bt)} disagree")

    def _scale(self):
        return None if self.scale == 0.0 else self.scale


class PagedAttentionDecodeSpec(_AttentionBase):
    name = "TrtllmPagedAttentionDecode"
    doc = "One query per sequence against its paged context (trtllm_kernels.paged_attention_decode)."

    def input_names(self):
        return ["q", "k_cache", "v_cache", "block_tables", "seq_lens"]

    def input_ranks(self):
        return [3, 4, 4, 2, 1]

    def type_rules(self):
        return [_fixed(*FLOATS), lambda t: (t[0],) + FP8_TYPES, _same(1), _fixed("int32"), _fixed("int32"),
                _same(0)]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        if shapes[0][0] != shapes[3][0]:
            raise ValueError(f"{self.name}: {shapes[0][0]} queries but {shapes[3][0]} block-table rows")

    def run(self, inputs, outputs):
        import trtllm_kernels as tk

        q, kc, vc, bt, sl = inputs
        out = tk.paged_attention_decode(q, kc, vc, bt, sl, self._scale(), self.k_scale, self.v_scale)
        _write(outputs[0], out)


class PagedAttentionPrefillSpec(_AttentionBase):
    name = "TrtllmPagedAttentionPrefill"
    doc = "Causal attention of ragged query chunks over the paged cache (paged_attention_prefill)."

    def input_names(self):
        return ["q", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc"]

    def input_ranks(self):
        return [3, 4, 4, 2, 1, 1]

    def type_rules(self):
        return [_fixed(*FLOATS), lambda t: (t[0],) + FP8_TYPES, _same(1), _fixed("int32"), _fixed("int32"),
                _fixed("int32"), _same(0)]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        if shapes[5][0] != shapes[3][0] + 1:
            raise ValueError(f"{self.name}: query_start_loc must be [S + 1] = [{shapes[3][0] + 1}], got {tuple(shapes[5])}")

    def run(self, inputs, outputs):
        import trtllm_kernels as tk

        q, kc, vc, bt, sl, qsl = inputs
        out = tk.paged_attention_prefill(q, kc, vc, bt, sl, qsl, self._scale(), self.k_scale, self.v_scale)
        _write(outputs[0], out)


class RopeWriteKVCacheSpec(PluginSpec):
    name = "TrtllmRopeWriteKVCache"
    doc = ("Rotary embedding of q and k from a fused qkv [T, (Hq + 2 Hkv) D] and the k / v write "
           "into the paged cache (rope_and_write_kv_cache); returns the rotated q [T, Hq, D].")
    fields = _SCALES

    def input_names(self):
        return ["positions", "qkv", "cos_sin_cache", "k_cache", "v_cache", "slot_mapping"]

    def output_names(self):
        return ["q"]

    def input_ranks(self):
        return [1, 2, 2, 4, 4, 1]

    def type_rules(self):
        return [_fixed(*INTS), _fixed(*FLOATS), _fixed("float32"), lambda t: (t[1],) + FP8_TYPES, _same(3),
                _fixed(*INTS), _same(1)]

    def output_dtypes(self, input_dtypes):
        return [input_dtypes[1]]

    def output_shapes(self, inputs, ex):
        _, qkv, _, kc = inputs[:4]
        head_dim, kv_heads = kc[3], kc[1]
        q_heads = ex.sub(ex.floordiv(qkv[1], head_dim), ex.mul(ex.const(2), kv_heads))
        return [[qkv[0], q_heads, head_dim]]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        pos, qkv, cs, kc, vc, slot = shapes
        d, hkv = kc[3], kc[1]
        if tuple(kc) != tuple(vc):
            raise ValueError(f"{self.name}: k_cache {tuple(kc)} and v_cache {tuple(vc)} differ")
        if qkv[1] % d or qkv[1] // d <= 2 * hkv or (qkv[1] // d - 2 * hkv) % hkv:
            raise ValueError(f"{self.name}: qkv width {qkv[1]} is not (Hq + 2*{hkv}) * {d} with Hq a multiple of {hkv}")
        if cs[1] != d or pos[0] != qkv[0] or slot[0] != qkv[0]:
            raise ValueError(f"{self.name}: positions {tuple(pos)}, slot_mapping {tuple(slot)}, cos_sin_cache "
                             f"{tuple(cs)} do not fit qkv {tuple(qkv)} / head_dim {d}")

    def run(self, inputs, outputs):
        import trtllm_kernels as tk

        positions, qkv, cs, kc, vc, slot = inputs
        d, hkv = kc.shape[3], kc.shape[1]
        hq = qkv.shape[1] // d - 2 * hkv
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)  # views: the kernel reads them in place
        t = qkv.shape[0]
        out = tk.rope_and_write_kv_cache(positions, q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d), cs,
                                         kc, vc, slot, self.k_scale, self.v_scale)
        _write(outputs[0], out)


class Fp8GemmSpec(PluginSpec):
    name = "TrtllmFp8Gemm"
    doc = ("(a * a_scale) @ (b * b_scale)^T (+ bias), fp32 accumulation (fp8_gemm); quantize_a=1 takes "
           "a high-precision x and quantizes it per token first (fp8_linear).")
    fields = (
        FieldSpec("out_dtype", "str", "bfloat16", FLOATS, "output dtype when a is fp8"),
        FieldSpec("quantize_a", "i32", 0, (0, 1), "1: input 0 is fp32/fp16/bf16 x, quantized per token"),
        FieldSpec("has_bias", "i32", 0, (0, 1), "1: a last input bias [N]"),
    )

    def input_names(self):
        names = ["x", "b", "b_scale"] if self.quantize_a else ["a", "b", "a_scale", "b_scale"]
        return names + (["bias"] if self.has_bias else [])

    def output_names(self):
        return ["y"]

    def input_ranks(self):
        ranks = [2, 2, None] if self.quantize_a else [2, 2, None, None]
        return ranks + ([1] if self.has_bias else [])

    def _out(self, types):
        return types[0] if self.quantize_a else self.out_dtype

    def type_rules(self):
        if self.quantize_a:
            rules = [_fixed(*FLOATS), _fixed(*FP8_TYPES), _fixed("float32")]
        else:
            rules = [_fixed(*FP8_TYPES), _fixed(*FP8_TYPES), _fixed("float32"), _fixed("float32")]
        if self.has_bias:
            rules.append(lambda t: (self._out(t),))
        return rules + [lambda t: (self._out(t),)]

    def output_dtypes(self, input_dtypes):
        return [self._out(input_dtypes)]

    def output_shapes(self, inputs, ex):
        return [[inputs[0][0], inputs[1][0]]]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        (m, k), (n, k2) = shapes[0], shapes[1]
        if k != k2:
            raise ValueError(f"{self.name}: a is [{m}, {k}] but b is [{n}, {k2}]")
        cdiv = lambda a, b: -(-a // b)  # noqa: E731
        b_scale = tuple(shapes[2 if self.quantize_a else 3])
        if b_scale not in ((1,), (1, 1), (n, 1), (cdiv(n, 128), cdiv(k, 128))):
            raise ValueError(f"{self.name}: b_scale {b_scale} fits none of [1], [{n}, 1], [{cdiv(n, 128)}, {cdiv(k, 128)}]")
        if not self.quantize_a:
            a_scale = tuple(shapes[2])
            if a_scale not in ((1,), (1, 1), (m, 1), (m, cdiv(k, 128))):
                raise ValueError(f"{self.name}: a_scale {a_scale} fits none of [1], [{m}, 1], [{m}, {cdiv(k, 128)}]")
        if self.has_bias and tuple(shapes[-1]) != (n,):
            raise ValueError(f"{self.name}: bias must be [{n}], got {tuple(shapes[-1])}")

    def run(self, inputs, outputs):
        import trtllm_kernels as tk

        from .spec import torch_dtype

        bias = inputs[-1] if self.has_bias else None
        if self.quantize_a:
            x, b, b_scale = inputs[:3]
            y = tk.fp8_linear(x, b, b_scale, bias)
        else:
            a, b, a_scale, b_scale = inputs[:4]
            y = tk.fp8_gemm(a, b, a_scale, b_scale, bias, torch_dtype(self.out_dtype))
        _write(outputs[0], y)


class FusedMlpFp8Spec(PluginSpec):
    name = "TrtllmFusedMlpFp8"
    doc = "down(silu(gate(x)) * up(x)) on fp8 weights and activations, one op (fused_mlp_fp8)."
    fields = (
        FieldSpec("out_dtype", "str", "bfloat16", FLOATS),
        FieldSpec("quant_intermediate", "i32", 1, (0, 1), "requantize h in the gate_up GEMM's epilogue"),
    )

    def input_names(self):
        return ["x", "x_scale", "w_gate_up", "gate_up_scale", "w_down", "down_scale"]

    def output_names(self):
        return ["y"]

    def input_ranks(self):
        return [2, None, 2, None, 2, None]

    def type_rules(self):
        f8, f32 = _fixed(*FP8_TYPES), _fixed("float32")
        return [f8, f32, f8, f32, f8, f32, lambda t: (self.out_dtype,)]

    def output_dtypes(self, input_dtypes):
        return [self.out_dtype]

    def output_shapes(self, inputs, ex):
        return [[inputs[0][0], inputs[4][0]]]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        x, wgu, wd = shapes[0], shapes[2], shapes[4]
        if wgu[1] != x[1] or wgu[0] % 2 or wd[1] * 2 != wgu[0]:
            raise ValueError(f"{self.name}: x {tuple(x)}, w_gate_up {tuple(wgu)}, w_down {tuple(wd)} do not chain")

    def run(self, inputs, outputs):
        import trtllm_kernels as tk

        from .spec import torch_dtype

        x, xs, wgu, sgu, wd, sd = inputs
        y = tk.fused_mlp_fp8(x, xs, wgu, sgu, wd, sd, bool(self.quant_intermediate),
                             torch_dtype(self.out_dtype))
        _write(outputs[0], y)


class FusedMlpSpec(PluginSpec):
    name = "TrtllmFusedMlp"
    doc = "down(silu(gate(x)) * up(x)) in fp32 / fp16 / bf16, SiLU-and-mul in the GEMM epilogue (fused_mlp)."

    def input_names(self):
        return ["x", "w_gate_up", "w_down"]

    def output_names(self):
        return ["y"]

    def input_ranks(self):
        return [None, 2, 2]

    def type_rules(self):
        return [_fixed(*FLOATS), _same(0), _same(0), _same(0)]

    def output_dtypes(self, input_dtypes):
        return [input_dtypes[0]]

    def output_shapes(self, inputs, ex):
        return [list(inputs[0][:-1]) + [inputs[2][0]]]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        x, wgu, wd = shapes
        if wgu[1] != x[-1] or wgu[0] % 2 or wd[1] * 2 != wgu[0]:
            raise ValueError(f"{self.name}: x {tuple(x)}, w_gate_up {tuple(wgu)}, w_down {tuple(wd)} do not chain")

    def run(self, inputs, outputs):
        from trtllm_kernels.mlp import fused_mlp

        _write(outputs[0], fused_mlp(*inputs))


class RmsNormSpec(PluginSpec):
    name = "TrtllmRmsNorm"
    doc = ("RMSNorm; residual=1 adds the residual first and also returns the sum (fused_add_rms_norm); "
           "quant_fp8=1 returns the normed rows quantized per token with their scales (rms_norm_quant_fp8).")
    fields = (
        FieldSpec("eps", "f32", 1e-6),
        FieldSpec("residual", "i32", 0, (0, 1)),
        FieldSpec("quant_fp8", "i32", 0, (0, 1)),
        FieldSpec("fp8_dtype", "str", "float8_e4m3fn", FP8_TYPES, "dtype of a quantized output"),
    )

    def input_names(self):
        return ["x"] + (["residual"] if self.residual else []) + ["weight"]

    def output_names(self):
        out = ["q", "scale"] if self.quant_fp8 else ["y"]
        return out + (["residual_out"] if self.residual else [])

    def input_ranks(self):
        return [None] * (1 + self.residual) + [1]

    def type_rules(self):
        rules = [_fixed(*FLOATS)] + [_same(0)] * (1 + self.residual)
        rules += [_fixed(self.fp8_dtype), _fixed("float32")] if self.quant_fp8 else [_same(0)]
        return rules + ([_same(0)] if self.residual else [])

    def output_dtypes(self, input_dtypes):
        out = [self.fp8_dtype, "float32"] if self.quant_fp8 else [input_dtypes[0]]
        return out + ([input_dtypes[0]] if self.residual else [])

    def output_shapes(self, inputs, ex):
        x = list(inputs[0])
        out = [x, x[:-1] + [ex.const(1)]] if self.quant_fp8 else [x]
        return out + ([x] if self.residual else [])

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        x, w = shapes[0], shapes[-1]
        if tuple(w) != (x[-1],):
            raise ValueError(f"{self.name}: weight must be [{x[-1]}], got {tuple(w)}")
        if self.residual and tuple(shapes[1]) != tuple(x):
            raise ValueError(f"{self.name}: residual {tuple(shapes[1])} must match x {tuple(x)}")

    def run(self, inputs, outputs):
        import trtllm_kernels as tk

        x, w = inputs[0], inputs[-1]
        res = inputs[1] if self.residual else None
        if self.quant_fp8:
            q, scale, s = tk.rms_norm_quant_fp8(x, w, self.eps, res)
            results = [q, scale] + ([s] if self.residual else [])
        elif self.residual:
            results = list(tk.fused_add_rms_norm(x, res, w, self.eps))
        else:
            results = [tk.rms_norm(x, w, self.eps)]
        for out, value in zip(outputs, results):
            _write(out, value)


class Fp4GemmSpec(PluginSpec):
    name = "TrtllmFp4Gemm"
    doc = ("W4A16: y = x @ dequant(w)^T on packed FP4 weights, NVFP4 (e4m3 scale per 16, fp32 global) "
           "or MXFP4 (e8m0 scale per 32), dequantized in registers (trtllm_kernels.fp4.fp4_gemm); "
           "mxfp4_w4a8: MXFP4 weights against x quantized per token to fp8 (fp4_gemm_w4a8).")
    fields = (FieldSpec("fp4_format", "str", "nvfp4", ("nvfp4", "mxfp4", "mxfp4_w4a8")),)

    @property
    def group(self) -> int:
        return 16 if self.fp4_format == "nvfp4" else 32

    def input_names(self):
        return ["x", "w", "scale"] + (["global_scale"] if self.fp4_format == "nvfp4" else [])

    def output_names(self):
        return ["y"]

    def input_ranks(self):
        return [2, 2, 2] + ([None] if self.fp4_format == "nvfp4" else [])

    def type_rules(self):
        # Packed bytes as uint8 or int8 (reinterpreted in run): TensorRT's ONNX parser turns UINT8
        # initializers into INT32 values, INT8 ones stay bytes. NVFP4's e4m3 scales may be int8
        # bytes too: TensorRT-RTX asserts when INT8 and FP8 tensors meet in one fused graph.
        raw = _fixed(*BYTES)
        rules = [_fixed(*FLOATS), raw, _fixed("float8_e4m3fn", *BYTES) if self.fp4_format == "nvfp4" else raw]
        if self.fp4_format == "nvfp4":
            rules.append(_fixed("float32"))
        return rules + [_same(0)]

    def output_dtypes(self, input_dtypes):
        return [input_dtypes[0]]

    def output_shapes(self, inputs, ex):
        return [[inputs[0][0], inputs[1][0]]]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        (m, k), (n, half), scale = shapes[0], shapes[1], tuple(shapes[2])
        g = self.group
        if k != 2 * half or k % (2 * g):
            raise ValueError(f"{self.name}: x [{m}, {k}] needs packed w [N, {k // 2}] with K a multiple of {2 * g}, "
                             f"got w {tuple(shapes[1])}")
        if scale != (n, k // g):
            raise ValueError(f"{self.name}: scale must be [{n}, {k // g}], got {scale}")
        if self.fp4_format == "nvfp4" and tuple(shapes[3]) not in ((1,), (1, 1), ()):
            raise ValueError(f"{self.name}: global_scale must have one element, got {tuple(shapes[3])}")

    def run(self, inputs, outputs):
        from trtllm_kernels.fp4 import fp4_gemm, fp4_gemm_w4a8

        import torch

        x, w, scale = (t.view(torch.uint8) if t.dtype == torch.int8 else t for t in inputs[:3])
        if self.fp4_format == "mxfp4_w4a8":
            _write(outputs[0], fp4_gemm_w4a8(x, w, scale))
            return
        if self.fp4_format == "nvfp4" and scale.dtype == torch.uint8:
            scale = scale.view(torch.float8_e4m3fn)
        g = inputs[3].reshape(1) if self.fp4_format == "nvfp4" else None
        _write(outputs[0], fp4_gemm(x, w, scale, g))


SPECS: dict[str, type[PluginSpec]] = {
    cls.name: cls
    for cls in (PagedAttentionDecodeSpec, PagedAttentionPrefillSpec, RopeWriteKVCacheSpec, Fp8GemmSpec,
                FusedMlpFp8Spec, FusedMlpSpec, RmsNormSpec, Fp4GemmSpec)
}

