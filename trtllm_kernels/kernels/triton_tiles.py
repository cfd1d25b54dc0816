"""Helpers shared by the Triton kernels' launch rules and GEMMs (attention, fp8, fp4, mlp)."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

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


# Programmatic dependent launch (PDL, sm_90+) of the FP8 decode GEMMs. A GEMM launched with it
# (`launch_pdl=True`) starts as soon as every program of the kernel before it has called
# `gdc_launch_dependents` (`pdl_trigger`: first thing in the RMSNorm+quant, rope and decode
# attention kernels), sets up its tile and pipeline, and waits (`gdc_wait`) for that kernel to
# finish and its writes to be visible before it reads them. On an H200 this took the FP8 batch-1
# TPOT from 3.094 to 3.059 ms with the Triton GEMM (benchmarks/results/h200-2026-11-28-pdl); the
# Gluon one of kernels/gluon_decode_gemm.py also streams its weight before the wait, and its GLU
# gate_up triggers the down GEMM after it (3.058 -> 2.983 ms, then 2.986 -> 2.907 ms, two
# machines, benchmarks/results/h200-2026-11-29-decode-gemm). Only GEMMs are launched with PDL
# and only that GLU GEMM triggers one, so no launch runs more than one GEMM ahead: letting every
# kernel launch the next at once made TPOT 12% worse (3.098 -> 3.465 ms), kernels starting
# launches ahead and taking SMs before the work they waited for was done. Asking L2 for the
# Triton GEMM's weight before the wait (cp.async.bulk.prefetch, up to 16 MB a GEMM) made it 3%
# worse (3.194 ms).
# Steps of more than PDL_MAX_TOKENS tokens launch as before: at batch 256 (1000 x 128/128) PDL
# cost 0.8% of throughput (23,181 / 23,168 tok/s off, 23,013 / 22,960 on, alternating). Kernels
# without PDL wait as always, so the chain mixes freely with torch's and cuBLAS's kernels. 0 turns
# it off (A/B runs: benchmarks/ab_run.py kernels.triton_tiles.PDL=0).
PDL = int(os.environ.get("TRTLLM_KERNELS_PDL", "1"))
PDL_MAX_TOKENS = 16


def split_k_in_two(tiles: int, k: int, device: torch.device | None = None) -> int:
    """The memory-bound small-M FP8 GEMMs' split of K (Triton's and Gluon's kernels): 2 where the
    weight tiles fill at most half the SMs and K >= 4096 (o and down at 1-16 tokens: 64 tiles of
    64 rows), else 1."""
    return 2 if tiles <= num_sms(device) // 2 and k >= 4096 else 1


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def pdl(device: torch.device, tokens: int) -> bool:
    """Whether kernels of a step of `tokens` tokens on `device` take part in programmatic
    dependent launch (see PDL)."""
    if not PDL or tokens > PDL_MAX_TOKENS or device.type != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return capability(device)[0] >= 9


def capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability (cached: launch rules ask on every call)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let a GEMM launched with PDL after this kernel start now (a no-op without PDL)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """In a kernel launched with PDL, before it reads anything an earlier kernel writes or
    writes anything: wait for the kernel before it to finish (a no-op without PDL)."""
    if PDL:
        gdc_wait()


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
