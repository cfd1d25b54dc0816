"""FP8 GEMMs for Hopper in Gluon, weights with per-channel scales: activations with per-group
scales (the fused MLP's down GEMM, first below) and with per-token ones (qkv, o, and the GLU
gate_up with its SiLU-and-mul + fp8 epilogue: `_token_scaled_gemm_kernel`, further down).

Group-scaled:

out[m, n] = b_scale[n] * sum_g a_scale[m, g] * (sum_{k in group g} a[m, k] * b[n, k])

a: fp8 [M, K] with one fp32 scale per 1 x 128 group of each row (the gate_up epilogue's
quantized output), b: fp8 [N, K] with one scale per output channel. The group scale changes
every 128 of K, so each 128-wide K step's product is a separate wgmma chain (a fresh fp32
accumulator) that is scaled and added into the running sum: in Triton (`tl.dot` then the
multiply-add) every step waits for its wgmma before the next is issued, and the down GEMM ran
at 0.63-0.70x of a per-token `torch._scaled_mm` at M = 1024-2048 on an H100
(benchmarks/results/h100-2026-11-27/kv_sizing/call3/).

Here (the DeepGEMM design, written from its description):
- persistent programs (one per SM) walking output tiles in grouped order;
- a loader warp copies A [128, 128] and B [BLOCK_N, 128] tiles with TMA into a ring of STAGES
  slots (`ready` / `empty` mbarriers);
- two compute warpgroups take 64 rows of the tile each. Each K step's product goes into a
  fresh accumulator, is waited for, scaled by the rows' group scales and added to the running
  sum (the promotion); while one warpgroup promotes, the other's wgmma runs. With PIPELINE,
  K steps go in pairs: both products issued, the first promoted while the second runs. (Keeping
  a product in flight across loop iterations instead made ptxas serialize every wgmma, warning
  C7514, and spill; the lowering test checks for both.)
- each step's row scales are loaded a pair of steps ahead (an L2 round trip is longer than a
  step's wgmma; loaded after the wait, they had cost about as much as the math).

Measured on an H100, N 4096, K 14336 (`benchmarks/group_gemm_bench.py`, results in
benchmarks/results/h100-2026-11-27/group_gemm/): against the Triton kernel 1.15x at M = 128 and
1.26x at 256 (64-wide tiles: 128-wide ones would leave half the SMs idle), 1.20-1.28x at
384-4096, 1.12x at 8192; 0.82-0.88x of a per-token `torch._scaled_mm` from 384 rows (it skips
the per-group scaling), 1.05x at 256. Tried and not kept: the second warpgroup running its
pairs a step behind the first (no gain), 4 stages instead of 6 (within noise).

Token-scaled: the same loader and ring; the scales factor out of the K sum, so each warpgroup
chains every K step's wgmma into one accumulator and scales once; the tile leaves by a TMA
store through shared memory.

Group-scaled, chained (GROUP_SCALES in the token kernel, `group_kernel` picks it where its tiles
are 256 wide): the accumulator carries the sum in units of the current group's scale, so the
group scales need no second accumulator: before step k it is multiplied by s[k-1] / s[k] (after
its last product is waited for; the other warpgroup's keeps the tensor cores busy), and by the
last group's scale at the end. 256-wide tiles fit (one accumulator of 128 registers; the
promoting kernel's two would not), which read less shared memory per product than 128-wide ones:
H100, N 4096 K 14336, 1.06-1.18x the promoting kernel from 640 rows; FP8 + FP8 KV throughput
+2.6% at 128/128 (27,920 / 28,055 against 27,264 / 27,258 tok/s, interleaved, one machine) and
+1.1% at 1000/1000 (benchmarks/results/h100-2026-11-28/group_chain/). The cost: fp8 wgmma adds
into its accumulator with fewer bits than fp32, so chaining all of K drifts more than adding
each step in fp32: ~1.2% of the largest output at K 14336 against ~0.5% (the token kernel's
qkv / o / gate_up GEMMs chain the same way). H100 against the Triton kernel (benchmarks/results/h100-2026-11-27/
token_gemm/): 1.05-1.34x at 512 rows, 0.99-1.25x at 1024-8192 on the 8B shapes, 1.02-1.23x
`torch._scaled_mm` from 512 rows; the GLU epilogue 1.0-1.09x. End to end (FP8, FP8 KV cache):
+1.6% at 128/128 and +1.2% at 1000/1000 on an H100.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ..fp8 import AMAX_MIN as _AMAX_MIN
from ..fp8 import FP8, SCALE_BLOCK
from ..fp8 import FP8_MAX as _FP8_MAX
from .triton_tiles import num_sms

FP8_MAX = gl.constexpr(_FP8_MAX)
AMAX_MIN = gl.constexpr(_AMAX_MIN)

GROUP_K = 128  # K extent of one activation scale
GROUP = gl.constexpr(GROUP_K)  # the same, readable inside the kernels
BLOCK_M, ROWS, NUM_WARPS = 128, 64, 4  # two compute warpgroups of ROWS rows
BLOCK_N, STAGES, GROUP_M = 128, 6, 8  # ring: 6 x (16 + 16) KB
# the group-scaled GEMM's kernel: "auto" (the chained token kernel where its tiles are 256 wide,
# else the promoting one), "chain" or "promote"
GROUP_GEMM_KERNEL = "auto"
SCALE_MIN = gl.constexpr(_AMAX_MIN / _FP8_MAX)  # the quantizers' smallest scale
MAXNREG, COMPUTE_REGS, LOADER_REGS = 168, 240, 24


@gluon.jit
def _tile(t, tiles_m, tiles_n, GROUP_M: gl.constexpr):
    """Output tile t -> (row tile, column tile), GROUP_M row tiles at a time (L2 reuse of B)."""
    per_group = GROUP_M * tiles_n
    first_m = t // per_group * GROUP_M
    size_m = gl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + t % per_group % size_m, t % per_group // size_m


@gluon.jit
def _ring(AD, BD, BLOCK_M: gl.constexpr, B_ROWS: gl.constexpr, STAGES: gl.constexpr):
    """The operand ring in shared memory: STAGES slots of A [BLOCK_M, 128] and B [B_ROWS, 128]
    tiles, with a `ready` (loaded) and an `empty` (consumed by both compute warpgroups) mbarrier
    each."""
    a_bufs = gl.allocate_shared_memory(AD.dtype, [STAGES, BLOCK_M, GROUP], AD.layout)
    b_bufs = gl.allocate_shared_memory(BD.dtype, [STAGES, B_ROWS, GROUP], BD.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    fence_async_shared()  # the barriers' init, before the async proxy uses them
    return a_bufs, b_bufs, ready, empty


@gluon.jit
def _load_partition(ad, bd, a_bufs, b_bufs, ready, empty, num_tiles, tiles_m, tiles_n, k_tiles, glu_off,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                    GLU: gl.constexpr):
    """A and B tiles of every K step of this program's output tiles into the ring (running step
    count `it`; the `empty` barriers start complete, so the first pass does not wait). GLU: b is
    a [gate; up] weight (up rows glu_off below) and a slot holds the tile's gate rows, then its
    up rows."""
    B_ROWS: gl.constexpr = 2 * BLOCK_N if GLU else BLOCK_N
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pm, pn = _tile(t, tiles_m, tiles_n, GROUP_M)
        for k in range(k_tiles):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), (BLOCK_M + B_ROWS) * GROUP)
            tma.async_copy_global_to_shared(ad, [pm * BLOCK_M, k * GROUP], ready.index(s), a_bufs.index(s))
            if GLU:
                b = b_bufs.index(s)
                tma.async_copy_global_to_shared(bd, [pn * BLOCK_N, k * GROUP], ready.index(s), b.slice(0, BLOCK_N))
                tma.async_copy_global_to_shared(bd, [glu_off + pn * BLOCK_N, k * GROUP], ready.index(s),
                                                b.slice(BLOCK_N, BLOCK_N))
            else:
                tma.async_copy_global_to_shared(bd, [pn * BLOCK_N, k * GROUP], ready.index(s), b_bufs.index(s))
            it += 1


@gluon.jit
def _issue(a_bufs, b_bufs, ready, it, zero, HALF: gl.constexpr, ROWS: gl.constexpr, STAGES: gl.constexpr):
    """Wait for K step `it`'s tiles and issue this warpgroup's product of them (asynchronous)."""
    s = it % STAGES
    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
    a = a_bufs.index(s).slice(HALF * ROWS, ROWS)
    return warpgroup_mma(a, b_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)


@gluon.jit
def _promote(acc, part, sa, empty, it, STAGES: gl.constexpr):
    """Step `it` is done: hand its slot back and add its product, times the rows' scales of its
    group, into the running sum."""
    mbarrier.arrive(empty.index(it % STAGES), count=1)
    return acc + part * sa[:, None]


@gluon.jit
def _single(acc, a_bufs, b_bufs, ready, empty, it, sa_ptr, k, rmask, zero, HALF: gl.constexpr, ROWS: gl.constexpr,
            STAGES: gl.constexpr):
    """One K step on its own: issue, wait, promote (the scales loaded first: their latency
    overlaps the product)."""
    sa = gl.load(sa_ptr + k, mask=rmask, other=0.0)
    part = _issue(a_bufs, b_bufs, ready, it, zero, HALF, ROWS, STAGES)
    part = warpgroup_mma_wait(0, deps=(part,))
    return _promote(acc, part, sa, empty, it, STAGES)


@gluon.jit
def _compute_partition(a_bufs, b_bufs, ready, empty, AS, BS, Out, M, N, stride_as, stride_om,
                       num_tiles, tiles_m, tiles_n, k_tiles, HALF: gl.constexpr, ROWS: gl.constexpr,
                       BLOCK_N: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                       PIPELINE: gl.constexpr, num_warps: gl.constexpr):
    """Rows HALF * ROWS ... of each output tile of this program."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
    zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pm, pn = _tile(t, tiles_m, tiles_n, GROUP_M)
        rows = pm * (2 * ROWS) + HALF * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
        rmask = rows < M
        sa_ptr = AS + rows.to(gl.int64) * stride_as
        acc = zero
        # The row scales of each pair of steps are loaded a pair ahead: their latency (an L2
        # round trip, longer than a step's wgmma) hides behind the previous pair's work.
        if PIPELINE:  # k_tiles even: two steps issued, the first added while the second runs
            nsa0 = gl.load(sa_ptr, mask=rmask, other=0.0)
            nsa1 = gl.load(sa_ptr + 1, mask=rmask, other=0.0)
            for k in range(0, k_tiles, 2):
                sa0, sa1 = nsa0, nsa1
                more = rmask & (k + 2 < k_tiles)
                nsa0 = gl.load(sa_ptr + k + 2, mask=more, other=0.0)
                nsa1 = gl.load(sa_ptr + k + 3, mask=more, other=0.0)
                p0 = _issue(a_bufs, b_bufs, ready, it, zero, HALF, ROWS, STAGES)
                p1 = _issue(a_bufs, b_bufs, ready, it + 1, zero, HALF, ROWS, STAGES)
                p0 = warpgroup_mma_wait(1, deps=(p0,))
                acc = _promote(acc, p0, sa0, empty, it, STAGES)
                p1 = warpgroup_mma_wait(0, deps=(p1,))
                acc = _promote(acc, p1, sa1, empty, it + 1, STAGES)
                it += 2
        else:
            for k in range(k_tiles):
                acc = _single(acc, a_bufs, b_bufs, ready, empty, it, sa_ptr, k, rmask, zero, HALF, ROWS, STAGES)
                it += 1
        cols = pn * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
        cmask = cols < N
        out = acc * gl.load(BS + cols, mask=cmask, other=0.0)[None, :]
        offs = rows.to(gl.int64)[:, None] * stride_om + cols[None, :]
        gl.store(Out + offs, out.to(Out.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@gluon.jit(do_not_specialize=["M", "num_tiles", "tiles_m"])
def _group_scaled_gemm_kernel(AD, BD, AS, BS, Out, M, N, stride_as, stride_om, num_tiles, tiles_m, tiles_n, k_tiles,
                              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, ROWS: gl.constexpr,
                              STAGES: gl.constexpr, GROUP_M: gl.constexpr, PIPELINE: gl.constexpr,
                              COMPUTE_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(BLOCK_M == 2 * ROWS, "two compute warpgroups of ROWS rows")
    a_bufs, b_bufs, ready, empty = _ring(AD, BD, BLOCK_M, BLOCK_N, STAGES)
    gl.warp_specialize([
        (_compute_partition, (a_bufs, b_bufs, ready, empty, AS, BS, Out, M, N, stride_as, stride_om, num_tiles,
                              tiles_m, tiles_n, k_tiles, 0, ROWS, BLOCK_N, STAGES, GROUP_M, PIPELINE, num_warps)),
        (_compute_partition, (a_bufs, b_bufs, ready, empty, AS, BS, Out, M, N, stride_as, stride_om, num_tiles,
                              tiles_m, tiles_n, k_tiles, 1, ROWS, BLOCK_N, STAGES, GROUP_M, PIPELINE, num_warps)),
        (_load_partition, (AD, BD, a_bufs, b_bufs, ready, empty, num_tiles, tiles_m, tiles_n, k_tiles, 0,
                           BLOCK_M, BLOCK_N, STAGES, GROUP_M, False)),
    ], [num_warps, 1], [COMPUTE_REGS, LOADER_REGS])


# ---------------------------------------------------------------------------------------------
# Per-token activation scales: the scales factor out of the K sum, so each warpgroup chains all
# K steps' wgmmas into one accumulator (one step in flight while the next is issued) and scales
# once in the epilogue.

# ring depth by B rows per slot, beside the output tiles (2 x 64 x BLOCK_N): 3 x 48 + 64 KB (plain
# 256-wide), 4 x 48 + 32 (GLU, bf16 out), 5 x 32 + 32 (plain 128-wide)
TOKEN_STAGES = {(256, False): 3, (256, True): 4, (128, False): 5}


@gluon.jit
def _group_scale(sa_ptr, k, rmask, k_tiles):
    """The rows' scales of K group k (1 past M or past the last group), at least SCALE_MIN: a
    scale of 0 (which no quantizer here makes) would turn the next ratio infinite; clamped, its
    group adds its products times 2e-15 instead of 0."""
    return gl.maximum(gl.load(sa_ptr + k, mask=rmask & (k < k_tiles), other=1.0), SCALE_MIN)


@gluon.jit
def _token_compute_partition(a_bufs, b_bufs, ready, empty, c_smem, AS, BS, OD, OS, M, N, glu_off, stride_as,
                             stride_os, num_tiles, tiles_m, tiles_n, k_tiles, HALF: gl.constexpr, ROWS: gl.constexpr,
                             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                             GLU: gl.constexpr, QUANT_OUT: gl.constexpr, GROUP_SCALES: gl.constexpr,
                             num_warps: gl.constexpr):
    """Rows HALF * ROWS ... of each output tile of this program. GLU: two accumulators (the
    slot's gate rows and its up rows), silu(gate) * up written, with QUANT_OUT as fp8 with one
    scale per row of the tile (a 1 x 128 group: BLOCK_N = 128). The tile leaves through shared
    memory by a TMA store (clipped at M and N), which runs on while the next tile's K loop does;
    a store by pointers would hold a 64-bit address per element and spilled."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
    c = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pm, pn = _tile(t, tiles_m, tiles_n, GROUP_M)
        row0 = pm * (2 * ROWS) + HALF * ROWS
        col0 = pn * BLOCK_N
        rmask = r < M - row0
        cmask = c < N - col0
        acc = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)
        up = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)
        if GROUP_SCALES:
            # acc holds the sum so far in units of the current group's scale: before step k it
            # is multiplied by s[k - 1] / s[k] (a wgmma is waited for before its accumulator is
            # touched, so the other warpgroup's product keeps the tensor cores busy meanwhile).
            # Scales are loaded two steps ahead (an L2 round trip is longer than a step).
            # (No two loop-carried values may start as the same tensor: the frontend would take
            # the one assigned from the other for unchanged and drop it from the loop.)
            sa_ptr = AS + (row0 + r).to(gl.int64) * stride_as
            s_cur = _group_scale(sa_ptr, 0, rmask, k_tiles)
            s_next = _group_scale(sa_ptr, 1, rmask, k_tiles)
            ratio = gl.full([ROWS], 1.0, gl.float32, layout=gl.SliceLayout(1, acc_layout))
            for k in range(k_tiles):
                s_ahead = _group_scale(sa_ptr, k + 2, rmask, k_tiles)
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                acc = acc * ratio[:, None]
                acc = warpgroup_mma(a_bufs.index(s).slice(HALF * ROWS, ROWS), b_bufs.index(s).permute((1, 0)), acc,
                                    is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(empty.index(s), count=1)
                ratio = s_cur / s_next
                s_cur = s_next
                s_next = s_ahead
                it += 1
            # the last group's scale: ratio * s_cur = (s[K-1] / s[K]) * s[K] (s[K] = 1, past the end)
            sa = gl.where(rmask, ratio * s_cur, 0.0)
        else:
            for k in range(k_tiles):
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                a = a_bufs.index(s).slice(HALF * ROWS, ROWS)
                if GLU:
                    acc = warpgroup_mma(a, b_bufs.index(s).slice(0, BLOCK_N).permute((1, 0)), acc, is_async=True)
                    up = warpgroup_mma(a, b_bufs.index(s).slice(BLOCK_N, BLOCK_N).permute((1, 0)), up,
                                       is_async=True)
                    acc, up = warpgroup_mma_wait(2, deps=(acc, up))  # the last step's pair is done
                else:
                    acc = warpgroup_mma(a, b_bufs.index(s).permute((1, 0)), acc, is_async=True)
                    acc = warpgroup_mma_wait(1, deps=(acc,))  # the last step's product is done
                if k > 0:
                    mbarrier.arrive(empty.index((it - 1) % STAGES), count=1)
                it += 1
            if GLU:
                acc, up = warpgroup_mma_wait(0, deps=(acc, up))
            else:
                acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index((it - 1) % STAGES), count=1)
            sa = gl.load(AS + row0 + r, mask=rmask, other=0.0)  # 0 past M and N: those outputs are 0

        acc = acc * sa[:, None] * gl.load(BS + col0 + c, mask=cmask, other=0.0)[None, :]
        if GLU:
            up = up * sa[:, None] * gl.load(BS + glu_off + col0 + c, mask=cmask, other=0.0)[None, :]
            acc = acc / (1.0 + gl.exp(-acc)) * up
        if QUANT_OUT:
            scale = gl.maximum(gl.max(gl.abs(acc), axis=1), AMAX_MIN) / FP8_MAX
            gl.store(OS + (row0 + r).to(gl.int64) * stride_os + pn, scale, mask=rmask)
            acc = gl.minimum(gl.maximum(gl.div_rn(acc, scale[:, None]), -FP8_MAX), FP8_MAX)
        tma.store_wait(0)  # the last tile's store has read c_smem
        gl.thread_barrier()
        c_smem.store(acc.to(OD.dtype))
        fence_async_shared()
        gl.thread_barrier()
        tma.async_copy_shared_to_global(OD, [row0, col0], c_smem)
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["M", "num_tiles", "tiles_m"])
def _token_scaled_gemm_kernel(AD, BD, AS, BS, OD, OS, M, N, glu_off, stride_as, stride_os, num_tiles, tiles_m,
                              tiles_n, k_tiles, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, ROWS: gl.constexpr,
                              STAGES: gl.constexpr, GROUP_M: gl.constexpr, GLU: gl.constexpr,
                              QUANT_OUT: gl.constexpr, GROUP_SCALES: gl.constexpr, COMPUTE_REGS: gl.constexpr,
                              LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(BLOCK_M == 2 * ROWS, "two compute warpgroups of ROWS rows")
    a_bufs, b_bufs, ready, empty = _ring(AD, BD, BLOCK_M, 2 * BLOCK_N if GLU else BLOCK_N, STAGES)
    c_bufs = gl.allocate_shared_memory(OD.dtype, [2, ROWS, BLOCK_N], OD.layout)  # a tile per warpgroup
    gl.warp_specialize([
        (_token_compute_partition, (a_bufs, b_bufs, ready, empty, c_bufs.index(0), AS, BS, OD, OS, M, N, glu_off,
                                    stride_as, stride_os, num_tiles, tiles_m, tiles_n, k_tiles, 0, ROWS, BLOCK_N,
                                    STAGES, GROUP_M, GLU, QUANT_OUT, GROUP_SCALES, num_warps)),
        (_token_compute_partition, (a_bufs, b_bufs, ready, empty, c_bufs.index(1), AS, BS, OD, OS, M, N, glu_off,
                                    stride_as, stride_os, num_tiles, tiles_m, tiles_n, k_tiles, 1, ROWS, BLOCK_N,
                                    STAGES, GROUP_M, GLU, QUANT_OUT, GROUP_SCALES, num_warps)),
        (_load_partition, (AD, BD, a_bufs, b_bufs, ready, empty, num_tiles, tiles_m, tiles_n, k_tiles, glu_off,
                           BLOCK_M, BLOCK_N, STAGES, GROUP_M, GLU)),
    ], [num_warps, 1], [COMPUTE_REGS, LOADER_REGS])


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, FP8: gl.float8e4nv}


def _hopper_fp8_operands(a: torch.Tensor, b: torch.Tensor) -> bool:
    """fp8 a [M, K] and b [N, K] on a Hopper GPU, rows K-contiguous and 16-byte aligned (TMA)."""
    return (a.is_cuda and torch.cuda.get_device_capability(a.device)[0] == 9
            and a.dtype == b.dtype == torch.float8_e4m3fn and b.shape[1] == a.shape[1]
            and a.stride(1) == b.stride(1) == 1 and a.stride(0) % 16 == 0 and b.stride(0) % 16 == 0
            and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0)


def _channel_scale(b_scale: torch.Tensor, rows: int) -> bool:
    return b_scale.dtype == torch.float32 and tuple(b_scale.shape) in ((rows,), (rows, 1)) and b_scale.is_contiguous()


def supported(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor) -> bool:
    """What the group-scaled kernels take: a Hopper GPU; fp8 a [M, K] and b [N, K], K a multiple
    of 128, 16-byte aligned rows in and out (the output may go by TMA: N a multiple of 8, a 2-byte
    dtype); a_scale fp32 [M, K / 128]; b_scale fp32, one per output channel."""
    m, k = a.shape
    return (_hopper_fp8_operands(a, b) and k % GROUP_K == 0 and b.shape[0] % 8 == 0 and a_scale.dtype == torch.float32
            and a_scale.shape == (m, k // GROUP_K) and a_scale.stride(1) == 1 and _channel_scale(b_scale, b.shape[0]))


def token_supported(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                    glu: bool = False) -> bool:
    """What the token-scaled kernel takes: a Hopper GPU; fp8 a [M, K] and b [N, K] (with glu the
    [gate; up] weight [2I, K]), 16-byte aligned rows in and out (the output goes by TMA: N a
    multiple of 16); a_scale fp32 [M, 1]; b_scale fp32, one per row of b."""
    n = b.shape[0] // 2 if glu else b.shape[0]
    return (_hopper_fp8_operands(a, b) and n % 16 == 0 and (not glu or b.shape[0] % 2 == 0)
            and a_scale.dtype == torch.float32 and tuple(a_scale.shape) == (a.shape[0], 1)
            and _channel_scale(b_scale, b.shape[0]))


def token_block_n(m: int, n: int, sms: int) -> int:
    """Output columns per tile of the token-scaled kernel: 256 (the most tensor work per byte of
    shared memory read) unless 128-wide tiles finish in fewer waves' worth of work (a 128-wide
    tile taken as 10% slower per column)."""
    def cost(bn, per_column):
        return triton.cdiv(triton.cdiv(m, BLOCK_M) * triton.cdiv(n, bn), sms) * bn * per_column
    return 256 if cost(256, 1.0) <= cost(128, 1.1) else 128


def gluon_token_scaled_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                            out_dtype: torch.dtype = torch.bfloat16, *, glu: bool = False, quant_out: bool = False,
                            block_n: int | None = None, stages: int | None = None,
                            grid: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a * a_scale per row) @ (b * b_scale per row)^T for inputs `token_supported` accepts.
    glu: b is a [gate; up] weight [2I, K] and the result silu(gate) * up [M, I]; with quant_out
    it is fp8 with one fp32 scale per 1 x 128 group (returned second, [M, cdiv(I, 128)]), else
    out_dtype (second result None). block_n: 256 or 128 (default `token_block_n`; GLU: 128)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if quant_out and not glu:
        raise ValueError("quant_out is the GLU epilogue's")
    m, k = a.shape
    n = b.shape[0] // 2 if glu else b.shape[0]
    if glu:
        if block_n not in (None, SCALE_BLOCK):
            raise ValueError(f"the GLU epilogue takes 128-wide tiles, got block_n={block_n}")
        block_n = SCALE_BLOCK
    elif block_n is None:
        block_n = token_block_n(m, n, num_sms(a.device))
    if block_n not in (128, 256):
        raise ValueError(f"block_n must be 128 or 256, got {block_n}")
    out = torch.empty(m, n, dtype=FP8 if quant_out else out_dtype, device=a.device)
    out_scale = torch.empty(m, triton.cdiv(n, SCALE_BLOCK), dtype=torch.float32, device=a.device) if quant_out else None
    _launch_chained(a, b, a_scale.reshape(-1), 1, b_scale, out, out_scale, glu, False, block_n, stages, grid)
    return out, out_scale


def _launch_chained(a, b, a_scale, stride_as, b_scale, out, out_scale, glu, group_scales, block_n, stages, grid):
    """The chained kernel (`_token_scaled_gemm_kernel`) over a [M, K] and b [N or 2I, K] into out."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    m, k = a.shape
    n = out.shape[1]
    if m == 0 or n == 0:
        return
    stages = stages or TOKEN_STAGES[(2 * block_n if glu else block_n, glu)]
    a_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, GROUP_K], gl.float8e4nv)
    b_layout = gl.NVMMASharedLayout.get_default_for([block_n, GROUP_K], gl.float8e4nv)
    ad = TensorDescriptor(a, [m, k], [a.stride(0), 1], [BLOCK_M, GROUP_K], a_layout)
    bd = TensorDescriptor(b, list(b.shape), [b.stride(0), 1], [block_n, GROUP_K], b_layout)
    o_layout = gl.NVMMASharedLayout.get_default_for([ROWS, block_n], _GL_DTYPES[out.dtype])
    od = TensorDescriptor(out, [m, n], [out.stride(0), 1], [ROWS, block_n], o_layout)
    tiles_m, tiles_n = triton.cdiv(m, BLOCK_M), triton.cdiv(n, block_n)
    num_tiles = tiles_m * tiles_n
    grid = min(num_tiles, grid or num_sms(a.device))
    quant_out = out_scale is not None
    _token_scaled_gemm_kernel[(grid,)](
        ad, bd, a_scale, b_scale.reshape(-1), od, out_scale if quant_out else a_scale, m, n,
        n if glu else 0, stride_as, out_scale.stride(0) if quant_out else 0, num_tiles, tiles_m, tiles_n,
        triton.cdiv(k, GROUP_K), BLOCK_M=BLOCK_M, BLOCK_N=block_n, ROWS=ROWS, STAGES=stages, GROUP_M=GROUP_M,
        GLU=glu, QUANT_OUT=quant_out, GROUP_SCALES=group_scales, COMPUTE_REGS=COMPUTE_REGS,
        LOADER_REGS=LOADER_REGS, num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )


def group_kernel(m: int, n: int, sms: int) -> str:
    """The group-scaled GEMM's kernel: "chain" (the token kernel, scales applied as ratios) where
    its tiles are 256 wide, else "promote" (H100, N 4096 K 14336: chained 1.06-1.18x faster from
    640 rows, 0.70-0.89x at 256-512 rows with 128-wide tiles)."""
    return "chain" if token_block_n(m, n, sms) == 256 else "promote"


def gluon_group_scaled_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                            out_dtype: torch.dtype = torch.bfloat16, *, kernel: str | None = None,
                            pipeline: bool | None = None, block_n: int | None = None, stages: int | None = None,
                            grid: int | None = None) -> torch.Tensor:
    """(a * a_scale per 1 x 128 group) @ (b * b_scale per row)^T -> [M, N] of out_dtype, for
    inputs `supported` accepts. kernel: "chain" or "promote" (default GROUP_GEMM_KERNEL: "auto",
    `group_kernel`'s choice).
    chain: block_n 128 or 256 (default `token_block_n`); stages default TOKEN_STAGES.
    promote: pipeline: one product in flight while the last is added (needs an even number of K
    steps; default: whenever K / 128 is even). block_n: output columns per tile, 128 or 64
    (default: 64 where 128-wide tiles would fill at most half the SMs, as for N 4096 up to 256
    rows: there 1.15-1.26x the Triton kernel with 64, 0.84-0.98x with 128; at 384-512 rows 128
    wins, 1.20-1.28x against 0.79-0.86x, H100); stages default STAGES."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    m, k = a.shape
    n = b.shape[0]
    k_tiles = k // GROUP_K
    kernel = kernel or GROUP_GEMM_KERNEL
    if kernel == "auto":
        kernel = group_kernel(m, n, num_sms(a.device))
    if kernel not in ("chain", "promote"):
        raise ValueError(f"kernel must be 'chain', 'promote' or 'auto', got {kernel!r}")
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if kernel == "chain":
        block_n = block_n or token_block_n(m, n, num_sms(a.device))
        if block_n not in (128, 256):
            raise ValueError(f"the chained kernel's block_n must be 128 or 256, got {block_n}")
        _launch_chained(a, b, a_scale, a_scale.stride(0), b_scale, out, None, False, True, block_n, stages, grid)
        return out
    if pipeline is None:
        pipeline = k_tiles % 2 == 0
    if pipeline and k_tiles % 2:
        raise ValueError(f"pipeline needs an even number of 128-wide K steps, got {k_tiles}")
    if m == 0 or n == 0:
        return out
    if block_n is None:
        block_n = 64 if triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N) <= num_sms(a.device) // 2 else BLOCK_N
    if block_n not in (64, 128):
        raise ValueError(f"block_n must be 64 or 128, got {block_n}")
    a_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, GROUP_K], gl.float8e4nv)
    b_layout = gl.NVMMASharedLayout.get_default_for([block_n, GROUP_K], gl.float8e4nv)
    ad = TensorDescriptor(a, [m, k], [a.stride(0), 1], [BLOCK_M, GROUP_K], a_layout)
    bd = TensorDescriptor(b, [n, k], [b.stride(0), 1], [block_n, GROUP_K], b_layout)
    tiles_m, tiles_n = triton.cdiv(m, BLOCK_M), triton.cdiv(n, block_n)
    num_tiles = tiles_m * tiles_n
    grid = min(num_tiles, grid or num_sms(a.device))
    _group_scaled_gemm_kernel[(grid,)](
        ad, bd, a_scale, b_scale.reshape(-1), out, m, n, a_scale.stride(0), out.stride(0),
        num_tiles, tiles_m, tiles_n, k_tiles,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, ROWS=ROWS, STAGES=stages or STAGES, GROUP_M=GROUP_M, PIPELINE=pipeline,
        COMPUTE_REGS=COMPUTE_REGS, LOADER_REGS=LOADER_REGS, num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )
    return out

