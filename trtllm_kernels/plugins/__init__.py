"""TensorRT plugins for the trtllm_kernels ops, and the Llama model as a TensorRT network.

- `specs` / `spec`: plain-Python plugin specs (fields, dtype / format rules, symbolic output
  shapes, serialization, `run` on torch tensors). No TensorRT needed.
- `trt_plugin`: IPluginV3 (OneCore / OneBuild / OneRuntime) plugins and IPluginCreatorV3One
  creators generated from the specs for a TensorRT module; `register_plugins`.
- `graph` / `llama`: a graph IR lowered to ONNX (plugin nodes with plugin_namespace /
  plugin_version) and to a TensorRT network; the Llama decoder layer and whole model on it;
  `build_engine`.

    import tensorrt as trt                       # or tensorrt_rtx_bindings
    from trtllm_kernels.plugins import register_plugins
    register_plugins(trt)                        # namespace "trtllm_kernels", version "1"
    creator = trt.get_plugin_registry().get_creator("TrtllmRmsNorm", "1", "trtllm_kernels")
"""
from .graph import Graph, build_engine
from .llama import LlamaGraphBuilder, default_profile, llama_graph, llama_layer_graph, random_weights
from .spec import FieldSpec, IntExprs, PluginSpec, SymExprs
from .specs import (
    SPECS,
    Fp4GemmSpec,
    Fp8GemmSpec,
    FusedMlpFp8Spec,
    FusedMlpSpec,
    PagedAttentionDecodeSpec,
    PagedAttentionPrefillSpec,
    RmsNormSpec,
    RopeWriteKVCacheSpec,
)


def register_plugins(trt_module=None, namespace: str = "trtllm_kernels", version: str = "1") -> dict:
    """Register every plugin creator with `trt_module`'s plugin registry (`tensorrt`,
    `tensorrt_rtx_bindings`, or None for the first importable); returns {name: creator}."""
    from .trt_plugin import register_plugins as _register

    return _register(trt_module, namespace, version)


__all__ = [
    "SPECS", "FieldSpec", "Fp4GemmSpec", "Fp8GemmSpec", "FusedMlpFp8Spec", "FusedMlpSpec", "Graph", "IntExprs",
    "LlamaGraphBuilder", "PagedAttentionDecodeSpec", "PagedAttentionPrefillSpec", "PluginSpec", "RmsNormSpec",
    "RopeWriteKVCacheSpec", "SymExprs", "build_engine", "default_profile", "llama_graph", "llama_layer_graph",
    "random_weights", "register_plugins",
]
