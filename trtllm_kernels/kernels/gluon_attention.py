"""Paged causal prefill attention for Hopper in Gluon: TMA loads, asynchronous wgmma, a loader warp.

Same contract as `triton_paged_prefill` (see `trtllm_kernels.kernels.triton_attention`): q
[T, Hq, D], caches [num_blocks, Hkv, page, D], block_tables, seq_lens, query_start_loc; the
queries of a sequence are its last q_len positions. Same grid and tile order too: a program owns
BLOCK_M queries of one sequence and one query head (found by binary search over
query_start_loc, heaviest tiles first).

What Triton's compiler does not do, written out here:
- A loader partition (one warp, 24 registers) streams the K and V tiles of the program's
  sequence into a ring of STAGES shared-memory slots with TMA, one copy per page piece (pages
  of 16 rows included: a BLOCK_N tile is gathered from BLOCK_N / page copies into one slot),
  signalling `ready` mbarriers; the compute warps hand slots back through `empty` mbarriers.
- The compute partition (two warpgroups, 64 query rows each) software-pipelines the wgmmas
  the way FlashAttention-3 does: the scores S_{j+1} = Q K_{j+1}^T are issued (asynchronous
  wgmma) before the softmax of tile j, and O += P_j V_j is issued after it and waited for only
  before the next rescale of O, so the tensor cores run while the softmax runs. Triton's
  pipeliner keeps a wgmma in flight only when its result feeds another wgmma's accumulator,
  so `tl.dot` cannot express this.
- P goes from the score registers straight into the second wgmma's A operand (no shared
  memory round trip).
Rows of V past a sequence's end (slots that may hold anything, NaN included) are zeroed in
shared memory before P @ V; scores past the end or the diagonal are masked to -inf.

bf16 / fp16 queries and caches of the same dtype, head dim 64 or 128, pages of 8 or more rows
(a TMA box per page); other inputs stay on the Triton kernel (`supported`).
"""
from __future__ import annotations

import math

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

LOG2E = 1.4426950408889634

# Tiles (H100, D=128): 128 queries in two warpgroups, 64-key tiles, three K/V stages
# (Q 32 KB + 3 x 32 KB shared memory). 12 warps at MAXNREG registers fill the register file
# (168 x 384 threads); the loader warp's warpgroup gives back all but 24, the compute warps
# grow to 240.
BLOCK_M, BLOCK_N, STAGES, NUM_WARPS, MAXNREG, SPLIT = 128, 128, 2, 4, 168, 2
COMPUTE_REGS = 240  # registers of the second compute partition (split 2)
PINGPONG = False


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
def _load_partition(kd, vd, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, bt_row, kvh, end, n_tiles,
                    NUM_KV_HEADS: gl.constexpr, PAGE: gl.constexpr, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr):
    """Tile j's K then V into slot j % STAGES (mbarriers start in phase 1 complete: the first
    pass over the ring does not wait)."""
    for j in range(n_tiles):
        slot = j % STAGES
        phase = (j // STAGES) & 1
        _load_tile(kd, k_bufs.index(slot), k_ready.index(slot), k_empty.index(slot), phase, j * BLOCK_N, end,
                   bt_row, kvh, NUM_KV_HEADS, PAGE, BLOCK_N)
        _load_tile(vd, v_bufs.index(slot), v_ready.index(slot), v_empty.index(slot), phase, j * BLOCK_N, end,
                   bt_row, kvh, NUM_KV_HEADS, PAGE, BLOCK_N)


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
    # keys below first_pos are visible to every query of the tile: no mask there
    tok = start + gl.arange(0, BLOCK_N, layout=col_layout)
    if start + BLOCK_N > first_pos:
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, q_pos, tok, qk_scale, True)
    else:
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, q_pos, tok, qk_scale, False)
    return p, alpha, m_i, l_i


@gluon.jit
def _issue_pv(o, p_op, v_buf, start, seq_len, BLOCK_N: gl.constexpr, num_warps: gl.constexpr):
    """Issue O += P @ V (asynchronous). V rows at and past the sequence's end may hold anything
    (NaN included) and are zeroed in shared memory first (the same zeros by every compute
    partition; p is 0 there)."""
    if start + BLOCK_N > seq_len:
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        x = v_buf.load(blk)
        rows = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blk))
        v_buf.store(gl.where((rows < seq_len)[:, None], x, gl.zeros_like(x)))
        fence_async_shared()
        gl.thread_barrier()
    return warpgroup_mma(p_op, v_buf, o, is_async=True)


@gluon.jit
def _compute_partition(q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_mine, turn_other,
                       Out, q_start, q_len, row0, ctx, seq_len, n_tiles, h, stride_ot, stride_oh, qk_scale, v_scale,
                       HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, PINGPONG: gl.constexpr, SECOND: gl.constexpr,
                       num_warps: gl.constexpr):
    """Queries row0 .. row0 + ROWS of the sequence (positions ctx + row0 ...) over its K/V
    tiles as the loader streams them; writes their output rows.

    Per tile j + 1 (FlashAttention-3's intra-warpgroup overlap): issue S_{j+1} = Q K_{j+1}^T,
    rescale O by tile j's factor, issue O += P_j V_j, wait for S only, run softmax_{j+1} while
    P_j V_j runs, then wait for it. While a wgmma is in flight nothing reads or writes its
    registers (its accumulator, or P_j's), so ptxas keeps them asynchronous.

    PINGPONG (two compute partitions): the partitions take turns issuing their wgmmas (the
    `turn` mbarriers; the first partition goes first), so one's softmax runs while the other's
    matrix products do (FlashAttention-3's inter-warpgroup schedule)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    first_pos = ctx + row0
    q_pos = first_pos + gl.arange(0, ROWS, layout=row_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.zeros([ROWS], gl.float32, layout=row_layout)
    o = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)

    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.arrive(k_empty.index(0), count=1)
    p, alpha, m_i, l_i = _tile_softmax(s, m_i, l_i, q_pos, 0, first_pos, qk_scale, BLOCK_N, col_layout)
    p_op = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    if PINGPONG and SECOND:
        mbarrier.arrive(turn_other, count=1)  # the first partition's first turn
    for j in range(n_tiles - 1):
        slot = j % STAGES
        nxt = (j + 1) % STAGES
        mbarrier.wait(k_ready.index(nxt), ((j + 1) // STAGES) & 1)
        if PINGPONG:
            mbarrier.wait(turn_mine, j & 1)
        s = warpgroup_mma(q_smem, k_bufs.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        mbarrier.wait(v_ready.index(slot), (j // STAGES) & 1)
        o = _issue_pv(o, p_op, v_bufs.index(slot), j * BLOCK_N, seq_len, BLOCK_N, num_warps)
        if PINGPONG:
            mbarrier.arrive(turn_other, count=1)
        s = warpgroup_mma_wait(1, deps=(s,))  # the groups complete in issue order: S_{j+1} is done
        mbarrier.arrive(k_empty.index(nxt), count=1)
        p, alpha, m_i, l_i = _tile_softmax(s, m_i, l_i, q_pos, (j + 1) * BLOCK_N, first_pos, qk_scale, BLOCK_N,
                                           col_layout)
        o = warpgroup_mma_wait(0, deps=(o,))
        mbarrier.arrive(v_empty.index(slot), count=1)
        p_op = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    j = n_tiles - 1
    slot = j % STAGES
    o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    mbarrier.wait(v_ready.index(slot), (j // STAGES) & 1)
    o = _issue_pv(o, p_op, v_bufs.index(slot), j * BLOCK_N, seq_len, BLOCK_N, num_warps)
    o = warpgroup_mma_wait(0, deps=(o,))
    mbarrier.arrive(v_empty.index(slot), count=1)

    o = o * gl.convert_layout(v_scale / l_i, gl.SliceLayout(1, o_layout))[:, None]
    om = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    od = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o_rows = (q_start + om).to(gl.int64)
    gl.store(Out + (o_rows * stride_ot + h * stride_oh)[:, None] + od[None, :], o.to(Out.dtype.element_ty),
             mask=(om < q_len)[:, None])


@gluon.jit(do_not_specialize=["num_seqs", "stride_bt", "BT", "SL", "QSL"])
def _paged_prefill_kernel(
    Q, KD, VD, BT, SL, QSL, Out, qk_scale, v_scale,
    stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, num_seqs,
    NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SEARCH_ITERS: gl.constexpr,
    SPLIT: gl.constexpr, PINGPONG: gl.constexpr, COMPUTE_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    # SPLIT compute partitions of num_warps warps each take BLOCK_M // SPLIT query rows; with
    # SPLIT 2 they share the K/V slots (each arrives on the `empty` barriers) but not a program
    # counter, so one's softmax can run while the other's wgmmas do.
    ROWS: gl.constexpr = BLOCK_M // SPLIT
    h = gl.program_id(0)
    tile = gl.num_programs(1) - 1 - gl.program_id(1)  # heaviest tiles first
    # sequence i owns tiles [QSL[i] // BLOCK_M + i, QSL[i+1] // BLOCK_M + i + 1)
    lo = gl.program_id(1) * 0
    hi = num_seqs
    for _ in gl.static_range(SEARCH_ITERS):
        mid = (lo + hi) // 2
        right = gl.load(QSL + mid) // BLOCK_M + mid <= tile
        lo = gl.where(right, mid, lo)
        hi = gl.where(right, hi, mid)
    seq = lo
    q_start = gl.load(QSL + seq)
    q_len = gl.load(QSL + seq + 1) - q_start
    local = tile - (q_start // BLOCK_M + seq)
    if local * BLOCK_M < q_len:
        seq_len = gl.load(SL + seq)
        ctx = seq_len - q_len  # positions before the sequence's first query
        end = gl.minimum(ctx + (local + 1) * BLOCK_M, seq_len)  # one past the tile's last query
        kvh = h // GROUP

        q_blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        offs_m = local * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_blk))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_blk))
        q_rows = (q_start + offs_m).to(gl.int64)
        q = gl.load(Q + (q_rows * stride_qt + h * stride_qh)[:, None] + offs_d[None, :],
                    mask=(offs_m < q_len)[:, None], other=0.0)
        q_smem = gl.allocate_shared_memory(q.dtype, [BLOCK_M, HEAD_DIM], KD.layout, q)
        k_bufs = gl.allocate_shared_memory(KD.dtype, [STAGES, BLOCK_N, HEAD_DIM], KD.layout)
        v_bufs = gl.allocate_shared_memory(VD.dtype, [STAGES, BLOCK_N, HEAD_DIM], VD.layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=SPLIT)
            mbarrier.init(v_empty.index(i), count=SPLIT)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        fence_async_shared()  # Q's stores and the barriers' init, before async-proxy use

        bt_row = BT + seq.to(gl.int64) * stride_bt
        # Both compute partitions walk all the tiles up to the last query of the program's
        # tile: their turns stay paired (the first partition's last tile is masked off when its
        # rows end a tile earlier).
        n_tiles = gl.cdiv(end, BLOCK_N)
        if SPLIT == 1:
            gl.warp_specialize([
                (_compute_partition, (q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn.index(0),
                                      turn.index(1), Out, q_start, q_len, local * BLOCK_M, ctx, seq_len, n_tiles,
                                      h, stride_ot, stride_oh, qk_scale, v_scale, HEAD_DIM, ROWS, BLOCK_N, STAGES,
                                      False, False, num_warps)),
                (_load_partition, (KD, VD, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, bt_row, kvh,
                                   end, n_tiles, NUM_KV_HEADS, PAGE, BLOCK_N, STAGES)),
            ], [1], [24])
        else:
            gl.static_assert(SPLIT == 2, "one or two compute partitions")
            gl.warp_specialize([
                (_compute_partition, (q_smem.slice(0, ROWS), k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                                      turn.index(0), turn.index(1), Out, q_start, q_len, local * BLOCK_M, ctx,
                                      seq_len, n_tiles, h, stride_ot, stride_oh, qk_scale, v_scale, HEAD_DIM, ROWS,
                                      BLOCK_N, STAGES, PINGPONG, False, num_warps)),
                (_compute_partition, (q_smem.slice(ROWS, ROWS), k_bufs, v_bufs, k_ready, v_ready, k_empty,
                                      v_empty, turn.index(1), turn.index(0), Out, q_start, q_len,
                                      local * BLOCK_M + ROWS, ctx, seq_len, n_tiles, h, stride_ot, stride_oh,
                                      qk_scale, v_scale, HEAD_DIM, ROWS, BLOCK_N, STAGES, PINGPONG, True,
                                      num_warps)),
                (_load_partition, (KD, VD, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, bt_row, kvh,
                                   end, n_tiles, NUM_KV_HEADS, PAGE, BLOCK_N, STAGES)),
            ], [num_warps, 1], [COMPUTE_REGS, 24])


def supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Inputs this kernel takes: a Hopper GPU, bf16/fp16 everywhere, D 64 or 128, pages of 8+
    rows (a power of two), caches contiguous and 16-byte aligned."""
    n, hkv, page, d = k_cache.shape
    return (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9
            and q.dtype in (torch.bfloat16, torch.float16) and k_cache.dtype == q.dtype
            and v_cache.dtype == q.dtype and d in (64, 128) and q.shape[-1] == d
            and page >= 8 and page & (page - 1) == 0 and q.stride(-1) == 1
            and all(c.is_contiguous() and c.data_ptr() % 16 == 0 for c in (k_cache, v_cache)))


def _descriptor(cache: torch.Tensor, box_rows: int, block_n: int):
    """A TMA descriptor over the cache as [num_blocks * Hkv * page, D] rows, box [box_rows, D],
    in the shared layout of a [block_n, D] tile."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    n, hkv, page, d = cache.shape
    gl_dtype = gl.bfloat16 if cache.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block_n, d], gl_dtype)
    return TensorDescriptor(cache, [n * hkv * page, d], [d, 1], [box_rows, d], layout)


def gluon_paged_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale=None,
                        k_scale: float = 1.0, v_scale: float = 1.0, *, out=None, block_m: int = BLOCK_M,
                        block_n: int = BLOCK_N, stages: int = STAGES, num_warps: int = NUM_WARPS,
                        maxnreg: int = MAXNREG, split: int = SPLIT, pingpong: bool = PINGPONG) -> torch.Tensor:
    """Paged causal prefill (the contract of `trtllm_kernels.attention.paged_attention_prefill`)
    for inputs `supported` accepts. The keywords are tuning knobs: block_m = 16 x num_warps x split."""
    total, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    num_seqs = block_tables.shape[0]
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    query_start_loc = query_start_loc.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if total == 0 or num_seqs == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else scale
    box = min(page, block_n)
    search_iters = 4 * math.ceil(math.log2(num_seqs) / 4) if num_seqs > 1 else 0
    _paged_prefill_kernel[(num_heads, total // block_m + num_seqs)](
        q, _descriptor(k_cache, box, block_n), _descriptor(v_cache, box, block_n), block_tables, seq_lens,
        query_start_loc, out, float(scale) * LOG2E * float(k_scale), float(v_scale),
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), num_seqs,
        NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, SEARCH_ITERS=search_iters,
        SPLIT=split, PINGPONG=bool(pingpong) and split == 2, COMPUTE_REGS=COMPUTE_REGS, num_warps=num_warps, maxnreg=maxnreg,
    )
    return out
