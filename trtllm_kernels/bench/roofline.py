"""The device's own ceilings, measured in the same run as the kernels, and roofline fractions.

A datasheet's 3.35 TB/s or 989 TFLOP/s is not what this VM's GPU delivers; a kernel is judged
against what the device measurably does today, in the same process:
- copy bandwidth: a large device-to-device copy, counting bytes read + bytes written;
- matmul peak: a large square GEMM (8192^3 in bf16 on CUDA, cuBLAS).
fraction_of_roofline = roofline time / measured time, where roofline time is the larger of
bytes / bandwidth and FLOPs / peak. 1.0 is as fast as the device allows; a memory-bound kernel
at 0.9 is doing well, one at 0.3 leaves most of the bandwidth on the table.
"""
from __future__ import annotations

import torch

from .timing import time_fn


def measure_copy_bandwidth(
    device: torch.device | str, nbytes: int | None = None, *, iters: int = 20, graph: bool = False
) -> float:
    """Device-to-device copy bandwidth in bytes/s, read + write counted (2 x nbytes per copy).

    nbytes defaults to 1 GiB on CUDA (20x the L2, so the cache cannot help) and 32 MiB on CPU.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (32 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    t = time_fn(lambda s, d: d.copy_(s), [(src, dst)], warmup=3, iters=iters, graph=graph)
    return 2 * nbytes / (t["median_us"] * 1e-6)


def measure_matmul_peak(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int | None = None, *,
    iters: int = 20,
) -> float:
    """Dense matmul throughput in FLOP/s for an n x n x n GEMM (2 n^3 FLOPs).

    n defaults to 8192 on CUDA (large enough to reach cuBLAS's peak) and 256 on CPU (only so
    the logic runs there; a CPU figure means little).
    """
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 256
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32  # CPU half-precision GEMMs are emulated; fp32 is the fair figure
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = time_fn(lambda x, y, o: torch.matmul(x, y, out=o), [(a, b, out)], warmup=5, iters=iters)
    return 2 * n**3 / (t["median_us"] * 1e-6)


def roofline_us(nbytes: float, flops: float, bandwidth: float, peak: float) -> float:
    """The least time in microseconds the device allows: max(bytes / bandwidth, FLOPs / peak)."""
    memory_s = nbytes / bandwidth if nbytes and bandwidth else 0.0
    compute_s = flops / peak if flops and peak else 0.0
    return max(memory_s, compute_s) * 1e6


def fraction_of_roofline(us: float, nbytes: float, flops: float, bandwidth: float, peak: float) -> float:
    """roofline time / measured time (1.0 = at the roofline; bytes in B, bandwidth in B/s,
    flops in FLOP, peak in FLOP/s, us the measured time in microseconds)."""
    if us <= 0:
        raise ValueError(f"measured time must be positive, got {us} us")
    return roofline_us(nbytes, flops, bandwidth, peak) / us
