"""Helpers shared by the Triton kernels' launch rules and GEMMs (attention, fp8, fp4, mlp)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

DEFAULT_NUM_SMS = 132  # H100 SXM / H200: the figure the launch rules assume where there is no GPU


@functools.lru_cache(maxsize=None)
def _device_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device | None = None) -> int:
    """SM count of `device` (default: the current CUDA device), for rules that size a launch to
    one wave."""
    if device is None:
        if not torch.cuda.is_available():
            return DEFAULT_NUM_SMS
        device = torch.device("cuda")
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column) in grouped order: GROUP_M tile rows walk the tile
    columns together, so the B tiles they share are read from L2 rather than from memory."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def sum_splits_kernel(P, OUT, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[i] = sum over s of P[s, i], in order s = 0, 1, ... (P: split-K partials, fp32).
    A fixed order instead of atomics: the GEMMs' results do not vary run to run."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(P + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT_K):
        acc += tl.load(P + s * numel + offs, mask=mask, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)
