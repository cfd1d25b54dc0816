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


# Arrival counters: int32 zeros that kernels whose programs split one piece of work (a tile's K
# loop, a sequence's KV) count into, so that the last program of a piece merges the others'
# partials in the same launch instead of a second kernel. At batch 1 on an H200 those kernels
# took 1.1-1.9 us each; the fence and L2 round trip of an arrival cost nearly as much, for 1.2%
# of FP8 decode time in all (benchmarks/results/h200-2026-11-28-fused-tails). Every kernel
# leaves the counters it used at zero, so kernels in order on one stream share one buffer; each
# (device, stream) has its own, and buffers are never freed (a CUDA graph keeps their address).
_COUNTERS: dict[tuple, list[torch.Tensor]] = {}
MIN_COUNTERS = 1 << 16


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n zeroed int32 counters for kernels on the current stream of `device`."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    bufs = _COUNTERS.setdefault((str(device), stream), [])
    if not bufs or bufs[-1].numel() < n:  # grown buffers keep the old alive for captured graphs
        bufs.append(torch.zeros(max(n, MIN_COUNTERS), dtype=torch.int32, device=device))
    return bufs[-1]


@triton.jit
def last_to_arrive(counter, arrivals):
    """Counts this program in at `counter` and returns whether it is the last of `arrivals`;
    the last one resets the counter to zero. Stores made before the call are visible to the
    last program's loads after it (load those with cache_modifier=".cg"): the barrier orders
    the program's stores before the release of its arrival, the acquire orders the last
    program's loads after every release."""
    tl.debug_barrier()
    last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == arrivals - 1
    tl.store(counter, 0, mask=last)
    return last


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
