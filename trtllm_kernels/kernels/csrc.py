"""Build the csrc/ kernels with nvcc into one shared library, load it with ctypes, and bind
its extern "C" launchers to the torch ops.

The library links no torch headers, so it survives torch upgrades and is the same code a
TensorRT plugin's enqueue calls. It is built once per source hash and GPU architecture into
the cache (`trtllm_kernels._paths.cache_root()`), under a file lock-free atomic rename.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from .._paths import cache_root

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
LIB_NAME = "libtrtllm_kernels.so"


def source_dir() -> Path:
    spec = importlib.util.find_spec("trtllm_kernels.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("trtllm_kernels.csrc sources are not installed")
    return Path(list(spec.submodule_search_locations)[0])


def sources() -> list[Path]:
    return sorted(source_dir().glob("*.cu"))


def nvcc_path() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    found = shutil.which("nvcc")
    candidates += [Path(found)] if found else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((str(c) for c in candidates if c.is_file()), None)


def gencode_flags(capability: tuple[int, int] | None) -> list[str]:
    """sm_90a (wgmma, setmaxnreg) on Hopper; elsewhere the device's own arch plus PTX."""
    if capability is None or capability == (9, 0):
        return ["-gencode=arch=compute_90a,code=sm_90a"]
    arch = f"{capability[0]}{capability[1]}"
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-gencode=arch=compute_{arch},code=compute_{arch}"]


def nvcc_command(nvcc: str, srcs: list[Path], out: Path, capability, shared: bool = True) -> list[str]:
    cmd = [nvcc, "-O3", "-std=c++17", "--expt-relaxed-constexpr", *gencode_flags(capability),
           f"-I{source_dir()}", "-o", str(out), *map(str, srcs)]
    return cmd + (["-shared", "-Xcompiler", "-fPIC"] if shared else ["-cubin"])


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The compiled library for the current GPU, built on first call."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME): csrc kernels cannot be built")
    capability = torch.cuda.get_device_capability()
    srcs = sources()
    digest = hashlib.sha256()
    for path in srcs + sorted(source_dir().glob("*.cuh")):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(repr(gencode_flags(capability)).encode())
    out_dir = cache_root() / "csrc" / digest.hexdigest()[:16]
    lib_path = out_dir / LIB_NAME
    if not lib_path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        result = subprocess.run(nvcc_command(nvcc, srcs, Path(tmp), capability), capture_output=True, text=True)
        if result.returncode:
            os.unlink(tmp)
            raise RuntimeError(f"building csrc kernels failed:\n{result.stderr[-4000:]}")
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.tk_rms_norm.argtypes = [p, p, p, p, p, i64, i64, i32, f32, p]
    lib.tk_rms_norm.restype = i32


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _stream(device) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


def _check(code: int, name: str) -> None:
    if code:
        raise RuntimeError(f"{name} failed: CUDA error {code} ({torch.cuda.cudart().cudaGetErrorString(code)})")


def _rms_norm_launch(x, residual, weight, eps):
    if x.dtype not in DTYPE_CODES or weight.dtype != x.dtype:
        raise TypeError(f"rms_norm kernel takes fp32/fp16/bf16 x and weight of one dtype, got {x.dtype}, {weight.dtype}")
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    out = torch.empty_like(x)
    residual_out = None if residual is None else torch.empty_like(x)
    hidden = x.shape[-1]
    code = library().tk_rms_norm(_ptr(x), _ptr(residual), _ptr(weight.contiguous()), _ptr(out),
                                 _ptr(residual_out), x.numel() // hidden if hidden else 0, hidden,
                                 DTYPE_CODES[x.dtype], float(eps), _stream(x.device))
    _check(code, "tk_rms_norm")
    return out, residual_out


def rms_norm_cuda(x, weight, eps):
    return _rms_norm_launch(x, None, weight, eps)[0]


def fused_add_rms_norm_cuda(x, residual, weight, eps):
    return _rms_norm_launch(x, residual, weight, eps)


def register() -> None:
    """Put the csrc kernels behind their ops (call only where CUDA and nvcc are present)."""
    from .._library import register_cuda_kernel

    register_cuda_kernel("rms_norm", rms_norm_cuda)
    register_cuda_kernel("fused_add_rms_norm", fused_add_rms_norm_cuda)
