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


@lru_cache(maxsize=1)
def available() -> bool:
    """nvcc found and csrc/ built for this GPU (a failed build warns once; callers then keep
    to their Triton kernels)."""
    if nvcc_path() is None or not torch.cuda.is_available():
        return False
    try:
        library()
    except Exception as e:  # pragma: no cover - depends on the toolchain
        import warnings

        warnings.warn(f"csrc kernels unavailable, Triton kernels are used instead: {e!r}")
        return False
    return True


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.tk_rms_norm.argtypes = [p, p, p, p, p, i64, i64, i32, f32, p]
    lib.tk_rms_norm.restype = i32
    lib.tk_paged_decode.argtypes = [p, p, p, p, p, p, p, p, p] + [i32] * 11 + [f32, f32, p]
    lib.tk_paged_decode.restype = i32
    lib.tk_paged_decode_step_tokens.argtypes = [i32, i32, i32]
    lib.tk_paged_decode_step_tokens.restype = i32
    lib.tk_paged_decode_occupancy.argtypes = [i32, i32, i32, i32, i32]
    lib.tk_paged_decode_occupancy.restype = i32
    lib.tk_fp4_gemm_small_m.argtypes = [p] * 6 + [i32] * 3 + [i64] * 4 + [i32] * 4 + [p]
    lib.tk_fp4_gemm_small_m.restype = i32
    lib.tk_fp4_gemm_wgmma.argtypes = [p] * 7 + [i32] * 3 + [i64] * 4 + [i32] * 4 + [p]
    lib.tk_fp4_gemm_wgmma.restype = i32
    lib.tk_fp4_gemm_w4a8.argtypes = [p] * 8 + [i32] * 3 + [i64] * 4 + [i32] * 4 + [p]
    lib.tk_fp4_gemm_w4a8.restype = i32
    lib.tk_fp4_w4a8_weights.argtypes = [p] * 4 + [i32] * 2 + [i64] * 2 + [p]
    lib.tk_fp4_w4a8_weights.restype = i32
    lib.tk_fp8_quantize_tokens.argtypes = [p, p, p, i32, i32, i64, i32, p]
    lib.tk_fp8_quantize_tokens.restype = i32


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _stream(device) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


def _check(code: int, name: str) -> None:
    if code == 1:  # cudaErrorInvalidValue: what the launchers return for arguments they refuse
        raise RuntimeError(f"{name} failed: invalid argument (a configuration or input the kernel does not take)")
    if code:
        rt = torch.cuda.cudart()
        raise RuntimeError(f"{name} failed: CUDA error {code} ({rt.cudaGetErrorString(rt.cudaError(code))})")


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


# --------------------------------------------------------------------------------------------
# paged decode attention (csrc/paged_decode.cu)
# --------------------------------------------------------------------------------------------

DECODE_GROUPS = (1, 2, 4, 8)  # padded query heads per kv head the kernel is built for
_FP8 = torch.float8_e4m3fn


def decode_group_pad(group: int) -> int:
    return next(g for g in DECODE_GROUPS if g >= group)


def paged_decode_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor) -> bool:
    """Whether csrc/paged_decode.cu takes these inputs: fp16/bf16 q, a cache in q's dtype or
    float8_e4m3fn, head dim 64 or 128, at most 8 query heads per kv head, pages a multiple of
    4 tokens, last dims contiguous and 16-byte aligned rows (8-byte for fp8)."""
    if not (q.is_cuda and q.dim() == 3 and k_cache.dim() == 4):
        return False
    d, hq, hkv = q.shape[-1], q.shape[1], k_cache.shape[1]
    if (q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype not in (q.dtype, _FP8)
            or v_cache.dtype != k_cache.dtype or d not in (64, 128) or hq % hkv or hq // hkv > 8
            or k_cache.shape[2] % 4 or v_cache.shape != k_cache.shape):
        return False
    # rows of 8 elements move as one 16-byte (8-byte for fp8) load
    aligned = lambda t: t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1])
    return aligned(q) and aligned(k_cache) and aligned(v_cache) and block_tables.stride(-1) == 1


@lru_cache(maxsize=None)
def decode_step_tokens(head_dim: int, group_pad: int, variant: int) -> int:
    return library().tk_paged_decode_step_tokens(head_dim, group_pad, variant)


@lru_cache(maxsize=None)
def decode_occupancy(q_dtype: torch.dtype, fp8: bool, head_dim: int, group_pad: int, variant: int,
                     device_index: int) -> int:
    """Programs of the decode kernel one SM runs at once (from the CUDA occupancy calculator):
    CTAs of variant 0, warps of variant 2."""
    with torch.cuda.device(device_index):
        n = library().tk_paged_decode_occupancy(DTYPE_CODES[q_dtype], int(fp8), head_dim, group_pad, variant)
    if n <= 0:
        _check(-n or 1, "tk_paged_decode_occupancy")
    return n


def mma_page(page: int) -> bool:
    """Pages the tensor-core decode kernel takes: powers of two of 16+ tokens."""
    return page >= 16 and page & (page - 1) == 0


def decode_variant(head_dim: int, group: int, page: int) -> int:
    """Kernel of csrc/paged_decode.cu: 2 = tensor cores (mma.sync; `mma_page` pages), 0 = CUDA
    cores (any page a multiple of 4). TRTLLM_KERNELS_CSRC_DECODE_VARIANT overrides."""
    env = os.environ.get("TRTLLM_KERNELS_CSRC_DECODE_VARIANT")
    if env is not None:
        return int(env)
    return 2 if mma_page(page) else 0


def mma_decode_num_splits(pairs: int, slots: int, steps: int, min_split_steps: int = 16) -> int:
    """KV splits for the tensor-core kernel (its programs are warps, `slots` of them resident on
    the GPU), from static sizes only: as many as one wave of the (sequence, kv head) pairs' splits
    fills, none once the pairs alone fill it (a warp program is short, so a partly filled
    later wave costs little: B1024 x 128 at 32/8 heads, 8192 pairs over 1584 slots on H200,
    took 78.8 us unsplit against 122.5 split in two), no split under `min_split_steps` steps
    (256 tokens) and at most MAX_SPLITS."""
    from .triton_attention import MAX_SPLITS

    return max(1, min(MAX_SPLITS, slots // max(1, pairs), steps // min_split_steps))


_workspaces: dict = {}


def decode_workspace(device: torch.device, numel: int) -> torch.Tensor:
    """A float32 scratch of at least `numel` elements, kept per device and grown by doubling.

    Buffers are never freed (a CUDA graph may have captured an older one), so the hot path
    allocates nothing once the largest shape has been seen; during graph capture a missing size
    is allocated in the graph's pool instead and not kept. One stream at a time per device.
    """
    key = device.index if device.index is not None else torch.cuda.current_device()
    bufs = _workspaces.setdefault(key, [])
    if bufs and bufs[-1].numel() >= numel:
        return bufs[-1]
    if torch.cuda.is_current_stream_capturing():
        return torch.empty(numel, dtype=torch.float32, device=device)
    size = max(numel, 2 * bufs[-1].numel() if bufs else 1 << 16)
    bufs.append(torch.empty(size, dtype=torch.float32, device=device))
    return bufs[-1]


def paged_decode_cuda(q, k_cache, v_cache, block_tables, seq_lens, scale=None, k_scale=1.0, v_scale=1.0, *,
                      out=None, num_splits=None, variant=None, workspace=None, poison_scratch=False):
    """Paged decode attention through csrc/paged_decode.cu (contract of
    `trtllm_kernels.attention.paged_attention_decode`; check `paged_decode_supported` first).

    num_splits: KV splits (default: from static shapes, one full wave of CTAs, as
    `triton_attention.decode_num_splits`); workspace: float32 of at least
    B * Hq * num_splits * (D + 2) elements (default: a per-device cache); poison_scratch fills
    it with NaN first (tests: the combine must read only the splits it wrote).
    """
    from . import triton_attention as ta

    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()  # no-ops as a rule
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    gp = decode_group_pad(group)
    variant = decode_variant(head_dim, group, page) if variant is None else variant
    if variant not in (0, 2) or (variant == 2 and not mma_page(page)):
        raise ValueError(f"csrc decode variant {variant} does not take pages of {page} tokens")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else scale
    step = decode_step_tokens(head_dim, gp, variant)
    max_context = block_tables.shape[1] * page
    steps = max(1, -(-max_context // step))
    if num_splits is None:
        dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
        per_sm = decode_occupancy(q.dtype, k_cache.dtype == _FP8, head_dim, gp, variant, dev)
        if variant == 2:
            num_splits = mma_decode_num_splits(batch * num_kv_heads, ta.num_sms(q.device) * per_sm, steps)
        else:
            num_splits = ta.decode_num_splits(batch, num_kv_heads, max_context, step, ta.num_sms(q.device), per_sm)
    num_splits = max(1, min(num_splits, steps))
    split_tokens = -(-steps // num_splits) * step
    num_splits = -(-max_context // split_tokens)
    if num_splits > 1:
        need = batch * num_heads * num_splits * (head_dim + 2)
        if workspace is None:
            workspace = decode_workspace(q.device, need)
        elif workspace.dtype != torch.float32 or workspace.numel() < need or not workspace.is_contiguous():
            raise ValueError(f"workspace must be contiguous float32 of >= {need} elements")
        if poison_scratch:
            workspace.fill_(float("nan"))
        part_acc = workspace
        part_ml = workspace[batch * num_heads * num_splits * head_dim:]
    else:
        part_acc = part_ml = None
    strides = (ctypes.c_int64 * 11)(
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1))
    code = library().tk_paged_decode(
        _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(block_tables), _ptr(seq_lens), _ptr(out),
        _ptr(part_acc), _ptr(part_ml), strides, DTYPE_CODES[q.dtype], int(k_cache.dtype == _FP8),
        head_dim, gp, variant, batch, num_kv_heads, group, page, split_tokens, num_splits,
        float(scale) * LOG2E * float(k_scale), float(v_scale), _stream(q.device))
    _check(code, "tk_paged_decode")
    return out


LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# FP4 weight-only GEMM for decode batches (csrc/fp4_gemm.cu)
# --------------------------------------------------------------------------------------------

FP4_SMALL_M_MAX = 64  # tokens the kernel takes (up to eight 8-token MMA tiles)


def fp4_small_m_supported(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether csrc/fp4_gemm.cu takes these inputs: bf16 activations of 1-64 tokens, rows of a
    whole number of 64-byte steps (K % 128 == 0), 16-byte aligned rows of x and w, unit last
    strides, w and scale each under 2^31 bytes (the kernel's 32-bit row offsets)."""
    m, half = x.shape[0], w.shape[1]
    aligned = lambda t, n: t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) % n == 0
    small = lambda t: t.shape[0] * t.stride(0) < 2 ** 31
    return (x.is_cuda and x.dtype == torch.bfloat16 and 1 <= m <= FP4_SMALL_M_MAX and half % 64 == 0
            and w.shape[0] > 0 and aligned(x, 8) and aligned(w, 16) and scale.stride(-1) == 1
            and small(w) and small(scale))


def fp4_small_m_config(m: int, n: int, half: int, sms: int) -> tuple[int, int, int]:
    """(16-row tiles a block, warps a block, K splits) for out [m, n] from rows of `half` bytes.
    Measured on H100 with every call reading its weights from memory (benchmarks/sweep_fp4.py;
    gate_up 28672x4096 and down 4096x14336; results/h100-2026-11-28/fp4_small_m). Up to 16
    tokens: blocks of 2 tiles x 4 warps where they make two blocks an SM (gate_up), of 4 tiles x
    2 warps for 9-16 tokens there (each activation fragment then serves 4 tiles: 31.7 us against
    33-38), else of 1 tile x 8 warps (down: 256 blocks, 15.3-17.5 us against 17.3-18.6 for 128
    blocks of 2 tiles). From 17 tokens (M <= 64: GPUs without wgmma), 2 tiles and 2 warps, or 8
    where the blocks make less than two an SM (the 2026-11-27 sweeps). A grid split of K never
    paid for its extra sum kernel at these shapes, so K is split only where the blocks fill less
    than half the SMs."""
    wide = lambda rows: -(-n // rows) >= 2 * sms  # blocks of `rows` rows make two an SM
    if m <= 16:
        tiles, warps = (4, 2) if m > 8 and wide(64) else (2, 4) if wide(32) else (1, 8)
    else:
        tiles, warps = 2, 2 if wide(32) else 8
    return tiles, warps, _k_split(-(-n // (16 * tiles)), half // 64, sms, 2 * warps, max_split=8)


def _k_split(blocks: int, steps: int, sms: int, min_steps: int, max_split: int | None = None) -> int:
    """The FP4 kernels' grid split of K: doubled while the blocks still fill at most half the SMs
    and every share keeps at least `min_steps` 64-byte steps."""
    split = 1
    while 2 * blocks * split <= sms and steps // (split * 2) >= min_steps and split != max_split:
        split *= 2
    return split


def fp4_gemm_small_m_cuda(x, w, scale, global_scale, config=None):
    """out = x @ dequant(w)^T through csrc/fp4_gemm.cu (check `fp4_small_m_supported` first);
    config: as `fp4_small_m_config` returns it (its default)."""
    from .triton_tiles import num_sms

    config = config or fp4_small_m_config(x.shape[0], w.shape[0], w.shape[1], num_sms(x.device))
    return _fp4_launch("tk_fp4_gemm_small_m", x, w, scale, global_scale, config)


def _fp4_launch(name, x, w, scale, global_scale, config, *scratch):
    """Run one of the FP4 GEMM launchers (same arguments, the wgmma one with a scratch buffer
    after x; config ends with the K split) and add the K shares' fp32 partials in order
    (deterministic)."""
    from .triton_tiles import sum_splits_kernel

    m, n, half = x.shape[0], w.shape[0], w.shape[1]
    split = config[-1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else None
    nvfp4 = scale.dtype == _FP8
    scale = scale.view(torch.uint8)
    code = getattr(library(), name)(
        _ptr(x), *map(_ptr, scratch), _ptr(w), _ptr(scale), _ptr(global_scale), _ptr(out), _ptr(part), m, n,
        half, x.stride(0), w.stride(0), scale.stride(0), out.stride(0), int(nvfp4), *config, _stream(x.device))
    _check(code, name)
    if part is not None:
        sum_splits_kernel[(-(-m * n // 1024),)](part, out, m * n, SPLIT_K=split, BLOCK=1024, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------
# FP4 weight-only GEMM on wgmma, 17-255 tokens on Hopper (csrc/fp4_wgmma.cu)
# --------------------------------------------------------------------------------------------

# From here to the dequantize + matmul path (256) the wgmma kernel takes bf16 x on Hopper: on an
# H100 at 16 tokens the mma.sync kernel was faster (gate_up 35 us against 43, down 18 against 23),
# from 32 the wgmma one (46 against 52, 25 against 27; 64 tokens 52 against 76, 30 against 36;
# benchmarks/results/h100-2026-11-28/fp4_wgmma).
FP4_WGMMA_MIN_M = 17
FP4_WGMMA_TOKENS = (16, 32, 64, 128)  # token tiles it is built for


def fp4_wgmma_supported(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether csrc/fp4_wgmma.cu takes these inputs on this GPU: Hopper (sm_90), bf16
    activations with unit last stride and 16-byte aligned rows, K % 128 == 0, 16-byte aligned
    weight rows, scales with unit last stride."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] >= 1 and w.shape[0] > 0):
        return False
    if torch.cuda.get_device_capability(x.device) != (9, 0):
        return False
    aligned = lambda t, n: t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) % n == 0
    return w.shape[1] % 64 == 0 and aligned(x, 8) and aligned(w, 16) and scale.stride(-1) == 1


def fp4_wgmma_config(m: int, n: int, half: int, sms: int) -> tuple[int, int, int]:
    """(token tile, warpgroups a block, K splits) for out [m, n] from rows of `half` bytes:
    the smallest token tile that holds m (128 beyond: more tiles); four warpgroups (256 weight
    rows a block: every block reads all of x's tile, so taller blocks read less of it) below
    128-token tiles, whose accumulators leave registers for two; K split until the blocks
    fill the SMs, keeping >= 8 steps a block. Measured on an H100 (benchmarks/sweep_fp4.py, up to
    24 configurations at gate_up 28672x4096 and down 4096x14336, M 32-200, both formats): the
    rule's choice was the fastest but at down with 32 tokens (25.5 us against 25.2 with two
    warpgroups). Stream-K (132 blocks sharing the tiles' K steps evenly, cut tiles summed in the
    kernel) was slower on an H200 at every shape but gate_up with 200 tokens (6% faster):
    results/h200-2026-11-28-fp4-streamk."""
    tokens = next((t for t in FP4_WGMMA_TOKENS if t >= m), FP4_WGMMA_TOKENS[-1])
    groups = 4 if tokens < 128 else 2
    return tokens, groups, _k_split(-(-n // (64 * groups)) * -(-m // tokens), half // 64, sms, 8)


def fp4_gemm_wgmma_cuda(x, w, scale, global_scale, config=None):
    """out = x @ dequant(w)^T through csrc/fp4_wgmma.cu (check `fp4_wgmma_supported` first);
    config: as `fp4_wgmma_config` returns it (its default)."""
    from .triton_tiles import num_sms

    config = config or fp4_wgmma_config(x.shape[0], w.shape[0], w.shape[1], num_sms(x.device))
    xp = torch.empty(x.shape[0], 2 * w.shape[1], dtype=x.dtype, device=x.device)  # x in the kernel's K order
    return _fp4_launch("tk_fp4_gemm_wgmma", x, w, scale, global_scale, config, xp)


def fp4_w4a8_supported(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether the W4A8 variant of csrc/fp4_wgmma.cu takes these inputs: as `fp4_wgmma_supported`,
    with MXFP4 scales (uint8) whose rows and base are 2-byte aligned."""
    return (scale.dtype == torch.uint8 and scale.data_ptr() % 2 == 0 and scale.stride(0) % 2 == 0
            and fp4_wgmma_supported(x, w, scale))


def fp4_gemm_w4a8_cuda(x, w, scale, config=None):
    """out = fp8(x) @ dequant(w)^T through the W4A8 variant of csrc/fp4_wgmma.cu (check
    `fp4_w4a8_supported` first): x quantized per token to e4m3 (as trtllm_kernels.fp8's token
    scales), MXFP4 w converted to e4m3 in registers, fp8 wgmma. config: as `fp4_wgmma_config`."""
    from .triton_tiles import num_sms

    m, k = x.shape[0], 2 * w.shape[1]
    config = config or fp4_wgmma_config(m, w.shape[0], w.shape[1], num_sms(x.device))
    xq = torch.empty(m, k, dtype=torch.uint8, device=x.device)  # x in fp8, in the kernel's K order
    xs = torch.empty(m, dtype=torch.float32, device=x.device)
    return _fp4_launch("tk_fp4_gemm_w4a8", x, w, scale, None, config, xq, xs)


def fp8_quantize_tokens_cuda(x: torch.Tensor, rounded: bool = False):
    """bf16 x [M, K] (unit last stride, 16-byte aligned rows, K % 128 == 0), each token quantized
    to e4m3 as the W4A8 kernel quantizes it -> (e4m3 [M, K], fp32 scales [M, 1]) for an fp8 GEMM;
    rounded: -> bf16 [M, K], those values dequantized (W4A8's activations for a W4A16 kernel)."""
    m, k = x.shape
    out = torch.empty(m, k, dtype=x.dtype if rounded else _FP8, device=x.device)
    xs = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    code = library().tk_fp8_quantize_tokens(_ptr(x), _ptr(out), _ptr(xs), m, k, x.stride(0), int(rounded),
                                            _stream(x.device))
    _check(code, "tk_fp8_quantize_tokens")
    return out if rounded else (out, xs)


def fp4_w4a8_weights_cuda(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 w [N, K/2] (16-byte aligned rows, K % 128 == 0) -> (e4m3 [N, K], fp32 [N]): the
    weights the W4A8 GEMM multiplies, in K's order, and the row scales 2^(E - 133) that go with
    them (trtllm_kernels.fp4's W4A8 notes), for an fp8 GEMM with row-wise scales."""
    n, half = w.shape
    out = torch.empty(n, 2 * half, dtype=_FP8, device=w.device)
    rs = torch.empty(n, dtype=torch.float32, device=w.device)
    code = library().tk_fp4_w4a8_weights(_ptr(w), _ptr(scale), _ptr(out), _ptr(rs), n, half, w.stride(0),
                                         scale.stride(0), _stream(w.device))
    _check(code, "tk_fp4_w4a8_weights")
    return out, rs


def register() -> None:
    """Put the csrc kernels behind their ops (call only where CUDA and nvcc are present)."""
    from .._library import register_cuda_kernel

    register_cuda_kernel("rms_norm", rms_norm_cuda)
    register_cuda_kernel("fused_add_rms_norm", fused_add_rms_norm_cuda)
