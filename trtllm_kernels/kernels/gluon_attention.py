"""Paged causal prefill attention for Hopper in Gluon: TMA loads, asynchronous wgmma, warp roles.

Same contract as `triton_paged_prefill` (see `trtllm_kernels.kernels.triton_attention`): q
[T, Hq, D], caches [num_blocks, Hkv, page, D], block_tables, seq_lens, query_start_loc; the
queries of a sequence are its last q_len positions. A work item is BLOCK_M query rows: BLOCK_M /
PACK positions of one sequence x PACK query heads of one kv head (GQA packing: each K/V tile
serves them all). Items run heaviest tile of a sequence first, head groups next to each other.

What Triton's compiler does not do, written out here (the FlashAttention-3 design):
- Persistent programs, one per SM, taking items from a global counter (items cost from one
  to hundreds of K/V tiles), so the next item's loads start while the current one finishes.
- Warp roles (`gl.warp_specialize`). A loader warp (24 registers) takes the items, skips the
  empty ones, publishes each to the compute warps (its id in global scratch, released by an
  mbarrier) and copies with TMA its Q tile (a [positions, heads, D] box; two buffers) and its
  K and V tiles (rings of K_STAGES and V_STAGES slots, K a tile ahead), one copy per page piece
  (pages of 16 rows included: a BLOCK_N tile is gathered into one slot by BLOCK_N / page
  copies), signalling `ready` mbarriers; the compute warps hand buffers back through `empty`
  mbarriers. Two compute partitions of one warpgroup each (240 registers) take 64 rows of
  the item; having no program counter in common, one's softmax can run while the other's
  matrix products do (measured: mostly it does not yet, see below).
- Within a compute partition, for tile j + 1: issue S_{j+1} = Q K_{j+1}^T (asynchronous
  wgmma), rescale O by tile j's factor, issue O += P_j V_j, wait for S only, run softmax_{j+1}
  while P_j V_j runs, then wait for it. While a wgmma is in flight nothing reads or writes its
  registers (its accumulator, or P_j's): otherwise ptxas serializes every wgmma of the kernel
  (warning C7514; the test that lowers this kernel checks it does not). Triton's own pipeliner
  keeps a wgmma in flight only when its result feeds another wgmma's accumulator, so `tl.dot`
  cannot express this.
- P goes from the score registers straight into the second wgmma's A operand.
Rows of V past a sequence's end (slots that may hold anything, NaN included) are zeroed in
shared memory before P @ V; scores past the end or the diagonal are masked to -inf.

Measured on H100 (4 x 4096 causal, 32/8 heads, D 128, bf16, page 16, `benchmarks/prefill_sweep.py`,
results in benchmarks/results/h100-2026-11-27/gluon_prefill/), each step against the last: one
program per item with one compute partition of two warpgroups, 64-key tiles: 1581 us, ptxas
having serialized every wgmma (C7514: the softmax read S_j while S_{j+1} was in flight); the loop
reordered as above: 1283; two compute partitions: 1146; 128-key tiles: 1089 (a third K/V stage,
or making the partitions take turns issuing (FA3's ping-pong): no change); persistent programs
taking items round-robin: 1110 (12% load imbalance over 132 programs), from a work counter:
1041; Q through TMA and GQA packing: 1012 (packing itself: within noise, so L2 bandwidth is not
the limit); K one tile ahead of V in the ring: within noise. Carrying the pipeline across items
(no drain per item) ran slower (1060: its extra live state spilled) and was dropped. ncu: tensor
pipe active 67% of cycles, issue slots 34% busy. The limit: a build without the softmax (timing
only) ran 688 us, so the softmax is mostly not overlapped with the tensor cores; not the
exponentials' throughput nor the row reductions' chains (each replaced in a build: no change).

bf16 / fp16 queries and caches of the same dtype, head dim 64 or 128, pages of 8 or more rows
(a TMA box per page); other inputs stay on the Triton kernel (`supported`).
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .triton_attention import prefill_search_iters
from .triton_tiles import num_sms

LOG2E = 1.4426950408889634

# 128 query rows per item (64 per compute warpgroup), 128-key tiles, a K ring of 3 and a V ring
# of 2: shared memory Q 2 x 32 KB + K 3 x 32 KB + V 2 x 32 KB = 224 KB (of 227). The kernel's
# 12 warps at MAXNREG registers fill the register file (168 x 384 threads); the loader's
# warpgroup keeps LOADER_REGS a thread, the compute warpgroups grow to COMPUTE_REGS.
BLOCK_M, BLOCK_N, K_STAGES, V_STAGES = 128, 128, 3, 2
ROWS, NUM_WARPS, MAXNREG, COMPUTE_REGS, LOADER_REGS = 64, 4, 168, 240, 24


@gluon.jit
def _work_item(w, QSL, SL, num_seqs, num_tiles, NUM_HEADS: gl.constexpr, PACK: gl.constexpr,
               BLOCK_Q: gl.constexpr, SEARCH_ITERS: gl.constexpr):
    """Work item w -> (first of its PACK heads, sequence, the sequence's first query row, q_len,
    tile within the sequence, seq_len). An item is BLOCK_Q positions x PACK heads; items run
    heaviest tile of a sequence first, head groups fastest; sequence i owns tiles
    [QSL[i] // BLOCK_Q + i, QSL[i+1] // BLOCK_Q + i + 1) (some empty: local * BLOCK_Q >= q_len)."""
    h0 = w % (NUM_HEADS // PACK) * PACK
    tile = num_tiles - 1 - w // (NUM_HEADS // PACK)
    lo = tile * 0
    hi = num_seqs
    for _ in gl.static_range(SEARCH_ITERS):
        mid = (lo + hi) // 2
        right = gl.load(QSL + mid) // BLOCK_Q + mid <= tile
        lo = gl.where(right, mid, lo)
        hi = gl.where(right, hi, mid)
    q_start = gl.load(QSL + lo)
    q_len = gl.load(QSL + lo + 1) - q_start
    local = tile - (q_start // BLOCK_Q + lo)
    return h0, lo, q_start, q_len, local, gl.load(SL + lo)


@gluon.jit
def _load_tile(desc, buf, ready, empty, phase, start, end, bt_row, kvh,
               NUM_KV_HEADS: gl.constexpr, PAGE: gl.constexpr, BLOCK_N: gl.constexpr):
    """Keys start .. start + BLOCK_N of kv head kvh into `buf` once it is free: a TMA copy per
    box of min(PAGE, BLOCK_N) rows. Boxes past `end` reload the last one (their block-table
    entries may not exist); those rows are masked or zeroed by the compute warps."""
    BOX: gl.constexpr = desc.block_type.shape[0]
    mbarrier.wait(empty, phase ^ 1)
    mbarrier.expect(ready, BLOCK_N * desc.block_type.shape[1] * desc.dtype.primitive_bitwidth // 8)
    last = (end - 1) // BOX * BOX
    for i in gl.static_range(BLOCK_N // BOX):
        tok = gl.minimum(start + i * BOX, last)
        row = (gl.load(bt_row + tok // PAGE) * NUM_KV_HEADS + kvh) * PAGE + tok % PAGE
        tma.async_copy_global_to_shared(desc, [row, 0], ready, buf.slice(i * BOX, BOX))


@gluon.jit
def _load_partition(qd, kd, vd, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
                    BT, SL, QSL, Sched, stride_bt, num_seqs, num_tiles, num_items,
                    NUM_HEADS: gl.constexpr, NUM_KV_HEADS: gl.constexpr, HEAD_DIM: gl.constexpr,
                    PAGE: gl.constexpr, PACK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, SEARCH_ITERS: gl.constexpr):
    """Takes work items from the global counter Sched[0] (a program that finishes early takes
    more: the items' costs differ by up to the context length), skips the empty ones, and per
    item: publishes its id in Sched[1 + 2 * pid + qi % 2] for the compute warps, copies its Q
    tile into buffer qi % 2, then its K and V tiles into the ring (running tile count kv;
    mbarriers start in phase 1 complete, so the first pass does not wait). Publishes num_items
    when the counter runs out."""
    BLOCK_Q: gl.constexpr = BLOCK_M // PACK
    kv = 0
    qi = 0
    slots = Sched + 1 + 2 * gl.program_id(0)
    w = gl.atomic_add(Sched, 1)
    while w < num_items:
        h0, seq, q_start, q_len, local, seq_len = _work_item(w, QSL, SL, num_seqs, num_tiles, NUM_HEADS, PACK,
                                                             BLOCK_Q, SEARCH_ITERS)
        if local * BLOCK_Q < q_len:
            end = gl.minimum(seq_len - q_len + (local + 1) * BLOCK_Q, seq_len)  # past the item's last query
            n_tiles = gl.cdiv(end, BLOCK_N)
            qb = qi % 2
            mbarrier.wait(q_empty.index(qb), ((qi // 2) & 1) ^ 1)
            gl.store(slots + qb, w)  # released to the compute warps by the barrier's arrive
            mbarrier.expect(q_ready.index(qb), BLOCK_M * HEAD_DIM * qd.dtype.primitive_bitwidth // 8)
            # BLOCK_Q positions x PACK heads; rows past the sequence (another sequence's, or
            # zeros past T) are never stored
            tma.async_copy_global_to_shared(qd, [q_start + local * BLOCK_Q, h0, 0], q_ready.index(qb),
                                            q_bufs.index(qb))
            bt_row = BT + seq.to(gl.int64) * stride_bt
            kvh = h0 // (NUM_HEADS // NUM_KV_HEADS)
            # K runs a tile ahead of V: S_{j+1} needs K_{j+1} before P_j V_j needs V_j
            for j in range(n_tiles + 1):
                if j < n_tiles:
                    slot = (kv + j) % K_STAGES
                    _load_tile(kd, k_bufs.index(slot), k_ready.index(slot), k_empty.index(slot),
                               ((kv + j) // K_STAGES) & 1, j * BLOCK_N, end, bt_row, kvh, NUM_KV_HEADS, PAGE, BLOCK_N)
                if j > 0:
                    slot = (kv + j - 1) % V_STAGES
                    _load_tile(vd, v_bufs.index(slot), v_ready.index(slot), v_empty.index(slot),
                               ((kv + j - 1) // V_STAGES) & 1, (j - 1) * BLOCK_N, end, bt_row, kvh, NUM_KV_HEADS,
                               PAGE, BLOCK_N)
            kv += n_tiles
            qi += 1
        w = gl.atomic_add(Sched, 1)
    qb = qi % 2
    mbarrier.wait(q_empty.index(qb), ((qi // 2) & 1) ^ 1)
    gl.store(slots + qb, num_items)
    mbarrier.arrive(q_ready.index(qb), count=1)


@gluon.jit
def _softmax(s, m_i, l_i, q_pos, tok, qk_scale, MASK: gl.constexpr):
    """Online softmax of one score tile (exp2 domain): p (unnormalised), the rescale factor
    of the running sums, and the new running max and sum."""
    if MASK:
        s = gl.where(tok[None, :] <= q_pos[:, None], s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        p = gl.exp2(s - m_new[:, None])
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _tile_softmax(s, m_i, l_i, q_pos, start, first_pos, qk_scale, BLOCK_N: gl.constexpr,
                  col_layout: gl.constexpr):
    # keys below first_pos are visible to every query of the partition's rows: no mask there
    tok = start + gl.arange(0, BLOCK_N, layout=col_layout)
    if start + BLOCK_N > first_pos:
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, q_pos, tok, qk_scale, True)
    else:
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, q_pos, tok, qk_scale, False)
    return p, alpha, m_i, l_i


@gluon.jit
def _issue_pv(o, p_op, v_buf, start, seq_len, BLOCK_N: gl.constexpr, num_warps: gl.constexpr):
    """Issue O += P @ V (asynchronous). V rows at and past the sequence's end may hold anything
    (NaN included) and are zeroed in shared memory first (the same zeros by both compute
    partitions; p is 0 there)."""
    if start + BLOCK_N > seq_len:
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        x = v_buf.load(blk)
        rows = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blk))
        v_buf.store(gl.where((rows < seq_len)[:, None], x, gl.zeros_like(x)))
        fence_async_shared()
        gl.thread_barrier()
    return warpgroup_mma(p_op, v_buf, o, is_async=True)


@gluon.jit
def _attend(q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, kv, n_tiles, first_pos, seq_len, qk_scale,
            HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, PACK: gl.constexpr, BLOCK_N: gl.constexpr,
            K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, num_warps: gl.constexpr):
    """Rows at positions first_pos + r // PACK over the item's n_tiles K/V tiles (ring tiles
    kv ...): the unnormalised O and the softmax sums."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    q_pos = first_pos + gl.arange(0, ROWS, layout=row_layout) // PACK
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.zeros([ROWS], gl.float32, layout=row_layout)
    o = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)

    slot = kv % K_STAGES
    mbarrier.wait(k_ready.index(slot), (kv // K_STAGES) & 1)
    s = warpgroup_mma(q_smem, k_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.arrive(k_empty.index(slot), count=1)
    p, alpha, m_i, l_i = _tile_softmax(s, m_i, l_i, q_pos, 0, first_pos, qk_scale, BLOCK_N, col_layout)
    p_op = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    for j in range(n_tiles - 1):
        vs = (kv + j) % V_STAGES
        ks = (kv + j + 1) % K_STAGES
        mbarrier.wait(k_ready.index(ks), ((kv + j + 1) // K_STAGES) & 1)
        s = warpgroup_mma(q_smem, k_bufs.index(ks).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        mbarrier.wait(v_ready.index(vs), ((kv + j) // V_STAGES) & 1)
        o = _issue_pv(o, p_op, v_bufs.index(vs), j * BLOCK_N, seq_len, BLOCK_N, num_warps)
        s = warpgroup_mma_wait(1, deps=(s,))  # the groups complete in issue order: S_{j+1} is done
        mbarrier.arrive(k_empty.index(ks), count=1)
        p, alpha, m_i, l_i = _tile_softmax(s, m_i, l_i, q_pos, (j + 1) * BLOCK_N, first_pos, qk_scale, BLOCK_N,
                                           col_layout)
        o = warpgroup_mma_wait(0, deps=(o,))
        mbarrier.arrive(v_empty.index(vs), count=1)
        p_op = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    j = n_tiles - 1
    vs = (kv + j) % V_STAGES
    o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    mbarrier.wait(v_ready.index(vs), ((kv + j) // V_STAGES) & 1)
    o = _issue_pv(o, p_op, v_bufs.index(vs), j * BLOCK_N, seq_len, BLOCK_N, num_warps)
    o = warpgroup_mma_wait(0, deps=(o,))
    mbarrier.arrive(v_empty.index(vs), count=1)
    return o, l_i


@gluon.jit
def _compute_partition(q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, Out,
                       SL, QSL, Sched, num_seqs, num_tiles, num_items, stride_ot, stride_oh, qk_scale, v_scale,
                       HALF: gl.constexpr, NUM_HEADS: gl.constexpr, HEAD_DIM: gl.constexpr, ROWS: gl.constexpr,
                       PACK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr,
                       V_STAGES: gl.constexpr, SEARCH_ITERS: gl.constexpr, num_warps: gl.constexpr):
    """Rows HALF * ROWS ... of each item the loader publishes (row r: position r // PACK of the
    item, head h0 + r % PACK): attention over its tiles, then the output rows."""
    BLOCK_Q: gl.constexpr = BLOCK_M // PACK
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    slots = Sched + 1 + 2 * gl.program_id(0)
    kv = 0
    qi = 0
    mbarrier.wait(q_ready.index(0), 0)
    w = gl.load(slots, volatile=True)
    while w < num_items:
        qb = qi % 2
        h0, seq, q_start, q_len, local, seq_len = _work_item(w, QSL, SL, num_seqs, num_tiles, NUM_HEADS, PACK,
                                                             BLOCK_Q, SEARCH_ITERS)
        ctx = seq_len - q_len  # positions before the sequence's first query
        end = gl.minimum(ctx + (local + 1) * BLOCK_Q, seq_len)
        # Both partitions walk all the item's tiles, so they consume each ring slot alike
        # (the first's last tile is masked off for it when its rows end a tile earlier).
        n_tiles = gl.cdiv(end, BLOCK_N)
        pos0 = local * BLOCK_Q + HALF * (ROWS // PACK)  # the partition's first query position
        q_smem = q_bufs.index(qb).reshape([BLOCK_M, HEAD_DIM]).slice(HALF * ROWS, ROWS)
        o, l_i = _attend(q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, kv, n_tiles, ctx + pos0,
                         seq_len, qk_scale, HEAD_DIM, ROWS, PACK, BLOCK_N, K_STAGES, V_STAGES, num_warps)
        mbarrier.arrive(q_empty.index(qb), count=1)
        o = o * gl.convert_layout(v_scale / l_i, gl.SliceLayout(1, o_layout))[:, None]
        r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
        pos = pos0 + r // PACK
        od = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        offs = (q_start + pos).to(gl.int64) * stride_ot + (h0 + r % PACK) * stride_oh
        gl.store(Out + offs[:, None] + od[None, :], o.to(Out.dtype.element_ty), mask=(pos < q_len)[:, None])
        kv += n_tiles
        qi += 1
        mbarrier.wait(q_ready.index(qi % 2), (qi // 2) & 1)
        w = gl.load(slots + qi % 2, volatile=True)


@gluon.jit(do_not_specialize=["num_seqs", "num_tiles", "num_items", "stride_bt", "BT", "SL", "QSL", "Sched"])
def _paged_prefill_kernel(
    QD, KD, VD, BT, SL, QSL, Sched, Out, qk_scale, v_scale,
    stride_bt, stride_ot, stride_oh, num_seqs, num_tiles, num_items,
    NUM_HEADS: gl.constexpr, NUM_KV_HEADS: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
    ROWS: gl.constexpr, PACK: gl.constexpr,
    SEARCH_ITERS: gl.constexpr, COMPUTE_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    gl.static_assert(BLOCK_M == 2 * ROWS, "two compute partitions of ROWS query rows")
    q_bufs = gl.allocate_shared_memory(QD.dtype, [2, BLOCK_M // PACK, PACK, HEAD_DIM], QD.layout)
    k_bufs = gl.allocate_shared_memory(KD.dtype, [K_STAGES, BLOCK_N, HEAD_DIM], KD.layout)
    v_bufs = gl.allocate_shared_memory(VD.dtype, [V_STAGES, BLOCK_N, HEAD_DIM], VD.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # both compute partitions
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
    for i in gl.static_range(V_STAGES):
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()  # the barriers' init, before the async proxy uses them

    gl.warp_specialize([
        (_compute_partition, (q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, Out,
                              SL, QSL, Sched, num_seqs, num_tiles, num_items, stride_ot, stride_oh, qk_scale, v_scale, 0,
                              NUM_HEADS, HEAD_DIM, ROWS, PACK, BLOCK_M, BLOCK_N, K_STAGES, V_STAGES, SEARCH_ITERS,
                              num_warps)),
        (_compute_partition, (q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, Out,
                              SL, QSL, Sched, num_seqs, num_tiles, num_items, stride_ot, stride_oh, qk_scale, v_scale, 1,
                              NUM_HEADS, HEAD_DIM, ROWS, PACK, BLOCK_M, BLOCK_N, K_STAGES, V_STAGES, SEARCH_ITERS,
                              num_warps)),
        (_load_partition, (QD, KD, VD, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
                           BT, SL, QSL, Sched, stride_bt, num_seqs, num_tiles, num_items, NUM_HEADS, NUM_KV_HEADS,
                           HEAD_DIM, PAGE, PACK, BLOCK_M, BLOCK_N, K_STAGES, V_STAGES, SEARCH_ITERS)),
    ], [num_warps, 1], [COMPUTE_REGS, LOADER_REGS])


def supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Inputs this kernel takes: a Hopper GPU, bf16/fp16 everywhere, D 64 or 128, pages of 8+
    rows (a power of two), caches contiguous and 16-byte aligned."""
    n, hkv, page, d = k_cache.shape
    return (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9
            and q.dtype in (torch.bfloat16, torch.float16) and k_cache.dtype == q.dtype
            and v_cache.dtype == q.dtype and d in (64, 128) and q.shape[-1] == d
            and page >= 8 and page & (page - 1) == 0
            and all(c.is_contiguous() and c.data_ptr() % 16 == 0 for c in (k_cache, v_cache)))


def _gl_dtype(t: torch.Tensor):
    return gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16


def _cache_descriptor(cache: torch.Tensor, box_rows: int):
    """TMA descriptor over a cache as [num_blocks * Hkv * page, D] rows, box [box_rows, D], in
    the shared layout of a [BLOCK_N, D] tile (a box per page piece lands in one tile)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    n, hkv, page, d = cache.shape
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, d], _gl_dtype(cache))
    return TensorDescriptor(cache, [n * hkv * page, d], [d, 1], [box_rows, d], layout)


def _q_descriptor(q: torch.Tensor, pack: int):
    """TMA descriptor over q [T, Hq, D], box [BLOCK_M // pack, pack, D]: an item's positions x
    heads, landing as a [BLOCK_M, D] tile (row = position * pack + head)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    block = [BLOCK_M // pack, pack, q.shape[2]]
    layout = gl.NVMMASharedLayout.get_default_for(block, _gl_dtype(q))
    return TensorDescriptor(q, list(q.shape), [q.stride(0), q.stride(1), 1], block, layout)


def default_pack(num_heads: int, num_kv_heads: int) -> int:
    """Query heads of one kv head per work item (GQA packing): every K/V tile a program loads
    serves that many heads, so the K/V bytes read from L2 fall by that factor for the same
    math (unpacked, 4 x 4096 at 32/8 heads moved ~4.4 TB/s from L2). The group, up to 8 (an
    item keeps >= 16 positions)."""
    group = num_heads // num_kv_heads
    return group if group in (1, 2, 4, 8) else 1


def gluon_paged_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale=None,
                        k_scale: float = 1.0, v_scale: float = 1.0, *, out=None,
                        grid: int | None = None, pack: int | None = None, k_stages: int = K_STAGES,
                        v_stages: int = V_STAGES) -> torch.Tensor:
    """Paged causal prefill (the contract of `trtllm_kernels.attention.paged_attention_prefill`)
    for inputs `supported` accepts. `grid`: persistent programs (default: one per SM); `pack`:
    query heads per work item (a divisor of the GQA group; default `default_pack`)."""
    total, num_heads, head_dim = q.shape
    n, num_kv_heads, page, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    group = num_heads // num_kv_heads
    pack = default_pack(num_heads, num_kv_heads) if pack is None else pack
    if group % pack or pack not in (1, 2, 4, 8):
        raise ValueError(f"pack={pack} must be 1, 2, 4 or 8 and divide the GQA group ({group})")
    if q.stride(2) != 1 or any((st * q.element_size()) % 16 for st in q.stride()[:2]) or q.data_ptr() % 16:
        q = q.contiguous()  # Q tiles go through a TMA descriptor
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    query_start_loc = query_start_loc.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if total == 0 or num_seqs == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else scale
    block_q = BLOCK_M // pack  # positions per work item
    num_tiles = total // block_q + num_seqs  # an upper bound on the sequences' query tiles (static)
    num_items = num_heads // pack * num_tiles
    search_iters = prefill_search_iters(num_seqs)
    box = min(page, BLOCK_N)
    grid = min(num_items, grid or num_sms(q.device))
    sched = torch.zeros(1 + 2 * grid, dtype=torch.int32, device=q.device)  # item counter, published ids
    _paged_prefill_kernel[(grid,)](
        _q_descriptor(q, pack), _cache_descriptor(k_cache, box), _cache_descriptor(v_cache, box),
        block_tables, seq_lens, query_start_loc, sched, out, float(scale) * LOG2E * float(k_scale), float(v_scale),
        block_tables.stride(0), out.stride(0), out.stride(1), num_seqs, num_tiles, num_items,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, K_STAGES=k_stages, V_STAGES=v_stages, ROWS=ROWS, PACK=pack, SEARCH_ITERS=search_iters,
        COMPUTE_REGS=COMPUTE_REGS, LOADER_REGS=LOADER_REGS, num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )
    return out
