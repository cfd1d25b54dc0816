"""One place where `trtllm_kernels::` ops are defined and their kernels are registered.

Every op family defines its op here with `define_op`: a schema, a reference implementation in
plain PyTorch (registered for CPU, and for CUDA until a real kernel replaces it) and a fake
(meta) kernel for torch.compile. GPU kernels slot in with `register_cuda_kernel` from
`trtllm_kernels.kernels`, which is imported only where CUDA is present.

We use `Library.define` + `impl` rather than `torch.library.custom_op`: it costs about half
as much per call, and one registered-op boundary per fused step is all we can afford.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

NAMESPACE = "trtllm_kernels"
_lib = torch.library.Library(NAMESPACE, "DEF")
_defined: dict[str, Callable] = {}
_cuda_kernels: dict[str, Callable] = {}


def define_op(schema: str, reference: Callable, fake: Callable) -> Callable:
    """Define `trtllm_kernels::<name>` from a schema like "name(Tensor x) -> Tensor".

    Returns the op's overload packet (`torch.ops.trtllm_kernels.<name>`).
    """
    name = schema.split("(", 1)[0].strip()
    if name in _defined:
        raise RuntimeError(f"op {NAMESPACE}::{name} is defined twice")
    _lib.define(schema)
    _lib.impl(name, reference, "CPU")
    _lib.impl(name, reference, "CUDA")  # until a kernel is registered
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_lib)
    _defined[name] = reference
    return getattr(torch.ops.trtllm_kernels, name)


def register_cuda_kernel(name: str, kernel: Callable) -> None:
    """Make `kernel` the CUDA implementation of an op defined with `define_op`."""
    if name not in _defined:
        raise KeyError(f"no op {NAMESPACE}::{name} to register a CUDA kernel for")
    with warnings.catch_warnings():  # replacing the reference is the point: no warning
        warnings.simplefilter("ignore", UserWarning)
        _lib.impl(name, kernel, "CUDA", allow_override=True)
    _cuda_kernels[name] = kernel


def defined_ops() -> list[str]:
    return sorted(_defined)


def cuda_kernel(name: str) -> Callable | None:
    """The CUDA kernel registered for an op, or None while it runs the reference."""
    return _cuda_kernels.get(name)
