"""TensorRT plugins: specs (shapes, dtypes, formats, fields) on CPU, the Llama graph and its
ONNX export, and, where a TensorRT module is importable, registration and engine builds.

The spec tests run every plugin's `run` (the body of its enqueue) on CPU tensors for every
dtype combination its rules allow, so the declared output shapes and dtypes are checked
against what the torch op really returns, and the wiring against the public ops.
"""
from __future__ import annotations

import importlib
import itertools

import pytest
import torch

import trtllm_kernels as tk
from trtllm_kernels.engine.config import ModelConfig
from trtllm_kernels.engine.model import AttentionMetadata, LlamaModel
from trtllm_kernels.plugins import SPECS, IntExprs, SymExprs, llama_graph, llama_layer_graph
from trtllm_kernels.plugins import specs as S
from trtllm_kernels.plugins.graph import eval_dim, run_torch
from trtllm_kernels.plugins.spec import (
    FieldSpec,
    all_type_combinations,
    dtype_from_torch,
    pack_fields,
    torch_dtype,
    unpack_fields,
)

FP8 = torch.float8_e4m3fn


def _trt_module():
    for name in ("tensorrt", "tensorrt_rtx_bindings"):
        try:
            m = importlib.import_module(name)
            m.get_plugin_registry  # noqa: B018
            return m
        except Exception:  # noqa: BLE001 - the PyPI stub raises on import
            continue
    return None


TRT = _trt_module()
needs_trt = pytest.mark.skipif(TRT is None, reason="neither tensorrt nor tensorrt_rtx_bindings is importable "
                               "(install tensorrt, or the tensorrt-rtx-cu13 wheels: README 'TensorRT plugins')")


def field_variants(spec_cls):
    """Every combination of the fields that have a finite set of choices."""
    choice_fields = [f for f in spec_cls.fields if f.choices is not None]
    return [dict(zip([f.name for f in choice_fields], vals))
            for vals in itertools.product(*(f.choices for f in choice_fields))]


# ---------------------------------------------------------------------------------------------
# concrete cases: inputs for each plugin at given dtypes, and the same computation through the
# public ops (the oracle)


def _rand(shape, dtype):
    if dtype == "float8_e4m3fn":
        return (torch.randn(shape) * 4).to(FP8)
    return torch.randn(shape).to(torch_dtype(dtype))


def _paged(num_seqs, lens, bs=4, hkv=2, d=16, cache_dtype="float32", nb=16):
    """Caches filled with random values, block tables pointing at distinct blocks."""
    kc, vc = _rand((nb, hkv, bs, d), cache_dtype), _rand((nb, hkv, bs, d), cache_dtype)
    mb = max(-(-n // bs) for n in lens)
    perm = torch.randperm(nb)[: num_seqs * mb].reshape(num_seqs, mb).to(torch.int32)
    return kc, vc, perm, torch.tensor(lens, dtype=torch.int32)


def case(spec, dtypes):
    """(inputs, oracle outputs) for `spec` at input `dtypes`."""
    if isinstance(spec, S.PagedAttentionDecodeSpec):
        kc, vc, bt, sl = _paged(3, [5, 1, 8], cache_dtype=dtypes[1])
        q = _rand((3, 4, 16), dtypes[0])
        args = (q, kc, vc, bt, sl)
        return list(args), [tk.paged_attention_decode(*args, scale=spec.scale or None, k_scale=spec.k_scale,
                                                      v_scale=spec.v_scale)]
    if isinstance(spec, S.PagedAttentionPrefillSpec):
        kc, vc, bt, sl = _paged(2, [6, 3], cache_dtype=dtypes[1])
        q = _rand((5, 4, 16), dtypes[0])  # last 4 of seq 0, last 1 of seq 1
        qsl = torch.tensor([0, 4, 5], dtype=torch.int32)
        args = (q, kc, vc, bt, sl, qsl)
        return list(args), [tk.paged_attention_prefill(*args, scale=spec.scale or None, k_scale=spec.k_scale,
                                                       v_scale=spec.v_scale)]
    if isinstance(spec, S.RopeWriteKVCacheSpec):
        t, hq, hkv, d, bs, nb = 5, 4, 2, 16, 4, 6
        positions = torch.tensor([0, 1, 2, 7, 3], dtype=torch_dtype(dtypes[0]))
        qkv = _rand((t, (hq + 2 * hkv) * d), dtypes[1])
        cs = tk.rope_cos_sin_cache(d, 16)
        kc, vc = _rand((nb, hkv, bs, d), dtypes[3]), _rand((nb, hkv, bs, d), dtypes[4])
        slot = torch.tensor([0, 1, -1, 9, 22], dtype=torch_dtype(dtypes[5]))
        kc2, vc2 = kc.clone(), vc.clone()
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k = tk.rotary_embedding(positions.long(), q.reshape(t, hq, d), k.reshape(t, hkv, d), cs)
        tk.write_kv_cache(k, v.reshape(t, hkv, d), kc2, vc2, slot.long(), spec.k_scale, spec.v_scale)
        return [positions, qkv, cs, kc, vc, slot], [q], {3: kc2, 4: vc2}
    if isinstance(spec, S.Fp8GemmSpec):
        m, n, k = 5, 24, 160
        out_dtype = torch_dtype(dtypes[0] if spec.quantize_a else spec.out_dtype)
        b, b_scale = tk.quantize_fp8_per_channel(torch.randn(n, k))
        bias = torch.randn(n).to(out_dtype) if spec.has_bias else None
        if spec.quantize_a:
            x = _rand((m, k), dtypes[0])
            ins = [x, b, b_scale]
            ref = tk.fp8_linear(x, b, b_scale, bias)
        else:
            a, a_scale = tk.quantize_fp8_per_token(torch.randn(m, k), 128)  # group scales [M, 2]
            ins = [a, b, a_scale, b_scale]
            ref = tk.fp8_gemm(a, b, a_scale, b_scale, bias, out_dtype)
        return ins + ([bias] if bias is not None else []), [ref]
    if isinstance(spec, S.FusedMlpFp8Spec):
        m, h, i = 3, 64, 128
        x, xs = tk.quantize_fp8_per_token(torch.randn(m, h))
        wgu, sgu = tk.quantize_fp8_per_channel(torch.randn(2 * i, h))
        wd, sd = tk.quantize_fp8_per_channel(torch.randn(h, i))
        ins = [x, xs, wgu, sgu, wd, sd]
        return ins, [tk.fused_mlp_fp8(*ins, bool(spec.quant_intermediate), torch_dtype(spec.out_dtype))]
    if isinstance(spec, S.FusedMlpSpec):
        from trtllm_kernels.mlp import fused_mlp

        dt = dtypes[0]
        ins = [_rand((2, 3, 32), dt), _rand((48, 32), dt) * 0.2, _rand((32, 24), dt) * 0.2]
        return ins, [fused_mlp(*ins)]
    if isinstance(spec, S.Fp4GemmSpec):
        from trtllm_kernels.fp4 import fp4_gemm, fp4_gemm_w4a8, quantize_fp4

        w4a8 = spec.fp4_format == "mxfp4_w4a8"
        w, scale, glob = quantize_fp4(torch.randn(24, 128), "mxfp4" if w4a8 else spec.fp4_format)
        x = _rand((5, 128), dtypes[0])
        ref = fp4_gemm_w4a8(x, w, scale) if w4a8 else fp4_gemm(x, w, scale, glob)
        # the same bytes as the container dtype the rules allow (int8 for TensorRT's parser)
        ins = [x, w.view(torch_dtype(dtypes[1])), scale.view(torch_dtype(dtypes[2]))]
        return ins + ([glob.float().reshape(1)] if glob is not None else []), [ref]
    if isinstance(spec, S.RmsNormSpec):
        x = _rand((2, 3, 48), dtypes[0])
        res = _rand((2, 3, 48), dtypes[0])
        w = _rand((48,), dtypes[0])
        ins = [x] + ([res] if spec.residual else []) + [w]
        if spec.quant_fp8:
            q, s, r = tk.rms_norm_quant_fp8(x, w, spec.eps, res if spec.residual else None)
            return ins, [q, s] + ([r] if spec.residual else [])
        if spec.residual:
            return ins, list(tk.fused_add_rms_norm(x, res, w, spec.eps))
        return ins, [tk.rms_norm(x, w, spec.eps)]
    raise AssertionError(f"no case for {spec}")


ALL_SPECS = [cls(**fv) for cls in SPECS.values() for fv in field_variants(cls)]


def _close(a, b):
    if a.dtype == FP8:
        a, b = a.float(), b.float()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=repr)
def test_every_dtype_combination_shapes_dtypes_and_values(spec):
    combos = spec.input_combinations()
    assert combos, f"{spec} accepts no input dtypes"
    for dtypes in combos:
        made = case(spec, dtypes)
        ins, refs = made[0], made[1]
        in_place = made[2] if len(made) > 2 else {}
        assert [dtype_from_torch(t.dtype) for t in ins] == list(dtypes)
        spec.check_dtypes(dtypes)
        spec.check_shapes([tuple(t.shape) for t in ins])
        shapes = spec.output_shapes([list(t.shape) for t in ins], IntExprs())
        out_dtypes = spec.output_dtypes(list(dtypes))
        # the declared outputs are exactly what the op returns ...
        assert [tuple(s) for s in shapes] == [tuple(r.shape) for r in refs], spec
        assert out_dtypes == [dtype_from_torch(r.dtype) for r in refs], spec
        # ... every output dtype passes the format rules at its position ...
        types = list(dtypes) + out_dtypes
        for pos in range(len(types)):
            assert spec.supports(pos, types, ["LINEAR"] * len(types))
        # ... and run() (the enqueue body) computes it, NaN-poisoned buffers fully written.
        outs = [torch.full(s, float("nan")).to(torch_dtype(d)) for s, d in zip(shapes, out_dtypes)]
        spec.run(ins, outs)
        for o, r in zip(outs, refs):
            _close(o, r)
        for pos, want in in_place.items():
            _close(ins[pos], want)


def test_type_rules_cover_outputs_and_all_combinations_enumerate():
    for spec in ALL_SPECS:
        combos = all_type_combinations(spec)
        assert len(combos) == len(spec.input_combinations())
        for c in combos:
            assert list(c[spec.num_inputs:]) == spec.output_dtypes(list(c[: spec.num_inputs]))


def test_format_rules_reject_what_the_ops_reject():
    dec = S.PagedAttentionDecodeSpec()
    ok = ["bfloat16", "bfloat16", "bfloat16", "int32", "int32", "bfloat16"]
    assert all(dec.supports(p, ok) for p in range(6))
    assert not dec.supports(0, ["int32"])
    assert not dec.supports(0, ["bfloat16"], ["CHW32"])  # only linear (row-major) tensors
    assert not dec.supports(1, ["bfloat16", "float16"])  # cache in q's dtype or fp8
    assert dec.supports(1, ["bfloat16", "float8_e4m3fn"])
    assert not dec.supports(2, ["bfloat16", "float8_e4m3fn", "bfloat16"])  # v like k
    assert not dec.supports(3, ok[:3] + ["int64"])  # block tables are int32
    assert not dec.supports(5, ok[:5] + ["float32"])  # output in q's dtype
    # a rule looks only at earlier positions: garbage after pos changes nothing
    assert dec.supports(1, ["float16", "float16", "junk", "junk"])
    with pytest.raises(ValueError, match="block_tables may be"):
        dec.check_dtypes(["float16", "float16", "float16", "int64", "int32"])
    with pytest.raises(ValueError, match="takes 5 inputs"):
        dec.check_dtypes(["float16"])
    gemm = S.Fp8GemmSpec(out_dtype="float16", has_bias=1)
    assert not gemm.supports(0, ["bfloat16"])  # a is fp8 unless quantize_a
    assert not gemm.supports(4, ["float8_e4m3fn"] * 2 + ["float32"] * 2 + ["bfloat16"])  # bias in out dtype
    assert gemm.supports(5, ["float8_e4m3fn"] * 2 + ["float32"] * 2 + ["float16", "float16"])
    assert S.Fp8GemmSpec(quantize_a=1).supports(0, ["bfloat16"])
    norm = S.RmsNormSpec(quant_fp8=1, residual=1)
    assert norm.input_names() == ["x", "residual", "weight"]
    assert norm.output_names() == ["q", "scale", "residual_out"]
    assert not norm.supports(1, ["float16", "bfloat16"])  # residual like x


def test_shape_checks_name_the_problem():
    with pytest.raises(ValueError, match="must be 3-D"):
        S.PagedAttentionDecodeSpec().check_shapes([(2, 4), (8, 2, 4, 16), (8, 2, 4, 16), (2, 3), (2,)])
    with pytest.raises(ValueError, match="query_start_loc"):
        S.PagedAttentionPrefillSpec().check_shapes([(5, 4, 16), (8, 2, 4, 16), (8, 2, 4, 16), (2, 3), (2,), (2,)])
    with pytest.raises(ValueError, match="qkv width"):
        S.RopeWriteKVCacheSpec().check_shapes([(5,), (5, 100), (16, 16), (8, 2, 4, 16), (8, 2, 4, 16), (5,)])
    with pytest.raises(ValueError, match="a_scale"):
        S.Fp8GemmSpec().check_shapes([(5, 256), (8, 256), (5, 3), (1,)])
    with pytest.raises(ValueError, match="b_scale"):
        S.Fp8GemmSpec(quantize_a=1).check_shapes([(5, 256), (8, 256), (7, 1)])
    with pytest.raises(ValueError, match="do not chain"):
        S.FusedMlpFp8Spec().check_shapes([(3, 64), (3, 1), (256, 64), (256, 1), (64, 100), (64, 1)])
    with pytest.raises(ValueError, match="weight must be"):
        S.RmsNormSpec().check_shapes([(3, 64), (32,)])


def test_symbolic_shapes_are_expressions_over_input_dims():
    sym = SymExprs()
    rope = S.RopeWriteKVCacheSpec().output_shapes(
        [["T"], ["T", "W"], ["P", "D"], ["NB", "Hkv", 16, "D"], ["NB", "Hkv", 16, "D"], ["T"]], sym)
    assert rope == [["T", "((W // D) - (2 * Hkv))", "D"]]
    # constants fold, and the expression evaluates like the int rule
    assert S.RopeWriteKVCacheSpec().output_shapes(
        [["T"], ["T", 512], [64, 64], ["NB", 2, 16, 64], ["NB", 2, 16, 64], ["T"]], sym) == [["T", 4, 64]]
    for w, d, h in [(512, 64, 2), (1536, 128, 4), (96, 16, 1)]:
        got = eval_dim(rope[0][1], {"W": w, "D": d, "Hkv": h})
        assert got == w // d - 2 * h
    assert S.RmsNormSpec(quant_fp8=1).output_shapes([["B", "T", "H"], ["H"]], sym) == [["B", "T", "H"], ["B", "T", 1]]
    assert S.FusedMlpSpec().output_shapes([["B", "T", 64], [256, 64], [64, 128]], sym) == [["B", "T", 64]]
    assert S.Fp8GemmSpec().output_shapes([["M", "K"], ["N", "K"], ["M", 1], ["N", 1]], sym) == [["M", "N"]]
    assert sym.ceildiv("K", 128) == "cdiv(K, 128)" and eval_dim("cdiv(K, 128)", {"K": 129}) == 2


def test_field_round_trips_through_bytes_and_plugin_fields():
    import numpy as np

    for spec in ALL_SPECS:
        blob = spec.serialize()
        assert type(spec).deserialize(blob) == spec
        assert spec.serialize() == blob  # deterministic
        # as TensorRT / ONNX hand fields over: numpy arrays of other widths, CHAR arrays for strings
        handed = []
        for name, kind, value in spec.plugin_fields():
            if kind == "str":
                handed.append((name, np.frombuffer(value.encode(), np.int8)))
            elif kind == "i32":
                handed.append((name, np.array([value], np.int64)))
            else:
                handed.append((name, np.array([value], np.float64)))
        handed.append(("plugin_version", np.frombuffer(b"1", np.int8)))  # ONNX extras are ignored
        assert type(spec).from_plugin_fields(handed) == spec
    spec = S.RmsNormSpec(eps=1e-5, residual=1)
    name, values = unpack_fields(spec.serialize())
    assert name == "TrtllmRmsNorm" and values["residual"] == 1 and abs(values["eps"] - 1e-5) < 1e-12
    assert S.Fp8GemmSpec(out_dtype="float16").plugin_fields()[0] == ("out_dtype", "str", "float16")


def test_bad_fields_and_blobs_raise():
    with pytest.raises(ValueError, match="no field"):
        S.RmsNormSpec(epsilon=1e-5)
    with pytest.raises(ValueError, match="must be one of"):
        S.Fp8GemmSpec(out_dtype="int8")
    with pytest.raises(ValueError, match="must be one of"):
        S.RmsNormSpec(residual=2)
    with pytest.raises(ValueError, match="numeric"):
        S.RmsNormSpec(eps="small")
    blob = S.RmsNormSpec().serialize()
    with pytest.raises(ValueError, match="magic"):
        S.RmsNormSpec.deserialize(b"XXXX" + blob[4:])
    with pytest.raises(ValueError):
        S.RmsNormSpec.deserialize(blob[:-3])
    with pytest.raises(ValueError, match="trailing"):
        S.RmsNormSpec.deserialize(blob + b"\0")
    with pytest.raises(ValueError, match="not 'TrtllmFp8Gemm'"):
        S.Fp8GemmSpec.deserialize(blob)
    f = FieldSpec("x", "i32", 0)
    assert pack_fields("P", [f], {"x": 7}) != pack_fields("P", [f], {"x": 8})


# ---------------------------------------------------------------------------------------------
# the Llama graph


def tiny_config(**kw):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=96, max_position_embeddings=64,
                tie_word_embeddings=True, rms_norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


GRAPH_VARIANTS = [
    dict(),
    dict(mode="decode"),
    dict(quantization="fp8", dtype="bfloat16"),
    dict(fused_mlp=True, kv_cache_dtype="fp8", dtype="bfloat16"),
    dict(quantization="nvfp4", dtype="bfloat16", mode="decode"),
    dict(quantization="mxfp4"),
]


@pytest.mark.parametrize("kw", GRAPH_VARIANTS, ids=str)
def test_onnx_export_passes_the_checker_and_names_the_plugins(kw):
    import onnx

    cfg = tiny_config()
    model = llama_graph(cfg, namespace="trtllm_kernels", version="1", **kw).to_onnx()
    onnx.checker.check_model(model)
    model = onnx.load_from_string(model.SerializeToString())  # survives serialization
    domains = {o.domain: o.version for o in model.opset_import}
    assert domains.get("trtllm_kernels") == 1 and "" in domains
    plugin_nodes = [n for n in model.graph.node if n.domain == "trtllm_kernels"]
    assert {n.op_type for n in plugin_nodes} <= set(SPECS)
    for n in plugin_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"trtllm_kernels" and attrs["plugin_version"] == b"1"
        spec = SPECS[n.op_type].from_plugin_fields(list(attrs.items()))  # fields come back from attributes
        assert set(spec.values) <= set(attrs)
    per_layer = {"TrtllmRopeWriteKVCache": 1, "TrtllmRmsNorm": 2}
    per_layer["TrtllmPagedAttentionDecode" if kw.get("mode") == "decode" else "TrtllmPagedAttentionPrefill"] = 1
    if kw.get("quantization") == "fp8":
        per_layer.update(TrtllmFp8Gemm=2, TrtllmFusedMlpFp8=1)
    if kw.get("fused_mlp"):
        per_layer["TrtllmFusedMlp"] = 1
    if kw.get("quantization") in ("nvfp4", "mxfp4"):
        per_layer["TrtllmFp4Gemm"] = 4
    for op, count in per_layer.items():
        extra = 1 if op == "TrtllmRmsNorm" else 0  # the final norm
        assert sum(n.op_type == op for n in plugin_nodes) == count * cfg.num_hidden_layers + extra, op
    standard = {n.op_type for n in model.graph.node if n.domain == ""}
    assert {"Gather", "MatMul", "Cast"} <= standard
    if kw.get("quantization") != "fp8" and not kw.get("fused_mlp"):
        assert {"Split", "Sigmoid", "Mul", "Reshape"} <= standard
    assert [o.name for o in model.graph.output] == ["logits"]
    caches = [i for i in model.graph.input if i.name.startswith(("k_cache_", "v_cache_"))]
    assert len(caches) == 2 * cfg.num_hidden_layers


def test_onnx_namespace_version_and_layer_graph():
    import onnx

    g = llama_layer_graph(tiny_config(), layer=1, namespace="myns", version="3")
    model = g.to_onnx()
    onnx.checker.check_model(model)
    ops = [n for n in model.graph.node if n.domain == "myns"]
    assert ops and all(onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "plugin_version")) == b"3"
                       for n in ops)
    assert [i.name for i in model.graph.input][:2] == ["hidden", "residual"]
    rope = next(n for n in g.plugin_nodes() if n.op == "TrtllmRopeWriteKVCache")
    assert g.values[rope.outputs[0]].shape == ["T", 4, 16]  # the spec's rule, folded


def _step(cfg, page=4, nb=12, lens=(5, 3), dtype=torch.float32, cache_dtype=None):
    """A prefill step of sequences of `lens` tokens: inputs of the graph and the engine model."""
    cache_dtype = cache_dtype or dtype
    mb = max(-(-n // page) for n in lens)
    blocks = torch.arange(len(lens) * mb, dtype=torch.int32).reshape(len(lens), mb) + 1
    positions = torch.cat([torch.arange(n) for n in lens])
    slots = torch.cat([blocks[i, torch.arange(n) // page].long() * page + torch.arange(n) % page
                       for i, n in enumerate(lens)])
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),))
    shape = (nb, cfg.num_key_value_heads, page, cfg.head_dim)
    caches = [(torch.zeros(shape).to(cache_dtype), torch.zeros(shape).to(cache_dtype))
              for _ in range(cfg.num_hidden_layers)]
    feeds = {"input_ids": ids, "positions": positions, "slot_mapping": slots, "block_tables": blocks,
             "seq_lens": seq_lens, "query_start_loc": qsl, "logits_indices": qsl[1:].long() - 1}
    for i, (k, v) in enumerate(caches):
        feeds[f"k_cache_{i}"], feeds[f"v_cache_{i}"] = k.clone(), v.clone()
    meta = AttentionMetadata(slots, blocks, seq_lens, qsl, 0)
    return feeds, meta, caches


@pytest.mark.parametrize("quant", [None, "fp8", "fp8-prequantized"])
def test_graph_computes_what_the_engine_model_computes(quant):
    """Executed eagerly (standard ops in torch, plugins through their run()), the graph gives
    the engine model's logits and leaves the same KV cache: the network is the same model.
    fp8: the graph quantizes float weights itself, or takes an FP8 engine's weights as they are."""
    from trtllm_kernels.engine.quantize import Fp8LlamaModel, quantize_weights
    from trtllm_kernels.plugins import random_weights

    cfg = tiny_config()
    weights = random_weights(cfg, "float32")
    q_weights = quantize_weights(cfg, weights)
    graph_weights = q_weights if quant == "fp8-prequantized" else weights
    graph = llama_graph(cfg, graph_weights, dtype="float32", quantization=quant and "fp8", page_size=4)
    feeds, meta, caches = _step(cfg)
    got = run_torch(graph, feeds)["logits"]
    model = Fp8LlamaModel(cfg, q_weights) if quant else LlamaModel(cfg, weights)
    hidden = model.forward(feeds["input_ids"], feeds["positions"], meta, caches)
    want = model.compute_logits(hidden[feeds["logits_indices"]])
    assert got.shape == want.shape == (2, cfg.vocab_size) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    for i, (k, v) in enumerate(caches):
        torch.testing.assert_close(feeds[f"k_cache_{i}"], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feeds[f"v_cache_{i}"], v, rtol=1e-5, atol=1e-5)
        assert k.abs().sum() > 0  # the write happened


def _fp4_dequantized(cfg, weights, fmt):
    """The weights an FP4 engine computes with: each linear weight quantized and dequantized."""
    from trtllm_kernels.fp4 import dequantize_fp4, quantize_fp4

    out = dict(weights)
    for i in range(cfg.num_hidden_layers):
        for name in ("qkv", "o", "gate_up", "down"):
            key = f"layers.{i}.{name}"
            out[key] = dequantize_fp4(*quantize_fp4(weights[key].float(), fmt)).to(weights[key].dtype)
    return out


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_graph_computes_the_model_on_dequantized_weights(fmt):
    """W4A16: the FP4 graph equals the engine model run on the FP4 weights dequantized."""
    from trtllm_kernels.plugins import random_weights

    cfg = tiny_config()
    weights = random_weights(cfg, "float32")
    deq = _fp4_dequantized(cfg, weights, fmt)
    graph = llama_graph(cfg, weights, dtype="float32", quantization=fmt, page_size=4)
    assert sum(n.op == "TrtllmFp4Gemm" for n in graph.plugin_nodes()) == 4 * cfg.num_hidden_layers
    feeds, meta, caches = _step(cfg)
    got = run_torch(graph, feeds)["logits"]
    model = LlamaModel(cfg, deq)
    want = model.compute_logits(model.forward(feeds["input_ids"], feeds["positions"], meta, caches)[feeds["logits_indices"]])
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


def test_decode_graph_matches_prefill_graph_on_one_token_steps():
    from trtllm_kernels.plugins import random_weights

    cfg = tiny_config(num_hidden_layers=1)
    w = random_weights(cfg, "float32", num_layers=1)
    feeds, _, _ = _step(cfg, lens=(1, 1, 1))
    dec = {k: v.clone() for k, v in feeds.items() if k != "query_start_loc"}
    a = run_torch(llama_graph(cfg, w, dtype="float32", page_size=4), feeds)["logits"]
    b = run_torch(llama_graph(cfg, w, dtype="float32", page_size=4, mode="decode"), dec)["logits"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_graph_rejects_mis_wired_plugins():
    from trtllm_kernels.plugins import Graph

    g = Graph()
    x = g.input("x", "float16", ["T", 8])
    w = g.input("w", "bfloat16", [8])
    with pytest.raises(ValueError, match="weight may be"):
        g.plugin(S.RmsNormSpec(), [x, w])
    with pytest.raises(ValueError, match="unknown input"):
        g.plugin(S.RmsNormSpec(), [x, "nope"])


# ---------------------------------------------------------------------------------------------
# TensorRT (skipped unless a TensorRT module imports)


@needs_trt
def test_register_plugins_and_find_every_creator():
    from trtllm_kernels.plugins import register_plugins

    creators = register_plugins(TRT, namespace="trtllm_kernels", version="1")
    assert set(creators) == set(SPECS)
    assert register_plugins(TRT) == creators  # idempotent
    registry = TRT.get_plugin_registry()
    for name in SPECS:
        c = registry.get_creator(name, "1", "trtllm_kernels")
        assert c is not None and c.name == name
        declared = [f.name for f in c.field_names]
        assert declared == [f.name for f in SPECS[name].fields]


@needs_trt
@pytest.mark.parametrize("kw", GRAPH_VARIANTS, ids=str)
def test_engine_builds_with_every_plugin_through_the_onnx_parser(kw):
    from trtllm_kernels.plugins import build_engine, default_profile
    from trtllm_kernels.plugins.trt_plugin import CALLS, CREATED

    CALLS.clear()
    graph = llama_graph(tiny_config(), **kw)
    blob, info = build_engine(graph, TRT, profile=default_profile(kw.get("mode", "prefill")), via="onnx")
    assert len(blob) > 1000
    used = {n.op for n in graph.plugin_nodes()}
    assert {name.rsplit("_", 1)[0] for name in info["plugin_layers"]} == used
    for name in used:
        for method in ("get_output_data_types", "get_output_shapes", "supports_format_combination",
                       "configure_plugin", "get_fields_to_serialize"):
            assert CALLS[(name, method)] > 0, (name, method)
    made = [s for phase, s in CREATED if phase == "BUILD"]
    assert any(isinstance(s, S.PagedAttentionPrefillSpec if kw.get("mode") != "decode" else S.PagedAttentionDecodeSpec)
               and abs(s.scale - 0.25) < 1e-7 for s in made)  # fields crossed the parser intact


@needs_trt
def test_plugins_recreate_from_serialized_fields_at_runtime():
    """What an engine stores (get_fields_to_serialize) recreates the same plugin through the
    creator in the RUNTIME phase, as deserialization does."""
    from trtllm_kernels.plugins import register_plugins
    from trtllm_kernels.plugins.trt_plugin import create_plugin, trt_fields

    creators = register_plugins(TRT)
    for spec in ALL_SPECS:
        built = create_plugin(TRT, spec)
        assert built.spec == spec and built.num_outputs == spec.num_outputs
        assert (built.plugin_name, built.plugin_version, built.plugin_namespace) == (spec.name, "1", "trtllm_kernels")
        stored = built.get_fields_to_serialize()
        again = creators[spec.name].create_plugin(spec.name, stored, TRT.TensorRTPhase.RUNTIME)
        assert again.spec == spec
        keep = []
        assert creators[spec.name].create_plugin(spec.name, trt_fields(TRT, spec, keep), TRT.TensorRTPhase.BUILD).spec == spec


@needs_trt
def test_direct_network_lowering_of_standard_layers():
    """The Graph -> INetworkDefinition lowering, on a graph of standard layers only (TensorRT-RTX
    has no add_plugin_v3 in Python; the full tensorrt path adds plugin layers the same way)."""
    from trtllm_kernels.plugins import Graph, build_engine

    g = Graph("mlp")
    x = g.input("x", "float16", ["T", 32])
    w = g.const("w", torch.randn(32, 64).half())
    gu = g.op("MatMul", [x, w], "float16", ["T", 64])
    gate, up = g.op("Split", [gu, g.const("s", torch.tensor([32, 32]))], "float16", None, n_out=2,
                    shapes=[["T", 32], ["T", 32]], axis=-1)
    y = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], "float16", ["T", 32])], "float16", ["T", 32]), up],
             "float16", ["T", 32])
    g.output(g.op("Cast", [y], "float32", ["T", 32], names=["y"], to=1))
    prof = {"min": {"T": 1}, "opt": {"T": 4}, "max": {"T": 16}}
    blob, info = build_engine(g, TRT, profile=prof, via="network")
    assert len(blob) > 0 and info["via"] == "network"


@pytest.mark.gpu
@pytest.mark.parametrize("kw", GRAPH_VARIANTS, ids=str)
def test_graph_on_gpu_kernels_matches_the_engine_model(kw):
    """The graph with every plugin running its CUDA kernels (the enqueue body) against the
    engine's model on the same GPU, sharing one set of (quantized) weights."""
    from trtllm_kernels.engine.quantize import Fp8LlamaModel, quantize_weights
    from trtllm_kernels.plugins import random_weights

    cfg = tiny_config()
    dt = kw.get("dtype", "float16")
    w = random_weights(cfg, dt)
    graph = llama_graph(cfg, w, page_size=4, **kw)
    quant = kw.get("quantization")
    if quant == "fp8":
        w = quantize_weights(cfg, {k: v.cuda() for k, v in w.items()})
        model = Fp8LlamaModel(cfg, w)
        graph = llama_graph(cfg, {k: v.cpu() for k, v in w.items()}, page_size=4, **kw)  # same quantized weights
    else:
        if quant in ("nvfp4", "mxfp4"):
            w = _fp4_dequantized(cfg, w, quant)
        model = LlamaModel(cfg, {k: v.cuda() for k, v in w.items()})
    decode = kw.get("mode") == "decode"
    feeds, meta, caches = _step(cfg, lens=(1, 1, 1) if decode else (5, 3), dtype=torch_dtype(dt),
                                cache_dtype=FP8 if kw.get("kv_cache_dtype") == "fp8" else None)
    feeds = {k: v.cuda() for k, v in feeds.items()}
    caches = [(k.cuda(), v.cuda()) for k, v in caches]
    meta = AttentionMetadata(*(t.cuda() for t in (meta.slot_mapping, meta.block_tables, meta.seq_lens,
                                                  meta.query_start_loc)), 3 if decode else 0)
    if decode:
        feeds.pop("query_start_loc")
    got = run_torch(graph, feeds)["logits"]
    want = model.compute_logits(model.forward(feeds["input_ids"], feeds["positions"], meta, caches)[feeds["logits_indices"]])
    # FP4: the reference runs on dequantized weights rounded to the activation dtype, the kernel
    # applies the scales in fp32 (seen on the H100: 0.047 max, 3 of 288 logits past 0.02 in bf16)
    tol = 6e-2 if quant in ("nvfp4", "mxfp4") else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_engine_runs_and_matches_the_torch_ops():
    """Build and run the whole model on a full TensorRT; compare with the graph run eagerly."""
    try:
        import tensorrt as trt
        trt.get_plugin_registry  # noqa: B018
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"needs the full `tensorrt` (not obtainable here; TensorRT-RTX cannot run on compute "
                    f"capability 9.0): {e}")
    from trtllm_kernels.plugins import build_engine, default_profile, random_weights
    from trtllm_kernels.plugins.graph import run_engine

    cfg = tiny_config()
    for kw in GRAPH_VARIANTS:
        dt = kw.get("dtype", "float16")
        w = random_weights(cfg, dt)
        graph = llama_graph(cfg, w, page_size=4, **kw)
        blob, _ = build_engine(graph, trt, profile=default_profile(kw.get("mode", "prefill"), num_blocks=12))
        lens = (1, 1) if kw.get("mode") == "decode" else (5, 3)
        feeds, _, _ = _step(cfg, lens=lens, dtype=torch_dtype(dt),
                            cache_dtype=FP8 if kw.get("kv_cache_dtype") == "fp8" else None)
        if kw.get("mode") == "decode":
            feeds.pop("query_start_loc")
        feeds = {k: v.cuda() for k, v in feeds.items()}
        ref_feeds = {k: v.clone() for k, v in feeds.items()}
        got = run_engine(blob, feeds, trt)["logits"]
        want = run_torch(graph, ref_feeds)["logits"]
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
