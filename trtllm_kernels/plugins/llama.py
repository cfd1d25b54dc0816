"""The Llama decoder (one layer, or the whole model) as a graph of plugins and standard layers,
the same computation as `trtllm_kernels.engine.model.LlamaModel` (bf16 / fp16) and
`engine.quantize.Fp8LlamaModel` (quantization="fp8").

Per layer:
  RmsNorm (+ residual)        -> [fp8: quantized per token]
  MatMul qkv                  or  Fp8Gemm (a fp8, per-token scales)
  RopeWriteKVCache            (rotary q/k, k/v into this layer's paged cache, rotated q out)
  PagedAttentionPrefill       (mode "prefill": ragged chunks, decodes are chunks of 1)
    or PagedAttentionDecode   (mode "decode": one token per sequence)
  Reshape + MatMul o          or  Fp8Gemm (quantize_a=1)
  RmsNorm (+ residual)        -> [fp8: quantized]
  MatMul gate_up, Split, Sigmoid, Mul, Mul, MatMul down  (or FusedMlp / FusedMlpFp8 plugins)
FP4 engines (quantization "nvfp4" / "mxfp4", W4A16) replace the four MatMuls with Fp4Gemm.
Whole model: Gather (embedding) -> layers -> final RmsNorm (+ residual) -> Gather of the rows
that need logits -> MatMul (LM head) -> Cast to float32.

Inputs (symbolic dims: T tokens, S sequences, MB blocks per sequence, NB cache blocks, N rows
of logits): input_ids [T] int64, positions [T] int64, slot_mapping [T] int64, block_tables
[S, MB] int32, seq_lens [S] int32, query_start_loc [S + 1] int32 (prefill mode), logits_indices
[N] int64, and k_cache_<i> / v_cache_<i> [NB, Hkv, page_size, D] per layer (activation dtype,
or float8_e4m3fn for an FP8 cache), written in place. Output: logits [N, vocab].

`config` is any object with Hugging Face Llama attribute names (e.g. engine.config.ModelConfig);
weights use the engine's fused names (`layers.<i>.qkv` etc.). MatMul weights are stored
transposed ([K, N]) so a plain MatMul computes x @ W^T.
"""
from __future__ import annotations

from .graph import Graph
from .specs import (
    Fp4GemmSpec,
    Fp8GemmSpec,
    FusedMlpFp8Spec,
    FusedMlpSpec,
    PagedAttentionDecodeSpec,
    PagedAttentionPrefillSpec,
    RmsNormSpec,
    RopeWriteKVCacheSpec,
)

LAYER_WEIGHTS = ("attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down")


def random_weights(config, dtype: str = "float16", seed: int = 0, num_layers: int | None = None) -> dict:
    """Random weights at the model's shapes (speed and graph structure do not depend on values)."""
    import torch

    from .spec import torch_dtype

    g = torch.Generator().manual_seed(seed)
    c = config
    layers = c.num_hidden_layers if num_layers is None else num_layers
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    shapes = {"embed": (c.vocab_size, c.hidden_size), "norm": (c.hidden_size,)}
    for i in range(layers):
        shapes.update({
            f"layers.{i}.attn_norm": (c.hidden_size,), f"layers.{i}.mlp_norm": (c.hidden_size,),
            f"layers.{i}.qkv": (qkv, c.hidden_size), f"layers.{i}.o": (c.hidden_size, c.num_attention_heads * c.head_dim),
            f"layers.{i}.gate_up": (2 * c.intermediate_size, c.hidden_size),
            f"layers.{i}.down": (c.hidden_size, c.intermediate_size),
        })
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (c.vocab_size, c.hidden_size)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            w = torch.randn(shape, generator=g) * shape[1] ** -0.5
        out[name] = w.to(torch_dtype(dtype))
    return out


class LlamaGraphBuilder:
    """Builds the graph; `decoder_layer` adds one layer, `model` the whole network."""

    def __init__(self, config, weights: dict | None = None, dtype: str = "float16", quantization: str | None = None,
                 kv_cache_dtype: str = "auto", mode: str = "prefill", page_size: int = 16, fused_mlp: bool = False,
                 namespace: str = "trtllm_kernels", version: str = "1", num_layers: int | None = None,
                 max_position: int | None = None, eps: float | None = None):
        if mode not in ("prefill", "decode"):
            raise ValueError(f"mode must be 'prefill' or 'decode', got {mode!r}")
        if quantization not in (None, "fp8", "nvfp4", "mxfp4", "mxfp4_w4a8"):
            raise ValueError("quantization must be None, 'fp8', 'nvfp4', 'mxfp4' or 'mxfp4_w4a8', "
                             f"got {quantization!r}")
        if fused_mlp and quantization is not None:
            raise ValueError("fused_mlp is the bf16/fp16 MLP plugin; FP8 has its own, FP4 uses FP4 GEMMs")
        if kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {kv_cache_dtype!r}")
        self.c = config
        self.num_layers = config.num_hidden_layers if num_layers is None else num_layers
        self.dtype, self.quantization, self.mode, self.page_size = dtype, quantization, mode, page_size
        self.fused_mlp = fused_mlp
        self.cache_dtype = "float8_e4m3fn" if kv_cache_dtype == "fp8" else dtype
        self.weights = weights if weights is not None else random_weights(config, dtype, num_layers=self.num_layers)
        self.eps = config.rms_norm_eps if eps is None else eps
        self.max_position = max_position or config.max_position_embeddings
        self.g = Graph(f"llama_{self.num_layers}l_{mode}_{quantization or dtype}", namespace, version)
        self._inputs_made = False

    # --- pieces ---------------------------------------------------------------------------------
    def _weight(self, name, transpose=False):
        w = self.weights[name]
        return self.g.const(name + (".T" if transpose else ""), w.t().contiguous() if transpose else w, self.dtype)

    def _fp8_weight(self, name):
        """Per-output-channel fp8 weight and its fp32 [N, 1] scale."""
        import trtllm_kernels as tk

        w = self.weights[name]
        if w.dtype.is_floating_point and w.element_size() > 1:
            q, s = tk.quantize_fp8_per_channel(w.float())
        else:
            q, s = w, self.weights[name + "_scale"]
        return self.g.const(name + ".fp8", q, "float8_e4m3fn"), self.g.const(name + ".scale", s.float(), "float32")

    def _fp4_weight(self, name):
        """Packed FP4 weight, its group scales and (NVFP4) the fp32 global scale. Bytes are stored
        as int8: TensorRT's ONNX parser converts UINT8 initializers to INT32 values, and
        TensorRT-RTX refuses INT8 and FP8 tensors in one fused graph (so no FP8 scales either)."""
        from trtllm_kernels.engine.quantize import fp4_weight_format
        from trtllm_kernels.fp4 import quantize_fp4

        packed, scale, glob = quantize_fp4(self.weights[name].float(), fp4_weight_format(self.quantization))
        out = [self.g.const(name + ".fp4", packed, "int8"),
               self.g.const(name + ".scale", scale, "int8")]  # e4m3 (NVFP4) or e8m0 (MXFP4) bytes
        if glob is not None:
            out.append(self.g.const(name + ".global_scale", glob.float().reshape(1), "float32"))
        return out

    def _linear(self, x, name):
        """x @ W^T: a MatMul, or the FP4 GEMM plugin for FP4 engines (W4A16, or W4A8)."""
        if self.quantization in ("nvfp4", "mxfp4", "mxfp4_w4a8"):
            return self.g.plugin(Fp4GemmSpec(fp4_format=self.quantization), [x] + self._fp4_weight(name))
        return self._matmul(x, name)

    def inputs(self) -> dict:
        if self._inputs_made:
            return self._in
        g, c = self.g, self.c
        seqs = "T" if self.mode == "decode" else "S"
        self._in = {
            "positions": g.input("positions", "int64", ["T"]),
            "slot_mapping": g.input("slot_mapping", "int64", ["T"]),
            "block_tables": g.input("block_tables", "int32", [seqs, "MB"]),
            "seq_lens": g.input("seq_lens", "int32", [seqs]),
        }
        if self.mode == "prefill":
            self._in["query_start_loc"] = g.input("query_start_loc", "int32", ["(S + 1)"])
        from trtllm_kernels.rotary import rope_cos_sin_cache

        cs = rope_cos_sin_cache(c.head_dim, self.max_position, c.rope_theta, getattr(c, "rope_scaling", None))
        self._in["cos_sin_cache"] = g.const("cos_sin_cache", cs, "float32")
        self._inputs_made = True
        return self._in

    def decoder_layer(self, i: int, hidden: str, residual: str | None) -> tuple[str, str]:
        """One decoder layer; returns (hidden, residual) for the next."""
        g, c, inp = self.g, self.c, self.inputs()
        fp8 = self.quantization == "fp8"
        pre = f"layers.{i}."
        cache_shape = ["NB", c.num_key_value_heads, self.page_size, c.head_dim]
        kc = g.input(f"k_cache_{i}", self.cache_dtype, cache_shape)
        vc = g.input(f"v_cache_{i}", self.cache_dtype, cache_shape)
        kv_scales = {"k_scale": 1.0, "v_scale": 1.0}

        def norm(x, res, weight):
            spec = RmsNormSpec(eps=self.eps, residual=int(res is not None), quant_fp8=int(fp8), fp8_dtype="float8_e4m3fn")
            outs = g.plugin(spec, [x] + ([res] if res is not None else []) + [self._weight(weight)])
            outs = outs if isinstance(outs, list) else [outs]
            new_res = outs[-1] if res is not None else x
            return outs[:2] if fp8 else outs[:1], new_res

        normed, residual = norm(hidden, residual, pre + "attn_norm")
        if fp8:
            w, s = self._fp8_weight(pre + "qkv")
            qkv = g.plugin(Fp8GemmSpec(out_dtype=self.dtype), [normed[0], w, normed[1], s])
        else:
            qkv = self._linear(normed[0], pre + "qkv")
        q = g.plugin(RopeWriteKVCacheSpec(**kv_scales),
                     [inp["positions"], qkv, inp["cos_sin_cache"], kc, vc, inp["slot_mapping"]])
        attn_in = [q, kc, vc, inp["block_tables"], inp["seq_lens"]]
        if self.mode == "decode":
            attn = g.plugin(PagedAttentionDecodeSpec(scale=c.head_dim ** -0.5, **kv_scales), attn_in)
        else:
            attn = g.plugin(PagedAttentionPrefillSpec(scale=c.head_dim ** -0.5, **kv_scales),
                            attn_in + [inp["query_start_loc"]])
        q_size = c.num_attention_heads * c.head_dim
        flat = g.op("Reshape", [attn, g.const(self._name("shape"), _i64([0, -1]))], self.dtype, ["T", q_size])
        if fp8:
            w, s = self._fp8_weight(pre + "o")
            hidden = g.plugin(Fp8GemmSpec(quantize_a=1), [flat, w, s])
        else:
            hidden = self._linear(flat, pre + "o")
        normed, residual = norm(hidden, residual, pre + "mlp_norm")
        if fp8:
            wgu, sgu = self._fp8_weight(pre + "gate_up")
            wd, sd = self._fp8_weight(pre + "down")
            hidden = g.plugin(FusedMlpFp8Spec(out_dtype=self.dtype), [normed[0], normed[1], wgu, sgu, wd, sd])
        elif self.fused_mlp:
            hidden = g.plugin(FusedMlpSpec(), [normed[0], self._weight(pre + "gate_up"), self._weight(pre + "down")])
        else:
            inter = c.intermediate_size
            gu = self._linear(normed[0], pre + "gate_up")
            gate, up = g.op("Split", [gu, g.const(self._name("split"), _i64([inter, inter]))], self.dtype, None,
                            n_out=2, shapes=[["T", inter], ["T", inter]], axis=-1)
            silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], self.dtype, ["T", inter])], self.dtype, ["T", inter])
            hidden = self._linear(g.op("Mul", [silu, up], self.dtype, ["T", inter]), pre + "down")
        return hidden, residual

    def _matmul(self, x, weight):
        w = self._weight(weight, transpose=True)
        return self.g.op("MatMul", [x, w], self.dtype, ["T", self.g.values[w].shape[1]])

    def _name(self, stem):
        self.g._n += 1
        return f"{stem}_{self.g._n}"

    # --- whole graphs -----------------------------------------------------------------------------
    def layer_graph(self, i: int = 0) -> Graph:
        """One decoder layer as a graph: inputs hidden [T, H] and residual [T, H] (layer i > 0
        form), outputs the next hidden and residual."""
        h = self.g.input("hidden", self.dtype, ["T", self.c.hidden_size])
        r = self.g.input("residual", self.dtype, ["T", self.c.hidden_size]) if i > 0 else None
        hidden, residual = self.decoder_layer(i, h, r)
        self.g.output(hidden)
        self.g.output(residual)
        return self.g

    def model(self) -> Graph:
        g, c = self.g, self.c
        ids = g.input("input_ids", "int64", ["T"])
        self.inputs()
        hidden = g.op("Gather", [self._weight("embed"), ids], self.dtype, ["T", c.hidden_size], axis=0)
        residual = None
        for i in range(self.num_layers):
            hidden, residual = self.decoder_layer(i, hidden, residual)
        normed, _ = g.plugin(RmsNormSpec(eps=self.eps, residual=1), [hidden, residual, self._weight("norm")])
        idx = g.input("logits_indices", "int64", ["N"])
        rows = g.op("Gather", [normed, idx], self.dtype, ["N", c.hidden_size], axis=0)
        head = "embed" if c.tie_word_embeddings else "lm_head"
        w = g.const(head + ".T", self.weights[head].t().contiguous(), self.dtype)
        logits = g.op("MatMul", [rows, w], self.dtype, ["N", c.vocab_size])
        g.output(g.op("Cast", [logits], "float32", ["N", c.vocab_size], names=["logits"], to=1))  # 1: FLOAT
        return g


def _i64(values):
    import torch

    return torch.tensor(values, dtype=torch.int64)


def llama_graph(config, weights=None, **kwargs) -> Graph:
    """The whole model as a graph (see LlamaGraphBuilder for the options)."""
    return LlamaGraphBuilder(config, weights, **kwargs).model()


def llama_layer_graph(config, weights=None, layer: int = 0, **kwargs) -> Graph:
    """One decoder layer as a graph."""
    return LlamaGraphBuilder(config, weights, **kwargs).layer_graph(layer)


def default_profile(mode: str = "prefill", max_tokens: int = 256, max_seqs: int = 8, max_blocks: int = 16,
                    num_blocks: int = 64) -> dict:
    """An optimization profile ({min, opt, max} of the dim symbols) for `build_engine`."""
    seqs = max_tokens if mode == "decode" else max_seqs
    return {
        "min": {"T": 1, "S": 1, "MB": 1, "NB": 1, "N": 1},
        "opt": {"T": max(1, max_tokens // 2), "S": max(1, seqs // 2), "MB": max(1, max_blocks // 2),
                "NB": num_blocks, "N": max(1, seqs // 2)},
        "max": {"T": max_tokens, "S": seqs, "MB": max_blocks, "NB": num_blocks, "N": max(seqs, 1)},
    }
