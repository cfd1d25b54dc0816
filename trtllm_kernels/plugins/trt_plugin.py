"""IPluginV3 plugins and IPluginCreatorV3One creators, generated from the specs, for a given
TensorRT Python module (`tensorrt`, or `tensorrt_rtx_bindings` for TensorRT-RTX).

Each plugin class implements the three capabilities of IPluginV3 from Python:
- OneCore: plugin_name / plugin_version / plugin_namespace;
- OneBuild: get_output_data_types, get_output_shapes (through TensorRT's IExprBuilder),
  supports_format_combination, configure_plugin, get_workspace_size (0);
- OneRuntime: on_shape_change (checks the concrete shapes), enqueue, attach_to_context,
  get_fields_to_serialize (the engine stores the spec's fields, so a deserialized engine
  recreates the plugin through the creator with phase RUNTIME).
enqueue wraps TensorRT's device pointers as torch tensors (a `__cuda_array_interface__`
view of the bytes, then `.view(dtype)`) and runs the spec's torch op on TensorRT's stream, so
the plugin launches the same kernels as `torch.ops.trtllm_kernels.*`, plus one device copy
per output (the ops have no out= variant).

Nothing here is imported by `trtllm_kernels.plugins` until TensorRT is asked for.
"""
from __future__ import annotations

import collections
import glob
import importlib
import os
import warnings

from .spec import PluginSpec, dtype_from_trt, itemsize, torch_dtype, trt_dtype
from .specs import SPECS

DEFAULT_NAMESPACE = "trtllm_kernels"
DEFAULT_VERSION = "1"

# (plugin name, method) -> number of calls: evidence of which build/runtime methods TensorRT
# called (the GPU check prints it).
CALLS: collections.Counter = collections.Counter()
# The specs the creators made, latest last (what a field round trip through TensorRT produced).
CREATED: collections.deque = collections.deque(maxlen=256)

# Plugin objects handed to TensorRT (from create_plugin and clone). The Python bindings keep a
# raw pointer only: a plugin that Python collects while TensorRT still uses it corrupts the heap
# (seen with TensorRT-RTX 1.7: "malloc(): unaligned tcache chunk" after a build). TensorRT calls
# destroy() when it is done with one, which lets it go.
_ALIVE: list = []
_CLASSES: dict = {}
_CREATORS: dict = {}  # keeps the creators alive: the registry holds raw pointers


def load_tensorrt(trt_module=None):
    """`trt_module` itself, else `tensorrt`, else `tensorrt_rtx_bindings`; ImportError if none."""
    if trt_module is not None:
        if isinstance(trt_module, str):
            trt_module = importlib.import_module(trt_module)
        if is_rtx(trt_module):
            rtx_parser_shim()
        return trt_module
    errors = []
    for name in ("tensorrt", "tensorrt_rtx_bindings"):
        try:
            trt = importlib.import_module(name)
            trt.get_plugin_registry  # noqa: B018  (the PyPI stub has no registry)
        except Exception as e:  # noqa: BLE001 - stubs raise all sorts of errors on import
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if is_rtx(trt):
            rtx_parser_shim()
        return trt
    raise ImportError("no TensorRT Python module is importable (" + "; ".join(errors) + ")")


def is_rtx(trt) -> bool:
    return trt.__name__.split(".")[0].startswith("tensorrt_rtx")


def rtx_parser_shim() -> str | None:
    """TensorRT-RTX's ONNX parser dlopen()s "libtensorrt_rtx.so" when it imports a plugin node,
    but the libs wheel ships only libtensorrt_rtx.so.1, so parsing a plugin node aborts the
    process (std::terminate). The parser's RPATH is $ORIGIN: a symlink beside it fixes that.
    Returns the symlink's path, or None when the libs package is not found or not writable."""
    try:
        import tensorrt_rtx_libs
    except ImportError:
        return None
    libdir = os.path.dirname(os.path.realpath(tensorrt_rtx_libs.__file__))
    link = os.path.join(libdir, "libtensorrt_rtx.so")
    if os.path.exists(link):
        return link
    versioned = sorted(glob.glob(os.path.join(libdir, "libtensorrt_rtx.so.*")))
    if not versioned:
        return None
    try:
        os.symlink(os.path.basename(versioned[0]), link)
    except OSError as e:
        warnings.warn(f"cannot create {link} ({e}); TensorRT-RTX's ONNX parser will abort on plugin nodes "
                      f"unless a libtensorrt_rtx.so is on LD_LIBRARY_PATH")
        return None
    return link


class TrtExprs:
    """The spec's ExprBuilder protocol on TensorRT's IExprBuilder (IDimensionExpr dims)."""

    def __init__(self, trt, builder):
        self.trt, self.builder = trt, builder

    def wrap(self, x):
        return self.builder.constant(int(x)) if isinstance(x, int) else x

    def const(self, n: int):
        return self.builder.constant(int(n))

    def _op(self, name, a, b):
        return self.builder.operation(getattr(self.trt.DimensionOperation, name), self.wrap(a), self.wrap(b))

    def add(self, a, b):
        return self._op("SUM", a, b)

    def sub(self, a, b):
        return self._op("SUB", a, b)

    def mul(self, a, b):
        return self._op("PROD", a, b)

    def floordiv(self, a, b):
        return self._op("FLOOR_DIV", a, b)

    def ceildiv(self, a, b):
        return self._op("CEIL_DIV", a, b)

    def max(self, a, b):
        return self._op("MAX", a, b)


def trt_fields(trt, spec: PluginSpec, keep: list | None = None):
    """The spec's fields as a PluginFieldCollection. TensorRT keeps raw pointers to the field
    data, so the numpy arrays are appended to `keep` (an attribute of the owner)."""
    import numpy as np

    out = []
    for name, kind, value in spec.plugin_fields():
        if kind == "f32":
            arr, ft = np.array([value], np.float32), trt.PluginFieldType.FLOAT32
        elif kind == "i32":
            arr, ft = np.array([value], np.int32), trt.PluginFieldType.INT32
        else:
            arr, ft = np.frombuffer(value.encode("utf-8"), np.int8).copy(), trt.PluginFieldType.CHAR
        if keep is not None:
            keep.append(arr)
        out.append(trt.PluginField(name, arr, ft))
    return trt.PluginFieldCollection(out)


def _field_decls(trt, spec_cls, keep: list):
    """The creator's field_names: name and type of every field (the ONNX parser reads node
    attributes by these names and types)."""
    import numpy as np

    types = {"f32": (np.float32, "FLOAT32"), "i32": (np.int32, "INT32"), "str": (np.int8, "CHAR")}
    out = []
    for f in spec_cls.fields:
        np_t, ft = types[f.type]
        arr = np.zeros(0, np_t)
        keep.append(arr)
        out.append(trt.PluginField(f.name, arr, getattr(trt.PluginFieldType, ft)))
    return trt.PluginFieldCollection(out)


def _fields_from_trt(fc) -> list[tuple[str, object]]:
    import numpy as np

    return [(f.name, np.array(f.data).copy()) for f in fc]


class _CudaBytes:
    """A __cuda_array_interface__ over `nbytes` bytes at a device pointer (no stream: TensorRT
    orders the work on its own stream, which the kernels are launched on)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (int(ptr), False),
                                         "version": 2, "strides": None}


def as_torch(ptr: int, dims, dtype: str):
    """A torch tensor viewing TensorRT's buffer (no copy)."""
    import torch

    shape = tuple(int(d) for d in dims)
    numel = 1
    for d in shape:
        numel *= d
    tdt = torch_dtype(dtype)
    if numel == 0 or ptr == 0:
        return torch.empty(shape, dtype=tdt, device="cuda")
    raw = torch.as_tensor(_CudaBytes(ptr, numel * itemsize(dtype)), device="cuda")
    return raw.view(tdt).view(shape)


def plugin_classes(trt, spec_cls: type[PluginSpec]):
    """(Plugin, Creator) classes for one spec on one TensorRT module (made once, cached)."""
    key = (trt.__name__, spec_cls)
    if key in _CLASSES:
        return _CLASSES[key]

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, spec: PluginSpec, namespace: str = DEFAULT_NAMESPACE, version: str = DEFAULT_VERSION):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.spec = spec
            self.plugin_name = spec.name
            self.plugin_version = version
            self.plugin_namespace = namespace
            self.num_outputs = spec.num_outputs
            self._keep: list = []

        def _count(self, method):
            CALLS[(self.spec.name, method)] += 1

        # --- core ---------------------------------------------------------------------------
        def get_capability_interface(self, type):  # noqa: A002 - TensorRT's argument name
            return self

        def destroy(self, _alive=_ALIVE, _calls=CALLS):
            # default arguments: TensorRT may call this at interpreter exit, after globals are gone
            _calls[(self.spec.name, "destroy")] += 1
            try:
                _alive.remove(self)
            except ValueError:
                pass

        def clone(self):
            self._count("clone")
            c = Plugin(self.spec, self.plugin_namespace, self.plugin_version)
            _ALIVE.append(c)
            return c

        # --- build --------------------------------------------------------------------------
        def get_output_data_types(self, input_types):
            self._count("get_output_data_types")
            ins = [dtype_from_trt(trt, t) for t in input_types]
            return [trt_dtype(trt, t) for t in self.spec.output_dtypes(ins)]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            self._count("get_output_shapes")
            ex = TrtExprs(trt, expr_builder)
            dims = [[d for d in x] for x in inputs]
            for name, rank, d in zip(self.spec.input_names(), self.spec.input_ranks(), dims):
                if rank is not None and len(d) != rank:
                    raise ValueError(f"{self.spec.name}: input {name} must be {rank}-D, got {len(d)}-D")
            return [trt.DimsExprs([ex.wrap(d) for d in out]) for out in self.spec.output_shapes(dims, ex)]

        def supports_format_combination(self, pos, in_out, num_inputs):
            self._count("supports_format_combination")
            if in_out[pos].desc.format != trt.TensorFormat.LINEAR:
                return False
            try:
                types = [dtype_from_trt(trt, in_out[i].desc.type) for i in range(pos + 1)]
            except ValueError:
                return False
            return self.spec.supports(pos, types)

        def configure_plugin(self, inp, out):
            self._count("configure_plugin")
            self.spec.check_dtypes([dtype_from_trt(trt, d.desc.type) for d in inp])

        def get_workspace_size(self, inp, out):
            return 0

        def get_valid_tactics(self):
            return []

        # --- runtime ------------------------------------------------------------------------
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inp, out):
            self._count("on_shape_change")
            self.spec.check_shapes([tuple(d.dims) for d in inp])

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            self._count("get_fields_to_serialize")
            return trt_fields(trt, self.spec, self._keep)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            self._count("enqueue")
            import torch

            import trtllm_kernels  # noqa: F401  (registers the CUDA kernels behind the ops)

            with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
                ins = [as_torch(p, d.dims, dtype_from_trt(trt, d.type)) for p, d in zip(inputs, input_desc)]
                outs = [as_torch(p, d.dims, dtype_from_trt(trt, d.type)) for p, d in zip(outputs, output_desc)]
                self.spec.run(ins, outs)

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self, namespace: str = DEFAULT_NAMESPACE, version: str = DEFAULT_VERSION):
            trt.IPluginCreatorV3One.__init__(self)
            self._keep: list = []
            self.name = spec_cls.name
            self.plugin_namespace = namespace
            self.plugin_version = version
            self.field_names = _field_decls(trt, spec_cls, self._keep)

        def create_plugin(self, name, field_collection, phase):
            CALLS[(spec_cls.name, f"create_plugin[{str(phase).split('.')[-1]}]")] += 1
            spec = spec_cls.from_plugin_fields(_fields_from_trt(field_collection))
            CREATED.append((str(phase).split(".")[-1], spec))
            p = Plugin(spec, self.plugin_namespace, self.plugin_version)
            _ALIVE.append(p)
            return p

    Plugin.__name__ = Plugin.__qualname__ = spec_cls.name + "Plugin"
    Creator.__name__ = Creator.__qualname__ = spec_cls.name + "Creator"
    _CLASSES[key] = (Plugin, Creator)
    return Plugin, Creator


def register_plugins(trt_module=None, namespace: str = DEFAULT_NAMESPACE, version: str = DEFAULT_VERSION) -> dict:
    """Register a creator for every plugin with the TensorRT module's plugin registry.

    trt_module: a module (`tensorrt`, `tensorrt_rtx_bindings`), its name, or None for the first
    importable. Returns {plugin name: creator}. Calling again is harmless: creators already
    registered under this namespace and version are reused. After this, a TensorRT user finds
    the plugins with `registry.get_creator(name, version, namespace)`, and the ONNX parser maps
    nodes of op type `name` with attributes plugin_namespace / plugin_version to them.
    """
    trt = load_tensorrt(trt_module)
    registry = trt.get_plugin_registry()
    creators = {}
    for spec_cls in SPECS.values():
        key = (trt.__name__, spec_cls.name, namespace, version)
        if key not in _CREATORS:
            _, Creator = plugin_classes(trt, spec_cls)
            creator = Creator(namespace, version)
            if not registry.register_creator(creator, namespace):
                raise RuntimeError(f"another creator for {spec_cls.name} v{version} in namespace "
                                   f"{namespace!r} is already registered")
            _CREATORS[key] = creator
        creators[spec_cls.name] = _CREATORS[key]
    return creators


def create_plugin(trt, spec: PluginSpec, namespace: str = DEFAULT_NAMESPACE, version: str = DEFAULT_VERSION):
    """A build-phase plugin object for `spec`, made through the registered creator (as a
    TensorRT user would), for INetworkDefinition.add_plugin_v3."""
    register_plugins(trt, namespace, version)
    creator = trt.get_plugin_registry().get_creator(spec.name, version, namespace)
    if creator is None:
        raise RuntimeError(f"no creator {spec.name} v{version} in namespace {namespace!r}")
    keep: list = []
    fc = trt_fields(trt, spec, keep)
    plugin = creator.create_plugin(spec.name, fc, trt.TensorRTPhase.BUILD)
    plugin._keep.extend(keep)
    return plugin



def enqueue_runner(trt, namespace: str = DEFAULT_NAMESPACE, version: str = DEFAULT_VERSION):
    """A `graph.run_torch` plugin_runner that calls the IPluginV3 object's own enqueue with
    PluginTensorDesc descriptors and raw device pointers on a side stream, as TensorRT's
    runtime would (for checking enqueue where an engine cannot run, e.g. TensorRT-RTX on
    compute capability 9.0)."""
    import torch

    stream = torch.cuda.Stream()

    def desc(t):
        from .spec import dtype_from_torch

        d = trt.PluginTensorDesc()
        d.dims = trt.Dims(list(t.shape))
        d.type = trt_dtype(trt, dtype_from_torch(t.dtype))
        d.format = trt.TensorFormat.LINEAR
        return d

    def run(spec, inputs, outputs):
        Plugin, _ = plugin_classes(trt, type(spec))
        plugin = Plugin(spec, namespace, version)
        inputs = [t.contiguous() for t in inputs]
        stream.wait_stream(torch.cuda.current_stream())
        plugin.enqueue([desc(t) for t in inputs], [desc(t) for t in outputs], [t.data_ptr() for t in inputs],
                       [t.data_ptr() for t in outputs], 0, stream.cuda_stream)
        torch.cuda.current_stream().wait_stream(stream)

    return run
