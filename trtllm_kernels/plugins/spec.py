"""Plugin specs in plain Python: everything about a TensorRT plugin that needs no TensorRT.

A `PluginSpec` subclass describes one plugin: its fields (TensorRT's PluginFieldCollection:
name, dtype, value), its inputs and outputs (which depend on the fields), the dtypes it
accepts at each input/output position, its output dtypes and shapes, and `run`, which calls
the torch op on tensors. The IPluginV3 classes in `trt_plugin` are generic wrappers around a
spec, so all of this is tested on CPU without TensorRT.

Shapes are symbolic. A shape rule is a function of the inputs' dims and an `ExprBuilder`;
it builds output dims only through the builder's operations, so the same rule runs on
- `IntExprs`: concrete ints (checked against the torch op's real outputs in the tests),
- `SymExprs`: strings such as "((W // 64) - 6)" (ONNX dim_param names, readable tests),
- `trt_plugin.TrtExprs`: TensorRT's IExprBuilder / IDimensionExpr at build time.

Dtypes are named by strings (`DTYPES`), mapped to torch, TensorRT and ONNX in one table.

Serialization is a small self-describing binary (struct), never pickle:
  magic "TKPF", u16 version, u16 len + plugin name, u16 field count, then per field:
  u16 len + name, u8 type code, u32 count, packed little-endian values (utf-8 for strings).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# ---------------------------------------------------------------------------------------------
# dtypes

FLOATS = ("float32", "float16", "bfloat16")
# FP8 operands are float8_e4m3fn only (TensorRT's FP8): TensorRT-RTX 1.7's ONNX parser refuses
# UINT8 intermediate tensors, so raw e4m3 bytes as uint8 cannot flow between plugins.
FP8_TYPES = ("float8_e4m3fn",)
INTS = ("int32", "int64")
DTYPES = FLOATS + FP8_TYPES + INTS + ("uint8", "int8")

# name -> (TensorRT DataType member, ONNX TensorProto member, itemsize in bytes)
_DTYPE_TABLE = {
    "float32": ("FLOAT", "FLOAT", 4),
    "float16": ("HALF", "FLOAT16", 2),
    "bfloat16": ("BF16", "BFLOAT16", 2),
    "float8_e4m3fn": ("FP8", "FLOAT8E4M3FN", 1),
    "uint8": ("UINT8", "UINT8", 1),
    "int8": ("INT8", "INT8", 1),
    "int32": ("INT32", "INT32", 4),
    "int64": ("INT64", "INT64", 8),
}


def itemsize(dtype: str) -> int:
    return _DTYPE_TABLE[dtype][2]


def torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float8_e4m3fn": torch.float8_e4m3fn, "uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32,
            "int64": torch.int64}[dtype]


def dtype_from_torch(dt) -> str:
    name = str(dt).replace("torch.", "")
    if name not in _DTYPE_TABLE:
        raise ValueError(f"no plugin dtype for torch dtype {dt}")
    return name


def trt_dtype(trt, dtype: str):
    return getattr(trt.DataType, _DTYPE_TABLE[dtype][0])


def dtype_from_trt(trt, dt) -> str:
    for name, (member, _, _) in _DTYPE_TABLE.items():
        if getattr(trt.DataType, member, None) == dt:
            return name
    raise ValueError(f"no plugin dtype for TensorRT {dt}")


def onnx_dtype(dtype: str) -> int:
    from onnx import TensorProto

    return getattr(TensorProto, _DTYPE_TABLE[dtype][1])


# ---------------------------------------------------------------------------------------------
# symbolic dims


class IntExprs:
    """Dims as plain ints (a concrete shape)."""

    def const(self, n: int) -> int:
        return int(n)

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def floordiv(self, a, b):
        return a // b

    def ceildiv(self, a, b):
        return -(-a // b)

    def max(self, a, b):
        return max(a, b)


class SymExprs:
    """Dims as strings (ints stay ints, so constant parts fold): "T", "((W // 64) - 6)"."""

    def const(self, n: int) -> int:
        return int(n)

    def _op(self, a, b, sym: str, fn: Callable[[int, int], int]):
        if isinstance(a, int) and isinstance(b, int):
            return fn(a, b)
        return f"({a} {sym} {b})"

    def add(self, a, b):
        if b == 0:
            return a
        return self._op(a, b, "+", lambda x, y: x + y)

    def sub(self, a, b):
        if b == 0:
            return a
        return self._op(a, b, "-", lambda x, y: x - y)

    def mul(self, a, b):
        if a == 1:
            return b
        if b == 1:
            return a
        return self._op(a, b, "*", lambda x, y: x * y)

    def floordiv(self, a, b):
        if b == 1:
            return a
        return self._op(a, b, "//", lambda x, y: x // y)

    def ceildiv(self, a, b):
        if b == 1:
            return a
        if isinstance(a, int) and isinstance(b, int):
            return -(-a // b)
        return f"cdiv({a}, {b})"

    def max(self, a, b):
        if a == b:
            return a
        if isinstance(a, int) and isinstance(b, int):
            return max(a, b)
        return f"max({a}, {b})"


# ---------------------------------------------------------------------------------------------
# fields

FIELD_TYPES = {"f32": (1, "<f"), "i32": (2, "<i"), "str": (3, None)}
_TYPE_BY_CODE = {code: name for name, (code, _) in FIELD_TYPES.items()}
MAGIC = b"TKPF"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FieldSpec:
    """One plugin field: name, type ("f32", "i32" or "str"), default, allowed values."""

    name: str
    type: str
    default: Any
    choices: tuple | None = None
    doc: str = ""

    def coerce(self, value):
        """A field value from Python, numpy, TensorRT or ONNX -> the canonical Python value."""
        if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
            value = value.tolist()
        if self.type == "str":
            if isinstance(value, (list, tuple)):  # CHAR arrays arrive as lists of ints
                value = bytes(int(c) & 0xFF for c in value)
            if isinstance(value, (bytes, bytearray)):
                value = bytes(value).rstrip(b"\0").decode("utf-8")
            if not isinstance(value, str):
                raise ValueError(f"field {self.name} is a string, got {value!r}")
        else:
            if isinstance(value, (list, tuple)):
                if len(value) != 1:
                    raise ValueError(f"field {self.name} holds one value, got {value!r}")
                value = value[0]
            if isinstance(value, (bytes, str)):
                raise ValueError(f"field {self.name} is numeric, got {value!r}")
            value = float(value) if self.type == "f32" else int(value)
            if self.type == "f32":  # what survives a float32 round trip
                value = struct.unpack("<f", struct.pack("<f", value))[0]
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"field {self.name} must be one of {self.choices}, got {value!r}")
        return value


def pack_fields(name: str, specs: Sequence[FieldSpec], values: dict) -> bytes:
    out = [MAGIC, struct.pack("<H", FORMAT_VERSION), _pack_str(name), struct.pack("<H", len(specs))]
    for f in specs:
        code = FIELD_TYPES[f.type][0]
        v = values[f.name]
        if f.type == "str":
            payload = v.encode("utf-8")
            count = len(payload)
        else:
            payload = struct.pack(FIELD_TYPES[f.type][1], v)
            count = 1
        out += [_pack_str(f.name), struct.pack("<BI", code, count), payload]
    return b"".join(out)


def unpack_fields(data: bytes) -> tuple[str, dict]:
    """bytes from `pack_fields` -> (plugin name, {field: value}); raises ValueError if malformed."""
    try:
        if data[:4] != MAGIC:
            raise ValueError("not a trtllm_kernels plugin blob (bad magic)")
        (version,) = struct.unpack_from("<H", data, 4)
        if version != FORMAT_VERSION:
            raise ValueError(f"plugin blob version {version}, this build reads {FORMAT_VERSION}")
        pos = 6
        name, pos = _unpack_str(data, pos)
        (n,) = struct.unpack_from("<H", data, pos)
        pos += 2
        values = {}
        for _ in range(n):
            fname, pos = _unpack_str(data, pos)
            code, count = struct.unpack_from("<BI", data, pos)
            pos += 5
            kind = _TYPE_BY_CODE[code]
            if kind == "str":
                values[fname] = data[pos:pos + count].decode("utf-8")
                pos += count
            else:
                fmt = FIELD_TYPES[kind][1]
                values[fname] = struct.unpack_from(fmt, data, pos)[0]
                pos += struct.calcsize(fmt) * count
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} trailing bytes in plugin blob")
        return name, values
    except (struct.error, KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed plugin blob: {e}") from e


def _pack_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<H", len(b)) + b


def _unpack_str(data: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<H", data, pos)
    pos += 2
    if pos + n > len(data):
        raise ValueError("truncated plugin blob")
    return data[pos:pos + n].decode("utf-8"), pos + n


# ---------------------------------------------------------------------------------------------
# the spec base class

Rule = Callable[[list], Sequence[str]]  # types chosen at earlier positions -> allowed types


class PluginSpec:
    """Base class: subclasses set `name`, `fields`, and implement the methods below.

    Construct with field values (`Spec(eps=1e-5)`); unknown fields raise ValueError, missing
    ones take their defaults. Positions count inputs first, then outputs (TensorRT's order).
    """

    name: str = ""
    version: str = "1"
    fields: tuple[FieldSpec, ...] = ()
    doc: str = ""

    def __init__(self, **values):
        known = {f.name: f for f in self.fields}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"{self.name} has no field(s) {sorted(unknown)}; fields: {sorted(known)}")
        self.values = {n: f.coerce(values.get(n, f.default)) for n, f in known.items()}
        self.validate()

    def __getattr__(self, item):
        values = self.__dict__.get("values")
        if values is not None and item in values:
            return values[item]
        raise AttributeError(item)

    def __eq__(self, other):
        return type(self) is type(other) and self.values == other.values

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"{type(self).__name__}({args})"

    def validate(self) -> None:
        """Cross-field checks; raise ValueError."""

    # --- structure (may depend on fields) ----------------------------------------------------
    def input_names(self) -> list[str]:
        raise NotImplementedError

    def output_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def num_inputs(self) -> int:
        return len(self.input_names())

    @property
    def num_outputs(self) -> int:
        return len(self.output_names())

    # --- dtypes ------------------------------------------------------------------------------
    def type_rules(self) -> list[Rule]:
        """One rule per position (inputs then outputs): given the types at earlier positions,
        the types allowed here. All formats are linear (row-major)."""
        raise NotImplementedError

    def output_dtypes(self, input_dtypes: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def supports(self, pos: int, types: Sequence[str], formats: Sequence[str] | None = None) -> bool:
        """TensorRT's supports_format_combination: may position `pos` have types[pos], given
        types[:pos]? Looks at no later position (TensorRT leaves those undefined)."""
        if formats is not None and formats[pos] != "LINEAR":
            return False
        rules = self.type_rules()
        if not 0 <= pos < len(rules):
            raise ValueError(f"{self.name}: position {pos} out of range 0..{len(rules) - 1}")
        return types[pos] in rules[pos](list(types[:pos]))

    def input_combinations(self) -> list[tuple[str, ...]]:
        """Every input dtype combination the rules allow (outputs follow from `output_dtypes`)."""
        rules = self.type_rules()[: self.num_inputs]
        combos = [()]
        for rule in rules:
            combos = [c + (t,) for c in combos for t in rule(list(c))]
        return combos

    def check_dtypes(self, input_dtypes: Sequence[str]) -> None:
        """Raise ValueError naming the first input whose dtype the rules reject."""
        names = self.input_names()
        if len(input_dtypes) != len(names):
            raise ValueError(f"{self.name} takes {len(names)} inputs {names}, got {len(input_dtypes)}")
        rules = self.type_rules()
        for pos, t in enumerate(input_dtypes):
            allowed = rules[pos](list(input_dtypes[:pos]))
            if t not in allowed:
                raise ValueError(f"{self.name}: input {names[pos]} may be {sorted(allowed)}, got {t}")

    # --- shapes ------------------------------------------------------------------------------
    def output_shapes(self, inputs: Sequence[Sequence], ex) -> list[list]:
        """Output dims from input dims, built only through `ex` (see the module docstring)."""
        raise NotImplementedError

    def input_ranks(self) -> list[int | None]:
        """Required rank per input (None: any rank >= 1)."""
        raise NotImplementedError

    def check_shapes(self, shapes: Sequence[Sequence[int]]) -> None:
        """Concrete shape checks (ranks and matching dims); raise ValueError."""
        names = self.input_names()
        if len(shapes) != len(names):
            raise ValueError(f"{self.name} takes {len(names)} inputs {names}, got {len(shapes)}")
        for name, rank, shape in zip(names, self.input_ranks(), shapes):
            if rank is not None and len(shape) != rank:
                raise ValueError(f"{self.name}: input {name} must be {rank}-D, got shape {tuple(shape)}")

    # --- fields ------------------------------------------------------------------------------
    def serialize(self) -> bytes:
        return pack_fields(self.name, self.fields, self.values)

    @classmethod
    def deserialize(cls, data: bytes) -> "PluginSpec":
        name, values = unpack_fields(data)
        if name != cls.name:
            raise ValueError(f"blob is for plugin {name!r}, not {cls.name!r}")
        return cls(**values)

    def plugin_fields(self) -> list[tuple[str, str, Any]]:
        """(name, type, value) triples: a PluginFieldCollection in plain Python."""
        return [(f.name, f.type, self.values[f.name]) for f in self.fields]

    @classmethod
    def from_plugin_fields(cls, fields: Sequence[tuple[str, Any]]) -> "PluginSpec":
        """From (name, value) pairs as TensorRT or ONNX hand them over (numpy arrays, lists,
        bytes for strings, any int/float width). Fields that are absent take defaults; names
        this plugin does not know are ignored (an ONNX node carries plugin_version etc.)."""
        known = {f.name for f in cls.fields}
        return cls(**{n: v for n, v in fields if n in known})

    def onnx_attributes(self) -> dict:
        """Field values as ONNX node attributes (ints, floats and strings)."""
        return dict(self.values)

    # --- execution ---------------------------------------------------------------------------
    def run(self, inputs: list, outputs: list) -> None:
        """Compute the outputs (torch tensors, preallocated) from the inputs with the torch op."""
        raise NotImplementedError


def all_type_combinations(spec: PluginSpec) -> list[tuple[str, ...]]:
    """Every (inputs + outputs) dtype tuple that `supports` accepts position by position."""
    rules = spec.type_rules()
    combos = [()]
    for rule in rules:
        combos = [c + (t,) for c in combos for t in rule(list(c))]
    return combos

