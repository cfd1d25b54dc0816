"""A small graph IR that lowers to both an ONNX model and a TensorRT network.

Nodes are ONNX-shaped (op type, input names, output names, attributes); plugin nodes carry
their spec. Every value records its dtype and shape (ints and symbolic names such as "T");
plugin output shapes come from the spec's shape rule run on `SymExprs`, so the dims written
into the ONNX value_info are the same expressions TensorRT evaluates through IExprBuilder.

- `Graph.to_onnx()`: plugin nodes become custom-op nodes of op type = plugin name, in the
  domain `namespace`, with attributes plugin_namespace / plugin_version (how TensorRT's ONNX
  parser finds a plugin creator) plus the plugin's fields.
- `Graph.to_trt_network(trt, network)`: standard layers (gather, matrix multiply, activation,
  elementwise, shuffle, slice, cast, constants) and `add_plugin_v3` for plugin nodes, where the
  TensorRT module has it. TensorRT-RTX 1.7's Python network API has no add_plugin_v3, so there
  `build_engine` goes through the ONNX parser (which creates the plugin layers itself).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

from .spec import PluginSpec, SymExprs, itemsize, onnx_dtype, trt_dtype

ONNX_OPSET = 18


@dataclass
class Value:
    name: str
    dtype: str
    shape: list


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    spec: PluginSpec | None = None


class Graph:
    def __init__(self, name: str = "graph", namespace: str = "trtllm_kernels", version: str = "1"):
        self.name, self.namespace, self.version = name, namespace, version
        self.values: dict[str, Value] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.nodes: list[Node] = []
        self.initializers: dict[str, Any] = {}  # name -> torch tensor (CPU)
        self._n = 0

    # --- building ----------------------------------------------------------------------------
    def _fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def _add_value(self, name, dtype, shape):
        if name in self.values:
            raise ValueError(f"value {name!r} defined twice")
        self.values[name] = Value(name, dtype, list(shape))
        return name

    def input(self, name: str, dtype: str, shape: list) -> str:
        self.inputs.append(self._add_value(name, dtype, shape))
        return name

    def output(self, name: str) -> None:
        self.outputs.append(name)

    def const(self, name: str, tensor, dtype: str | None = None) -> str:
        """A weight from a CPU torch tensor, stored as `dtype` (default: the tensor's)."""
        from .spec import dtype_from_torch, torch_dtype

        t = tensor.detach().cpu().contiguous()
        dtype = dtype or dtype_from_torch(t.dtype)
        if t.dtype != torch_dtype(dtype):
            t = t.view(torch_dtype(dtype)) if t.element_size() == itemsize(dtype) else t.to(torch_dtype(dtype))
        self.initializers[name] = t
        return self._add_value(name, dtype, list(t.shape))

    def op(self, op: str, inputs: list[str], dtype: str, shape: list, n_out: int = 1, shapes=None, names=None,
           **attrs):
        """A standard ONNX op; the caller states the output dtype and shape(s)."""
        for i in inputs:
            if i not in self.values:
                raise ValueError(f"{op}: unknown input {i!r}")
        outs = list(names) if names else [self._fresh(op.lower()) for _ in range(n_out)]
        for k, o in enumerate(outs):
            self._add_value(o, dtype, shapes[k] if shapes else shape)
        self.nodes.append(Node(op, list(inputs), outs, attrs))
        return outs[0] if n_out == 1 else outs

    def plugin(self, spec: PluginSpec, inputs: list[str]):
        """A plugin node; dtypes are checked against the spec's rules and output shapes come
        from its shape rule on the inputs' symbolic dims."""
        for i in inputs:
            if i not in self.values:
                raise ValueError(f"{spec.name}: unknown input {i!r}")
        in_vals = [self.values[i] for i in inputs]
        spec.check_dtypes([v.dtype for v in in_vals])
        shapes = spec.output_shapes([v.shape for v in in_vals], SymExprs())
        dtypes = spec.output_dtypes([v.dtype for v in in_vals])
        outs = [self._add_value(self._fresh(f"{spec.name}.{n}"), dt, s)
                for n, dt, s in zip(spec.output_names(), dtypes, shapes)]
        self.nodes.append(Node(spec.name, list(inputs), outs, dict(spec.onnx_attributes()), spec))
        return outs[0] if len(outs) == 1 else outs

    def plugin_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.spec is not None]

    # --- ONNX ----------------------------------------------------------------------------------
    def to_onnx(self):
        from onnx import helper

        def vinfo(name):
            v = self.values[name]
            return helper.make_tensor_value_info(name, onnx_dtype(v.dtype), [d if isinstance(d, int) else str(d) for d in v.shape])

        nodes = []
        for i, n in enumerate(self.nodes):
            if n.spec is not None:
                attrs = dict(n.attrs, plugin_namespace=self.namespace, plugin_version=self.version)
                nodes.append(helper.make_node(n.op, n.inputs, n.outputs, name=f"{n.op}_{i}", domain=self.namespace, **attrs))
            else:
                nodes.append(helper.make_node(n.op, n.inputs, n.outputs, name=f"{n.op}_{i}", **n.attrs))
        inits = []
        for name, t in self.initializers.items():
            v = self.values[name]
            inits.append(helper.make_tensor(name, onnx_dtype(v.dtype), list(t.shape),
                                            vals=_raw_bytes(t), raw=True))
        internal = [o for n in self.nodes for o in n.outputs if o not in self.outputs]
        graph = helper.make_graph(nodes, self.name, [vinfo(i) for i in self.inputs], [vinfo(o) for o in self.outputs],
                                  initializer=inits, value_info=[vinfo(o) for o in internal])
        model = helper.make_model(graph, producer_name="trtllm_kernels",
                                  opset_imports=[helper.make_opsetid("", ONNX_OPSET),
                                                 helper.make_opsetid(self.namespace, int(self.version))])
        model.ir_version = min(model.ir_version, 10)  # TensorRT's parser reads up to IR 10
        return model

    # --- TensorRT ------------------------------------------------------------------------------
    def to_trt_network(self, trt, network) -> dict:
        """Add this graph's layers to `network`; returns {value name: ITensor}."""
        import numpy as np

        from .trt_plugin import create_plugin

        tensors = {}
        self._keep = []
        for name in self.inputs:
            v = self.values[name]
            tensors[name] = network.add_input(name, trt_dtype(trt, v.dtype), [d if isinstance(d, int) else -1 for d in v.shape])
        for name, t in self.initializers.items():
            v = self.values[name]
            self._keep.append(t)
            w = trt.Weights(trt_dtype(trt, v.dtype), t.data_ptr(), t.numel())
            layer = network.add_constant(list(t.shape), w)
            layer.name = f"const:{name}"
            tensors[name] = layer.get_output(0)

        def shape_const(vals):
            arr = np.array(vals, np.int64)
            self._keep.append(arr)
            return network.add_constant([len(vals)], trt.Weights(arr)).get_output(0)

        for n in self.nodes:
            ins = [tensors[i] for i in n.inputs]
            if n.spec is not None:
                if not hasattr(network, "add_plugin_v3"):
                    raise NotImplementedError(
                        f"{trt.__name__} has no INetworkDefinition.add_plugin_v3 in Python; build through the "
                        f"ONNX parser instead (build_engine(..., via='onnx'))")
                layer = network.add_plugin_v3(ins, [], create_plugin(trt, n.spec, self.namespace, self.version))
                outs = [layer.get_output(k) for k in range(len(n.outputs))]
            elif n.op == "Gather":
                layer = network.add_gather(ins[0], ins[1], n.attrs.get("axis", 0))
                outs = [layer.get_output(0)]
            elif n.op == "MatMul":
                layer = network.add_matrix_multiply(ins[0], trt.MatrixOperation.NONE, ins[1], trt.MatrixOperation.NONE)
                outs = [layer.get_output(0)]
            elif n.op == "Sigmoid":
                layer = network.add_activation(ins[0], trt.ActivationType.SIGMOID)
                outs = [layer.get_output(0)]
            elif n.op in ("Mul", "Add"):
                op = trt.ElementWiseOperation.PROD if n.op == "Mul" else trt.ElementWiseOperation.SUM
                layer = network.add_elementwise(ins[0], ins[1], op)
                outs = [layer.get_output(0)]
            elif n.op == "Cast":
                to = self.values[n.outputs[0]].dtype
                layer = network.add_cast(ins[0], trt_dtype(trt, to))
                outs = [layer.get_output(0)]
            elif n.op == "Reshape":
                layer = network.add_shuffle(ins[0])
                layer.reshape_dims = [int(d) for d in self.initializers[n.inputs[1]].tolist()]
                outs = [layer.get_output(0)]
            elif n.op == "Split":
                # Along the last axis, static sizes: one slice each, its size tensor built from
                # the input's (dynamic) shape with the last entry replaced.
                sizes = [int(s) for s in self.initializers[n.inputs[1]].tolist()]
                x = ins[0]
                rank = len(self.values[n.inputs[0]].shape)
                shp = network.add_shape(x).get_output(0)
                lead = network.add_slice(shp, [0], [rank - 1], [1]).get_output(0)
                outs, start = [], 0
                for s in sizes:
                    size = network.add_concatenation([lead, shape_const([s])]).get_output(0)
                    sl = network.add_slice(x, [0] * (rank - 1) + [start], [1] * rank, [1] * rank)
                    sl.set_input(2, size)
                    outs.append(sl.get_output(0))
                    start += s
                layer = sl
            else:
                raise NotImplementedError(f"no TensorRT lowering for ONNX op {n.op}")
            layer.name = f"{n.op}:{n.outputs[0]}"
            for name, t in zip(n.outputs, outs):
                t.name = name
                tensors[name] = t
        for name in self.outputs:
            network.mark_output(tensors[name])
        return tensors


def _raw_bytes(t) -> bytes:
    """A tensor's little-endian bytes (bf16 and fp8 have no numpy dtype: go through uint8)."""
    import torch

    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------------------------------------
# dims


def eval_dim(d, symbols: dict[str, int]) -> int:
    """A dim (int, symbol or SymExprs expression string) -> int for given symbol values."""
    if isinstance(d, int):
        return d
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.FloorDiv: lambda a, b: a // b}

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in symbols:
                raise ValueError(f"no value for dim symbol {node.id!r}")
            return symbols[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("max", "cdiv") and len(node.args) == 2:
            a, b = (ev(x) for x in node.args)
            return max(a, b) if node.func.id == "max" else -(-a // b)
        raise ValueError(f"cannot evaluate dim {d!r}")

    return ev(ast.parse(str(d), mode="eval").body)


def input_shapes(graph: Graph, symbols: dict[str, int]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(eval_dim(d, symbols) for d in graph.values[name].shape) for name in graph.inputs}


def build_engine(graph: Graph, trt=None, profile: dict | None = None, via: str = "auto", logger=None,
                 configure=None):
    """Build a serialized TensorRT engine from `graph`.

    profile: {"min"|"opt"|"max": {symbol: value}} for the dynamic dims. via: "network" (direct
    lowering with add_plugin_v3), "onnx" (the ONNX export through TensorRT's ONNX parser) or
    "auto" (network where add_plugin_v3 exists). `configure(config)` may adjust the builder
    config. Returns (serialized engine bytes, info dict).
    """
    from .trt_plugin import is_rtx, load_tensorrt, register_plugins

    trt = load_tensorrt(trt)
    register_plugins(trt, graph.namespace, graph.version)
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    if via == "auto":
        via = "network" if hasattr(network, "add_plugin_v3") else "onnx"
    if via == "network":
        graph.to_trt_network(trt, network)
    elif via == "onnx":
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(graph.to_onnx().SerializeToString()):
            errs = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
            raise RuntimeError(f"ONNX parser failed: {errs}")
    else:
        raise ValueError(f"via must be 'auto', 'network' or 'onnx', got {via!r}")
    plugin_layers = [network.get_layer(i).name for i in range(network.num_layers)
                     if network.get_layer(i).type == trt.LayerType.PLUGIN_V3]
    config = builder.create_builder_config()
    if profile is not None:
        prof = builder.create_optimization_profile()
        mins, opts, maxs = (input_shapes(graph, profile[k]) for k in ("min", "opt", "max"))
        for name in graph.inputs:
            if any(not isinstance(d, int) for d in graph.values[name].shape):
                prof.set_shape(name, mins[name], opts[name], maxs[name])
        config.add_optimization_profile(prof)
    if configure is not None:
        configure(config)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError("TensorRT failed to build the engine (see the logger's errors)")
    info = {"trt_module": trt.__name__, "trt_version": getattr(trt, "__version__", "?"), "rtx": is_rtx(trt),
            "via": via, "num_layers": network.num_layers, "plugin_layers": plugin_layers}
    return bytes(blob), info


# ---------------------------------------------------------------------------------------------
# execution


def run_torch(graph: Graph, feeds: dict, device=None, plugin_runner=None) -> dict:
    """Execute the graph eagerly with torch: standard ops in torch, plugin nodes through their
    spec's `run` (the same code a plugin's enqueue runs), or through `plugin_runner(spec,
    inputs, outputs)` (e.g. `trt_plugin.enqueue_runner`, the real enqueue on raw pointers).
    The reference for engine outputs, and a check (on CPU) that the graph computes what the
    engine's model computes. Returns {output name: tensor}."""
    import torch

    from .spec import IntExprs, torch_dtype

    dev = torch.device(device) if device is not None else next(iter(feeds.values())).device
    env = {k: v for k, v in feeds.items()}
    for name, t in graph.initializers.items():
        env[name] = t.to(dev)
    for n in graph.nodes:
        x = [env[i] for i in n.inputs]
        if n.spec is not None:
            n.spec.check_shapes([tuple(t.shape) for t in x])
            shapes = n.spec.output_shapes([list(t.shape) for t in x], IntExprs())
            dtypes = n.spec.output_dtypes([graph.values[i].dtype for i in n.inputs])
            outs = [torch.empty(s, dtype=torch_dtype(d), device=dev) for s, d in zip(shapes, dtypes)]
            (plugin_runner or (lambda spec, i, o: spec.run(i, o)))(n.spec, x, outs)
        elif n.op == "Gather":
            outs = [torch.index_select(x[0], n.attrs.get("axis", 0), x[1])]
        elif n.op == "MatMul":
            outs = [(x[0].float() @ x[1].float()).to(x[0].dtype)]
        elif n.op == "Sigmoid":
            outs = [torch.sigmoid(x[0].float()).to(x[0].dtype)]
        elif n.op == "Mul":
            outs = [(x[0].float() * x[1].float()).to(x[0].dtype)]
        elif n.op == "Add":
            outs = [(x[0].float() + x[1].float()).to(x[0].dtype)]
        elif n.op == "Cast":
            outs = [x[0].to(torch_dtype(graph.values[n.outputs[0]].dtype))]
        elif n.op == "Reshape":
            shape = [x[0].shape[k] if d == 0 else d for k, d in enumerate(x[1].tolist())]
            outs = [x[0].reshape(shape)]
        elif n.op == "Split":
            outs = list(torch.split(x[0], x[1].tolist(), dim=n.attrs.get("axis", 0)))
        else:
            raise NotImplementedError(f"no torch execution for ONNX op {n.op}")
        for name, t in zip(n.outputs, outs):
            env[name] = t
    return {name: env[name] for name in graph.outputs}


def run_engine(blob: bytes, feeds: dict, trt=None, logger=None) -> dict:
    """Deserialize `blob` and run it once on CUDA torch tensors `feeds` (name -> tensor);
    returns {output name: tensor}. Raises RuntimeError with TensorRT's words if it cannot."""
    import torch

    from .spec import dtype_from_trt, torch_dtype
    from .trt_plugin import load_tensorrt

    trt = load_tensorrt(trt)

    class _Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines = []

        def log(self, severity, msg):
            self.lines.append(f"[{severity}] {msg}")

    log = logger or _Capture()
    runtime = trt.Runtime(log)
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        raise RuntimeError("deserialize_cuda_engine returned None: " + " | ".join(getattr(log, "lines", [])))
    context = engine.create_execution_context()
    if context is None:
        raise RuntimeError("create_execution_context returned None: " + " | ".join(getattr(log, "lines", [])))
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            t = feeds[name].contiguous()
            feeds[name] = t
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(context.get_tensor_shape(name))
            dt = torch_dtype(dtype_from_trt(trt, engine.get_tensor_dtype(name)))
            outputs[name] = torch.empty(shape, dtype=dt, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("execute_async_v3 failed: " + " | ".join(getattr(log, "lines", [])))
    stream.synchronize()
    return outputs
