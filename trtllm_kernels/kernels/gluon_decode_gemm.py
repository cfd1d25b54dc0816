"""FP8 GEMMs of decode steps (1-16 tokens) on Hopper in Gluon, the weight streaming from the
moment a program starts.

At a few tokens a GEMM is a stream of its fp8 weight: the tokens only fill the narrow side of
the wgmma tile (out^T = W x^T: 64 weight rows by 16 tokens, `_fp8_gemm_tma_kernel`'s swapped
orientation). Launched with programmatic dependent launch (triton_tiles.PDL) after a kernel
that triggers its dependents early (RMSNorm+quant, decode attention), a program is resident
while that kernel still runs. The Triton TMA kernel can only wait there: its pipeline's first
loads come after `gdc_wait`, since the activations they include are the earlier kernel's
output. Here the ring's first STAGES weight tiles, which no kernel writes, are requested before
the wait, and only the activation tiles after it; the first product then waits for the
activations' L2 round trip, not for the weight's DRAM latency.

A program takes W_ROWS weight rows (64, one warpgroup; the GLU 128 gate + 128 up rows, two
warpgroups) by all tokens, K split over the grid where the tiles are few (the last program of a
tile to arrive adds the fp32 partials in split order, as the Triton kernel does). A ring slot
holds 256 of K, two 128-wide TMA boxes (128 bytes, the swizzle's span) of the weight and of the
activations ([16, 128]: TMA fills rows past M with zeros), with one `ready` mbarrier. Each
slot's products are waited for at once and the slot refilled right after.

Measured on an H200 (benchmarks/results/h200-2026-11-29-decode-gemm, `decode_gemm_bench.py`,
CUDA graphs, weights past L2): each GEMM right after the kernel feeding it, 1 token, us (Triton
-> Gluon): qkv 11.08 -> 10.06, o 9.33 -> 8.94, gate_up 33.46 -> 32.90; down (after the GLU
gate_up) 47.79 -> 49.06. FP8 batch-1 TPOT at Llama-3.1-8B shape 3.058 -> 2.983 ms (3.000 with
only qkv and o on it). The GLU gate_up kernel also lets the down GEMM after it launch at once
(`GLU_TRIGGER`), so that one's programs set up and request their weight while the GLU runs (on
the SMs it leaves free: the mechanism is inferred, not profiled): 2.986 -> 2.907 ms on another
machine. Tried and dropped: 128-wide slots (qkv 10.04 against 8.92 us back to back at 16
tokens: 128-byte weight runs read slower), a product left in flight across slots (its slot
refilled a step later: qkv 11.9 us).

Scales (the FP8 engine's decode GEMMs): weights per output channel; activations per token
(qkv, o, the GLU gate_up: applied once in the epilogue) or per 1 x 128 group (the fused MLP's
down GEMM: each K step's product is scaled and added in fp32). The GLU epilogue writes
silu(gate) * up, optionally as fp8 with one scale per token and 128 columns (the tile's rows).
"""
from __future__ import annotations

import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait

from ..fp8 import AMAX_MIN as _AMAX_MIN
from ..fp8 import FP8, SCALE_BLOCK
from ..fp8 import FP8_MAX as _FP8_MAX
from .triton_tiles import arrival_counters, capability, pdl, split_k_in_two

FP8_MAX = gl.constexpr(_FP8_MAX)
AMAX_MIN = gl.constexpr(_AMAX_MIN)
BK = 128  # K of one TMA box (128 bytes: the shared-memory swizzle's span) and of one activation scale group
HALVES = 2  # boxes a ring slot: each weight row is read in 256-byte runs (128-byte ones measured slower)
TOKENS = 16  # the wgmma tile's token side
W_ROWS = 64  # weight rows per program: one warpgroup's wgmma tile
GLU_ROWS = SCALE_BLOCK  # a GLU program's gate (and up) rows: one 1 x 128 output group per token
NUM_WARPS = {False: 4, True: 8}  # by GLU: a warpgroup per 64 weight rows (the GLU's two halves of 128)
# ring slots by GLU: 6 x (64 + 16) x 256 bytes, 3 x (4 x 128 + 2 x 16) x 128
STAGES = {False: 6, True: 3}
# "gluon" (this module at 1-16 tokens where it takes the inputs) or "triton" (_fp8_gemm_tma_kernel)
DECODE_GEMM = os.environ.get("TRTLLM_KERNELS_DECODE_GEMM", "gluon")
# the GEMMs that take it: "plain" (per-token or per-tensor activation scales: qkv, o), "glu" (the
# GLU epilogue: gate_up), "group" (per-1x128-group activation scales: down). All four measured
# best end to end (results README).
KINDS = "plain,glu,group"
# 1: the GLU gate_up GEMM lets the (PDL-launched) down GEMM after it start at once
GLU_TRIGGER = 1


@gluon.jit
def _gdc_wait(PDL: gl.constexpr):
    """Wait for the kernel before this one (launched with PDL) to finish and its writes to be
    visible; a no-op without PDL."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gdc_trigger(PDL: gl.constexpr):
    """Let the kernel after this one, if launched with PDL, start now (a no-op without PDL)."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)


@gluon.jit
def _load_slot(WD, XD, w_bufs, x_bufs, bar, s, tile0, row0, glu_off, ROWS: gl.constexpr, HALVES: gl.constexpr,
               GLU: gl.constexpr, WEIGHT: gl.constexpr, ACTS: gl.constexpr):
    """The weight (WEIGHT) and / or activation (ACTS) tiles of K tiles tile0 ... tile0 + HALVES - 1
    (128 wide each) into slot s; the GLU's weight tiles hold the gate rows, then the up rows."""
    for h in gl.static_range(HALVES):
        k = (tile0 + h) * 128
        if WEIGHT:
            w = w_bufs.index(s * HALVES + h)
            if GLU:
                tma.async_copy_global_to_shared(WD, [row0, k], bar, w.slice(0, ROWS))
                tma.async_copy_global_to_shared(WD, [glu_off + row0, k], bar, w.slice(ROWS, ROWS))
            else:
                tma.async_copy_global_to_shared(WD, [row0, k], bar, w)
        if ACTS:
            tma.async_copy_global_to_shared(XD, [0, k], bar, x_bufs.index(s * HALVES + h))


@gluon.jit
def _last_to_arrive(counter, arrivals):
    """triton_tiles.last_to_arrive for Gluon: counts the program in, True for the last of
    `arrivals` (which resets the counter); stores before it are visible to the last one's .cg
    loads after it."""
    gl.thread_barrier()
    last = gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == arrivals - 1
    gl.store(counter, 0, mask=last)
    return last


@gluon.jit(do_not_specialize=["M"])
def _decode_gemm_kernel(WD, XD, WS, XS, Out, OS, P, Counters, M, N, K_TILES, glu_off, stride_xs, stride_om,
                        stride_os, ROWS: gl.constexpr, HALVES: gl.constexpr, STAGES: gl.constexpr,
                        SPLIT_K: gl.constexpr, GLU: gl.constexpr, QUANT_OUT: gl.constexpr,
                        GROUP_SCALES: gl.constexpr, PDL: gl.constexpr, GLU_TRIGGER: gl.constexpr,
                        num_warps: gl.constexpr):
    """out[t, n] = sum_k x[t, k] w[n, k] * scales for the rows [row0, row0 + ROWS) of this
    program's tile and its share of the K steps (see the module docstring). WD: the weight's
    descriptor ([ROWS, 128] boxes), XD: the activations' ([16, 128]). Out: [M, N] (GLU: [M, glu_off]),
    or with SPLIT_K > 1 through fp32 partials P [SPLIT_K, M, N]."""
    W_TILE: gl.constexpr = 2 * ROWS if GLU else ROWS  # weight rows of one 128-wide K tile
    SLOT_BYTES: gl.constexpr = HALVES * (W_TILE + 16) * 128
    tile = gl.program_id(0)
    split = gl.program_id(1)
    row0 = tile * ROWS
    share = HALVES * gl.cdiv(K_TILES, HALVES * SPLIT_K)  # K tiles a split, whole slots
    k_lo = split * share
    n_s = gl.cdiv(gl.maximum(gl.minimum(K_TILES - k_lo, share), 0), HALVES)  # slots of this split

    if GLU_TRIGGER:  # the down GEMM after it may start streaming its weight now
        _gdc_trigger(PDL)
    w_bufs = gl.allocate_shared_memory(WD.dtype, [STAGES * HALVES, W_TILE, 128], WD.layout)
    x_bufs = gl.allocate_shared_memory(XD.dtype, [STAGES * HALVES, 16, 128], XD.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    fence_async_shared()

    # The weight of the first STAGES slots before the wait (no kernel writes it), the
    # activations after.
    for i in gl.static_range(STAGES):
        if i < n_s:
            mbarrier.expect(ready.index(i), SLOT_BYTES)
            _load_slot(WD, XD, w_bufs, x_bufs, ready.index(i), i, k_lo + i * HALVES, row0, glu_off, ROWS, HALVES, GLU,
                       True, False)
    _gdc_wait(PDL)
    for i in gl.static_range(STAGES):
        if i < n_s:
            _load_slot(WD, XD, w_bufs, x_bufs, ready.index(i), i, k_lo + i * HALVES, row0, glu_off, ROWS, HALVES, GLU,
                       False, True)

    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, 16, 32])
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
    t = gl.arange(0, 16, layout=gl.SliceLayout(0, acc_layout))
    rmask = r < N - row0
    tmask = t < M
    acc = gl.zeros([ROWS, 16], gl.float32, layout=acc_layout)
    up = gl.zeros([ROWS, 16], gl.float32, layout=acc_layout)
    if GROUP_SCALES:  # a slot's two groups' scales, loaded two slots ahead (an L2 round trip is longer than a slot)
        gl.static_assert(HALVES == 2, "two groups a slot")
        zero = gl.zeros([ROWS, 16], gl.float32, layout=acc_layout)
        xs_ptr = XS + t.to(gl.int64) * stride_xs + k_lo
        n_t = K_TILES - k_lo
        xs0 = gl.load(xs_ptr, mask=tmask & (0 < n_t), other=0.0)
        xs1 = gl.load(xs_ptr + 1, mask=tmask & (1 < n_t), other=0.0)
        xs2 = gl.load(xs_ptr + 2, mask=tmask & (2 < n_t), other=0.0)
        xs3 = gl.load(xs_ptr + 3, mask=tmask & (3 < n_t), other=0.0)
    for j in range(n_s):
        s = j % STAGES
        mbarrier.wait(ready.index(s), (j // STAGES) & 1)
        if GROUP_SCALES:  # each group's product on its own, then added times its scales
            p0 = warpgroup_mma(w_bufs.index(2 * s), x_bufs.index(2 * s).permute((1, 0)), zero, use_acc=False,
                               is_async=True)
            p1 = warpgroup_mma(w_bufs.index(2 * s + 1), x_bufs.index(2 * s + 1).permute((1, 0)), zero,
                               use_acc=False, is_async=True)
            ahead0 = gl.load(xs_ptr + 2 * j + 4, mask=tmask & (2 * j + 4 < n_t), other=0.0)
            ahead1 = gl.load(xs_ptr + 2 * j + 5, mask=tmask & (2 * j + 5 < n_t), other=0.0)
            p0, p1 = warpgroup_mma_wait(0, deps=(p0, p1))
            acc = acc + p0 * xs0[None, :] + p1 * xs1[None, :]
            xs0, xs1, xs2, xs3 = xs2, xs3, ahead0, ahead1
        else:
            for h in gl.static_range(HALVES):
                w = w_bufs.index(s * HALVES + h)
                xt = x_bufs.index(s * HALVES + h).permute((1, 0))
                if GLU:
                    acc = warpgroup_mma(w.slice(0, ROWS), xt, acc, is_async=True)
                    up = warpgroup_mma(w.slice(ROWS, ROWS), xt, up, is_async=True)
                else:
                    acc = warpgroup_mma(w, xt, acc, is_async=True)
            if GLU:
                acc, up = warpgroup_mma_wait(0, deps=(acc, up))
            else:
                acc = warpgroup_mma_wait(0, deps=(acc,))
        # the slot is done (every warp past its wait): it takes slot j + STAGES's tiles
        gl.thread_barrier()
        if j + STAGES < n_s:
            mbarrier.expect(ready.index(s), SLOT_BYTES)
            _load_slot(WD, XD, w_bufs, x_bufs, ready.index(s), s, k_lo + (j + STAGES) * HALVES, row0, glu_off, ROWS,
                       HALVES, GLU, True, True)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))

    acc = acc * gl.load(WS + row0 + r, mask=rmask, other=0.0)[:, None]
    if not GROUP_SCALES:
        xs_tok = gl.load(XS + t.to(gl.int64) * stride_xs, mask=tmask, other=0.0)
        acc = acc * xs_tok[None, :]
    if GLU:
        up = up * gl.load(WS + glu_off + row0 + r, mask=rmask, other=0.0)[:, None] * xs_tok[None, :]
        acc = acc / (1.0 + gl.exp(-acc)) * up
    mask = rmask[:, None] & tmask[None, :]
    offs = t.to(gl.int64)[None, :] * stride_om + (row0 + r)[:, None]
    if SPLIT_K > 1:
        p_offs = t.to(gl.int64)[None, :] * N + (row0 + r)[:, None]
        gl.store(P + split.to(gl.int64) * M * N + p_offs, acc, mask=mask)
        if _last_to_arrive(Counters + tile, SPLIT_K):
            acc = gl.load(P + p_offs, mask=mask, other=0.0, cache_modifier=".cg")
            for s in gl.static_range(1, SPLIT_K):
                acc += gl.load(P + s * M * N + p_offs, mask=mask, other=0.0, cache_modifier=".cg")
            gl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)
    elif QUANT_OUT:  # each token's 128 outputs of this tile are one group
        amax = gl.max(gl.where(mask, gl.abs(acc), 0.0), axis=0)
        scale = gl.maximum(amax, AMAX_MIN) / FP8_MAX
        gl.store(OS + t.to(gl.int64) * stride_os + tile, scale, mask=tmask)
        q = gl.minimum(gl.maximum(gl.div_rn(acc, scale[None, :]), -FP8_MAX), FP8_MAX)
        gl.store(Out + offs, q.to(Out.dtype.element_ty), mask=mask)
    else:
        gl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)


def supported(a: torch.Tensor, b: torch.Tensor, a_mode: int, b_mode: int, bias, glu: bool) -> bool:
    """What the kernel takes: a Hopper GPU, 1-16 tokens, no bias; fp8 a [M, K] and b [N, K] (GLU:
    [2I, K], I a multiple of 128), K-contiguous rows 16-byte aligned (TMA), K a multiple of 16;
    weight scales per output channel (mode 2), activation scales per tensor or token (1, 2: one
    token's is a tensor's) or per 1 x 128 group (3)."""
    from .triton_fp8 import MODE_ROW, MODE_ROW_GROUP, MODE_TENSOR, _interpreting, _tma_ok

    m, k = a.shape
    kind = "glu" if glu else "group" if a_mode == MODE_ROW_GROUP else "plain"
    return (DECODE_GEMM == "gluon" and kind in KINDS.split(",") and not _interpreting() and a.is_cuda
            and capability(a.device)[0] == 9 and 1 <= m <= TOKENS and bias is None
            and a.dtype == b.dtype == FP8 and b_mode == MODE_ROW and a_mode in (MODE_TENSOR, MODE_ROW, MODE_ROW_GROUP)
            and not (glu and (a_mode == MODE_ROW_GROUP or (b.shape[0] // 2) % GLU_ROWS))
            and k % 16 == 0 and a.stride(1) == b.stride(1) == 1 and _tma_ok(a) and _tma_ok(b))


def decode_gemm(a, b, a_scale, b_scale, group_scales: bool, out, out_scale=None, glu: bool = False):
    """out = (a * a_scale) @ (b * b_scale)^T for inputs `supported` takes (a_scale [M, 1], or
    [M, cdiv(K, 128)] with group_scales; b_scale one per row of b). glu: b is [gate; up] [2I, K]
    and out [M, I] gets silu(gate) * up, as fp8 with its scales [M, I / 128] in out_scale when
    given."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    m, k = a.shape
    n = out.shape[1]
    rows = GLU_ROWS if glu else W_ROWS
    k_tiles = triton.cdiv(k, BK)
    split = 1 if glu else split_k_in_two(triton.cdiv(n, W_ROWS), k, a.device)
    w_layout = gl.NVMMASharedLayout.get_default_for([rows, BK], gl.float8e4nv)
    x_layout = gl.NVMMASharedLayout.get_default_for([TOKENS, BK], gl.float8e4nv)
    wd = TensorDescriptor(b, list(b.shape), [b.stride(0), 1], [rows, BK], w_layout)
    xd = TensorDescriptor(a, [m, k], [a.stride(0), 1], [TOKENS, BK], x_layout)
    tiles = triton.cdiv(n, rows)
    part = counters = out  # unused without split-K
    if split > 1:
        part = torch.empty((split, m, n), dtype=torch.float32, device=out.device)
        counters = arrival_counters(out.device, tiles)
    use_pdl = pdl(out.device, m)
    _decode_gemm_kernel[(tiles, split)](
        wd, xd, b_scale.reshape(-1), a_scale, out, out_scale if out_scale is not None else a_scale, part, counters,
        m, n, k_tiles, n if glu else 0, 0 if a_scale.numel() == 1 else a_scale.stride(0), out.stride(0),
        out_scale.stride(0) if out_scale is not None else 0,
        ROWS=rows, HALVES=HALVES, STAGES=STAGES[glu], SPLIT_K=split, GLU=glu, QUANT_OUT=out_scale is not None,
        GROUP_SCALES=group_scales, PDL=use_pdl, GLU_TRIGGER=bool(glu and GLU_TRIGGER),
        launch_pdl=use_pdl, num_warps=NUM_WARPS[glu])
