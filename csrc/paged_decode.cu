// Paged decode attention (one query token per sequence) over the HND paged KV cache: the CUDA
// C++ twin of trtllm_kernels/kernels/triton_attention.py's decode kernel, in two kernels:
//   variant 0  paged_decode_kernel      dot products on CUDA cores (any page a multiple of 4);
//   variant 2  paged_decode_mma_kernel  dot products on tensor cores (mma.sync m16n8k16, fp32
//                                       accumulate; pages a multiple of 16), described below.
// Both share the split-KV combine kernel, the workspace layout and the launcher.
// Measured on H100 (32/8 heads, D128, page 16, CUDA graphs; .device/F-1, F-2), us, against the
// Triton kernel: B64 x 4096 bf16 variant 2 362 / variant 0 407 / Triton 359; fp8 212 / 318 /
// 200; B256 x 512 bf16 206 / 233 / 183; B4 x 32768 bf16 193 (16 splits) / 239 / 187, fp8 126
// / 210 / 144. Variant 0 is bound by its CUDA-core work (shuffle reductions, redundant softmax:
// ~75 instructions per key and warp against ~11 for variant 2). The op dispatches to variant 2
// for FP8 pages with few long sequences only (trtllm_kernels.kernels.triton_attention.
// cuda_decode_preferred); elsewhere Triton is as fast or faster.
//
// Layouts (as trtllm_kernels.kv_cache documents them): q [B, Hq, D]; k_cache / v_cache
// [num_blocks, Hkv, page, D] (bf16/fp16 like q, or float8_e4m3fn with one fp32 k_scale /
// v_scale); block_tables int32 [B, max_blocks]; seq_lens int32 [B]; out [B, Hq, D]. The last
// dim of every tensor is contiguous; other strides are passed in elements. D is 64 or 128 and
// Hq / Hkv at most 8.
//
// Variant 0. One CTA of NW warps per (sequence, kv head, KV split). The CTA holds the GP
// (>= group, a power of two) query heads of its kv head, so each K/V row is read once per
// group. A key row of D elements is read by TPK = D / 8 lanes, 8 elements each (16-byte loads
// for bf16/fp16, 8-byte for fp8); a warp's 32 / TPK lane groups ("slots") take KPT
// consecutive keys each per step (KPT divides the page size, so a slot's keys share one
// page: one block-table lookup per slot and step). Scores are lane-partial dot products summed
// over the slot's lanes with xor shuffles. Each slot keeps its own online-softmax state (max,
// sum, fp32 accumulator in the exp2 domain: log2(e), the softmax scale and k_scale are folded
// into q); slots merge through shuffles and the warps through shared memory at the end.
// Memory bound: latency is hidden by the warps resident per SM (launch bounds keep 3-4 CTAs
// per SM), each with KPT rows of K and V in flight per lane.
//
// Split-KV (flash-decoding): split s covers tokens [s * split_tokens, (s+1) * split_tokens);
// a split past its sequence's end exits at once. With num_splits > 1 each CTA writes its
// unnormalised accumulator and (max, sum) per head to the workspace
//   part_acc fp32 [B, Hq, num_splits, D], part_ml fp32 [2, B, Hq, num_splits]
// and tk_paged_decode_combine merges the cdiv(seq_len, split_tokens) splits that hold tokens.
// Positions at or past seq_len are never loaded (NaN in unused slots cannot leak); no host
// sync, no allocation: the caller owns the workspace, so the launch is CUDA-graph safe.
#include <cuda_fp8.h>

#include <type_traits>

#include "common.cuh"

namespace {

constexpr int kNW = 4;  // warps per CTA

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 8 cache elements of one key row, as they travel (16 bytes for 16-bit types, 8 for fp8).
template <typename C> struct Chunk { using type = uint4; };
template <> struct Chunk<__nv_fp8_e4m3> { using type = uint2; };

__device__ __forceinline__ void to_float8(const uint4& c, float* f, __nv_bfloat16) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&c);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
__device__ __forceinline__ void to_float8(const uint4& c, float* f, __half) {
  const __half2* h = reinterpret_cast<const __half2*>(&c);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 x = __half22float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
__device__ __forceinline__ void to_float8(const uint2& c, float* f, __nv_fp8_e4m3) {
  // e4m3 pairs -> half2 in one cvt each (sm_89+), then to fp32
  const __nv_fp8x2_storage_t* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&c);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(p[i], __NV_E4M3);
    float2 x = __half22float2(*reinterpret_cast<__half2*>(&r));
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

template <typename T> __device__ __forceinline__ void load_q8(const T* p, float* f) {
  to_float8(*reinterpret_cast<const uint4*>(p), f, T());
}

// The end of both decode kernels: merge the kNW warps' softmax states of one (sequence, kv
// head) from shared memory, then write the group's outputs (one split) or this split's
// unnormalized sums, max and denominator for the combine kernel (several).
template <typename T, int D, int GP>
__device__ __forceinline__ void merge_warps_and_store(
    const float (&sm_acc)[kNW][GP][D], const float (&sm_m)[kNW][GP], const float (&sm_l)[kNW][GP], int b,
    int kvh, int split, int group, int num_kv_heads, int num_splits, int batch, float v_scale,
    T* __restrict__ out, int64_t stride_ob, int64_t stride_oh, float* __restrict__ part_acc,
    float* __restrict__ part_ml) {
  const int num_heads = num_kv_heads * group;
  for (int i = threadIdx.x; i < group * D; i += kNW * 32) {
    const int g = i / D, d = i - g * D;
    float mw[kNW], mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kNW; ++w) {
      mw[w] = sm_m[w][g];
      mx = fmaxf(mx, mw[w]);
    }
    const float m_use = mx == -INFINITY ? 0.f : mx;
    float num = 0.f, den = 0.f;
#pragma unroll
    for (int w = 0; w < kNW; ++w) {
      const float c = fast_exp2(mw[w] - m_use);
      num += sm_acc[w][g][d] * c;
      den += sm_l[w][g] * c;
    }
    const int h = kvh * group + g;
    if (num_splits == 1) {
      const float o = den > 0.f ? num * (v_scale / den) : 0.f;
      out[b * stride_ob + h * stride_oh + d] = tk::from_float<T>(o);
    } else {
      const int64_t row = ((int64_t)b * num_heads + h) * num_splits + split;
      part_acc[row * D + d] = num;
      if (d == 0) {
        part_ml[row] = mx;
        part_ml[(int64_t)batch * num_heads * num_splits + row] = den;
      }
    }
  }
}

template <typename T, typename C, int D, int GP, int KPT, int MINB>
__global__ void __launch_bounds__(kNW * 32, MINB) paged_decode_kernel(
    const T* __restrict__ q, const C* __restrict__ kc, const C* __restrict__ vc,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens, T* __restrict__ out,
    float* __restrict__ part_acc, float* __restrict__ part_ml, int64_t stride_qb, int64_t stride_qh,
    int64_t stride_kb, int64_t stride_kh, int64_t stride_kt, int64_t stride_vb, int64_t stride_vh,
    int64_t stride_vt, int64_t stride_bt, int64_t stride_ob, int64_t stride_oh, int batch,
    int num_kv_heads, int group, int page, int split_tokens, int num_splits, float q_scale,
    float v_scale) {
  using CT = typename Chunk<C>::type;
  constexpr int TPK = D / 8;        // lanes per key row
  constexpr int SPW = 32 / TPK;     // slots per warp
  constexpr int NSLOT = kNW * SPW;  // slots per CTA
  constexpr int STEP = NSLOT * KPT; // keys per CTA step
  static_assert(D % 8 == 0 && TPK <= 32 && 32 % TPK == 0, "head dim must be 64, 128 or 256");

  __shared__ float sm_acc[kNW][GP][D];
  __shared__ float sm_m[kNW][GP];
  __shared__ float sm_l[kNW][GP];

  const int bh = blockIdx.x;
  const int split = blockIdx.y;
  const int b = bh / num_kv_heads;
  const int kvh = bh - b * num_kv_heads;
  const int seq_len = seq_lens[b];
  const int lo = split * split_tokens;
  if (lo >= seq_len) return;  // an empty split: the combine never reads it
  const int hi = min(seq_len, lo + split_tokens);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int dl = lane % TPK;            // this lane's 8 dims: [dl * 8, dl * 8 + 8)
  const int slot = warp * SPW + lane / TPK;

  // q, pre-scaled by scale * log2(e) * k_scale; heads past the group are zero (never stored)
  float qf[GP][8];
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    if (g < group) {
      load_q8(q + b * stride_qb + (int64_t)(kvh * group + g) * stride_qh + dl * 8, qf[g]);
#pragma unroll
      for (int e = 0; e < 8; ++e) qf[g][e] *= q_scale;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) qf[g][e] = 0.f;
    }
  }

  float acc[GP][8], m[GP], l[GP];
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }

  const int* bt_row = block_tables + b * stride_bt;
  const C* k_head = kc + kvh * stride_kh + dl * 8;
  const C* v_head = vc + kvh * stride_vh + dl * 8;

  for (int base = lo + slot * KPT; base - slot * KPT < hi; base += STEP) {
    // this slot's KPT keys: base .. base + KPT - 1, all in one page (page % KPT == 0)
    CT kr[KPT], vr[KPT];
    if (base < hi) {
      const int64_t blk = bt_row[base / page];
      const int off = base % page;
      const C* kp = k_head + blk * stride_kb + off * stride_kt;
      const C* vp = v_head + blk * stride_vb + off * stride_vt;
#pragma unroll
      for (int k = 0; k < KPT; ++k) {
        if (base + k < hi) {
          kr[k] = __ldg(reinterpret_cast<const CT*>(kp + k * stride_kt));
          vr[k] = __ldg(reinterpret_cast<const CT*>(vp + k * stride_vt));
        } else {  // past the end: never read (the slot may hold NaN)
          kr[k] = CT{};
          vr[k] = CT{};
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < KPT; ++k) {
        kr[k] = CT{};
        vr[k] = CT{};
      }
    }

    float s[GP][KPT];
#pragma unroll
    for (int k = 0; k < KPT; ++k) {
      float kf[8];
      to_float8(kr[k], kf, C());
#pragma unroll
      for (int g = 0; g < GP; ++g) {
        float x = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) x = fmaf(qf[g][e], kf[e], x);
        s[g][k] = x;
      }
    }
#pragma unroll
    for (int off = TPK / 2; off > 0; off >>= 1) {
#pragma unroll
      for (int g = 0; g < GP; ++g)
#pragma unroll
        for (int k = 0; k < KPT; ++k) s[g][k] += __shfl_xor_sync(0xffffffffu, s[g][k], off);
    }

    float p[GP][KPT];
#pragma unroll
    for (int g = 0; g < GP; ++g) {
      float mx = -INFINITY;
#pragma unroll
      for (int k = 0; k < KPT; ++k) {
        if (base + k >= hi) s[g][k] = -INFINITY;
        mx = fmaxf(mx, s[g][k]);
      }
      const float m_new = fmaxf(m[g], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: no NaN
      const float alpha = fast_exp2(m[g] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < KPT; ++k) {
        p[g][k] = fast_exp2(s[g][k] - m_use);
        sum += p[g][k];
      }
      l[g] = l[g] * alpha + sum;
      m[g] = m_new;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= alpha;
    }
#pragma unroll
    for (int k = 0; k < KPT; ++k) {
      float vf[8];
      to_float8(vr[k], vf, C());
#pragma unroll
      for (int g = 0; g < GP; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(p[g][k], vf[e], acc[g][e]);
    }
  }

  // merge the slots of a warp (lanes dl, dl + TPK, ... hold the same dims)
#pragma unroll
  for (int off = TPK; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < GP; ++g) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[g], off);
      const float m_new = fmaxf(m[g], m_o);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float a = fast_exp2(m[g] - m_use), c = fast_exp2(m_o - m_use);
      l[g] = l[g] * a + l_o * c;
      m[g] = m_new;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float acc_o = __shfl_xor_sync(0xffffffffu, acc[g][e], off);
        acc[g][e] = acc[g][e] * a + acc_o * c;
      }
    }
  }
  // then the warps, through shared memory
  if (lane < TPK) {
#pragma unroll
    for (int g = 0; g < GP; ++g) {
#pragma unroll
      for (int e = 0; e < 8; ++e) sm_acc[warp][g][dl * 8 + e] = acc[g][e];
      if (lane == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();
  merge_warps_and_store<T, D, GP>(sm_acc, sm_m, sm_l, b, kvh, split, group, num_kv_heads, num_splits, batch,
                                  v_scale, out, stride_ob, stride_oh, part_acc, part_ml);
}

// Merge the splits of one (sequence, head): one CTA of D threads, thread d owns dim d.
template <typename T, int D>
__global__ void __launch_bounds__(D) paged_decode_combine_kernel(
    const float* __restrict__ part_acc, const float* __restrict__ part_ml,
    const int* __restrict__ seq_lens, T* __restrict__ out, int64_t stride_ob, int64_t stride_oh,
    int batch, int num_heads, int split_tokens, int num_splits, float v_scale) {
  const int b = blockIdx.x / num_heads, h = blockIdx.x - b * num_heads;
  const int d = threadIdx.x;
  const int n = min(num_splits, (seq_lens[b] + split_tokens - 1) / split_tokens);
  const int64_t row0 = (int64_t)blockIdx.x * num_splits;
  const float* pm = part_ml + row0;
  const float* pl = part_ml + (int64_t)batch * num_heads * num_splits + row0;
  float mx = -INFINITY;
  for (int s = 0; s < n; ++s) mx = fmaxf(mx, pm[s]);
  const float m_use = mx == -INFINITY ? 0.f : mx;
  float num = 0.f, den = 0.f;
  for (int s = 0; s < n; ++s) {
    const float c = fast_exp2(pm[s] - m_use);
    num += part_acc[(row0 + s) * D + d] * c;
    den += pl[s] * c;
  }
  const float o = den > 0.f ? num * (v_scale / den) : 0.f;
  out[b * stride_ob + h * stride_oh + d] = tk::from_float<T>(o);
}

// ---------------------------------------------------------------------------------------------
// Variant 2: the dot products on tensor cores (mma.sync m16n8k16, fp32 accumulate).
//
// A warp takes 16 keys per step. Lane (g = lane / 4, t = lane % 4) holds query head g (rows
// 8..15 of the 16-row MMA tile are zero: up to 8 heads per kv head).
// QK: S[8 heads, 8 keys] per n-tile. The reduction index is permuted so that every fragment is
// a plain load: lane t owns head dims [t * D/4, (t+1) * D/4); virtual k index 2t, 2t+1 of
// chunk c is dims t * D/4 + 4c + {0, 1} and 2t + 8, 2t + 9 is + {2, 3}, the same for q (A)
// and K (B), so lane (g, t) loads key g's D/4 dims with 16-byte loads and q's A fragment is
// its own D/4 dims of head g.
// PV: O[8 heads, 8 dims] per n-tile, P (A) straight from the S accumulators (the usual
// C-to-A fragment identity). V (B) needs two keys of one dim per register: lane (g, t) loads
// keys 2t, 2t + 1, 2t + 8, 2t + 9 at dims 64h + 8g .. 64h + 8g + 7 (16 bytes each) and packs
// the pairs with byte permutes; n-tile (h, e) is the dims 64h + 8n + e, n = 0..7.
// FP8 pages are converted pairwise to fp16 (one cvt per fragment register) and the MMAs run
// in fp16 with q pre-scaled; bf16/fp16 pages run in their own type and S is scaled in fp32.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void mma16816(float& d0, float& d1, uint32_t a0, uint32_t a2, uint32_t b0,
                                         uint32_t b1, float c0, float c1, __nv_bfloat16) {
  float x0 = c0, x1 = c1, x2 = 0.f, x3 = 0.f;  // rows 8..15 (x2, x3): zero query rows, unused
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(x0), "+f"(x1), "+f"(x2), "+f"(x3)
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
  d0 = x0;
  d1 = x1;
}
__device__ __forceinline__ void mma16816(float& d0, float& d1, uint32_t a0, uint32_t a2, uint32_t b0,
                                         uint32_t b1, float c0, float c1, __half) {
  float x0 = c0, x1 = c1, x2 = 0.f, x3 = 0.f;  // rows 8..15 (x2, x3): zero query rows, unused
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(x0), "+f"(x1), "+f"(x2), "+f"(x3)
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
  d0 = x0;
  d1 = x1;
}

__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ float2 unpack2(uint32_t w, __nv_bfloat16) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&w));
}
__device__ __forceinline__ float2 unpack2(uint32_t w, __half) {
  return __half22float2(*reinterpret_cast<__half2*>(&w));
}
// two e4m3 (low byte first) -> fp16x2 (low half first)
__device__ __forceinline__ uint32_t e4m3x2_to_h2(uint32_t v) {
  __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(v & 0xffffu), __NV_E4M3);
  return (uint32_t)r.x | ((uint32_t)r.y << 16);
}

// CTAs per SM the launch bounds ask for: 16-bit pages at D 128 need ~170 registers (2 per SM,
// 64 KB of loads in flight); fp8 pages or D 64 fit 3.
template <typename C, int D> struct MmaMinBlocks { static constexpr int value = (sizeof(C) == 2 && D == 128) ? 2 : 3; };

template <typename T, typename C, int D>
__global__ void __launch_bounds__(kNW * 32, (MmaMinBlocks<C, D>::value)) paged_decode_mma_kernel(
    const T* __restrict__ q, const C* __restrict__ kc, const C* __restrict__ vc,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens, T* __restrict__ out,
    float* __restrict__ part_acc, float* __restrict__ part_ml, int64_t stride_qb, int64_t stride_qh,
    int64_t stride_kb, int64_t stride_kh, int64_t stride_kt, int64_t stride_vb, int64_t stride_vh,
    int64_t stride_vt, int64_t stride_bt, int64_t stride_ob, int64_t stride_oh, int batch,
    int num_kv_heads, int group, int page, int split_tokens, int num_splits, float q_scale,
    float v_scale) {
  constexpr bool kFp8 = sizeof(C) == 1;
  // the MMA input type: fp16 for fp8 pages (one cvt per pair), else the cache's own
  using MT = typename std::conditional<!kFp8 && std::is_same<T, __nv_bfloat16>::value, __nv_bfloat16,
                                       __half>::type;
  using VT = typename Chunk<C>::type;              // 8 elements of a V row
  constexpr int KW = 16;                           // keys per warp and step
  constexpr int STEP = kNW * KW;                   // keys per CTA step
  constexpr int NC = D / 16;                       // QK k-chunks
  constexpr int KU = D / 4 * (int)sizeof(C) / 16;  // 16-byte pieces of a lane's K dims
  constexpr int NH = D / 64;                       // 64-dim halves (PV n-tiles: NH x 8)
  constexpr int GP = 8;
  static_assert(D == 64 || D == 128, "head dim must be 64 or 128");

  __shared__ float sm_acc[kNW][GP][D];
  __shared__ float sm_m[kNW][GP];
  __shared__ float sm_l[kNW][GP];

  const int bh = blockIdx.x;
  const int split = blockIdx.y;
  const int b = bh / num_kv_heads;
  const int kvh = bh - b * num_kv_heads;
  const int seq_len = seq_lens[b];
  const int lo = split * split_tokens;
  if (lo >= seq_len) return;
  const int hi = min(seq_len, lo + split_tokens);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  // q's A fragments: head g, dims t * D/4 + 4c + {0,1} (qa[c][0]) and + {2,3} (qa[c][1])
  uint32_t qa[NC][2];
  if (g < group) {
    const T* qp = q + b * stride_qb + (int64_t)(kvh * group + g) * stride_qh + t * (D / 4);
    uint4 raw[D / 32];
#pragma unroll
    for (int i = 0; i < D / 32; ++i) raw[i] = *reinterpret_cast<const uint4*>(qp + 8 * i);
    const uint32_t* w = reinterpret_cast<const uint32_t*>(raw);
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if constexpr (kFp8) {  // fp16 MMAs: fold the whole score scale into q
          const float2 x = unpack2(w[2 * c + j], T());
          qa[c][j] = pack2(x.x * q_scale, x.y * q_scale, __half());
        } else {
          qa[c][j] = w[2 * c + j];
        }
      }
  } else {
#pragma unroll
    for (int c = 0; c < NC; ++c) qa[c][0] = qa[c][1] = 0u;
  }
  const float s_scale = kFp8 ? 1.f : q_scale;

  float acc[NH][8][2];
#pragma unroll
  for (int h = 0; h < NH; ++h)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[h][e][0] = acc[h][e][1] = 0.f;
  float m = -INFINITY, l = 0.f;  // row g's running max and this lane's share of the sum

  const int* bt_row = block_tables + b * stride_bt;
  const C* k_head = kc + kvh * stride_kh + t * (D / 4);
  const C* v_head = vc + kvh * stride_vh + g * 8;
  const int vkey[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};

  for (int base = lo + warp * KW; base - warp * KW < hi; base += STEP) {
    uint4 kr[2][KU];
    VT vr[4][NH];
    if (base < hi) {  // 16 keys in one page (page % 16 == 0, base % 16 == 0)
      const int64_t blk = bt_row[base / page];
      const int off = base % page;
      const C* kp = k_head + blk * stride_kb + off * stride_kt;
      const C* vp = v_head + blk * stride_vb + off * stride_vt;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool ok = base + 8 * j + g < hi;  // past the end: never read (may be NaN)
#pragma unroll
        for (int u = 0; u < KU; ++u)
          kr[j][u] = ok ? __ldg(reinterpret_cast<const uint4*>(kp + (8 * j + g) * stride_kt) + u) : uint4{};
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const bool ok = base + vkey[r] < hi;
#pragma unroll
        for (int h = 0; h < NH; ++h)
          vr[r][h] = ok ? __ldg(reinterpret_cast<const VT*>(vp + vkey[r] * stride_vt + 64 * h)) : VT{};
      }
    } else {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int u = 0; u < KU; ++u) kr[j][u] = uint4{};
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int h = 0; h < NH; ++h) vr[r][h] = VT{};
    }

    // S = q K^T for keys base + 8j + 2t + {0, 1}
    float s[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const uint32_t* w = reinterpret_cast<const uint32_t*>(kr[j]);
      float c0 = 0.f, c1 = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        uint32_t b0, b1;
        if constexpr (kFp8) {
          b0 = e4m3x2_to_h2(w[c]);
          b1 = e4m3x2_to_h2(w[c] >> 16);
        } else {
          b0 = w[2 * c];
          b1 = w[2 * c + 1];
        }
        mma16816(c0, c1, qa[c][0], qa[c][1], b0, b1, c0, c1, MT());
      }
      s[j][0] = c0 * s_scale;
      s[j][1] = c1 * s_scale;
    }
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (base + 8 * j + 2 * t + i >= hi) s[j][i] = -INFINITY;
        mx = fmaxf(mx, s[j][i]);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m, mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = fast_exp2(m - m_use);
    float p[2][2], sum = 0.f;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        p[j][i] = fast_exp2(s[j][i] - m_use);
        sum += p[j][i];
      }
    l = l * alpha + sum;
    m = m_new;

    // O += P V: P's A fragment is S's accumulator layout (keys 2t, 2t+1 | 2t+8, 2t+9)
    const uint32_t pa0 = pack2(p[0][0], p[0][1], MT()), pa2 = pack2(p[1][0], p[1][1], MT());
#pragma unroll
    for (int h = 0; h < NH; ++h) {
      const uint32_t* v0 = reinterpret_cast<const uint32_t*>(&vr[0][h]);
      const uint32_t* v1 = reinterpret_cast<const uint32_t*>(&vr[1][h]);
      const uint32_t* v2 = reinterpret_cast<const uint32_t*>(&vr[2][h]);
      const uint32_t* v3 = reinterpret_cast<const uint32_t*>(&vr[3][h]);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        uint32_t b0, b1;
        if constexpr (kFp8) {  // byte e of each row: (row 2t, row 2t+1) -> one fp16x2
          const uint32_t sel = (uint32_t)(e % 4) | ((uint32_t)(4 + e % 4) << 4);
          b0 = e4m3x2_to_h2(__byte_perm(v0[e / 4], v1[e / 4], sel));
          b1 = e4m3x2_to_h2(__byte_perm(v2[e / 4], v3[e / 4], sel));
        } else {  // half e of each row
          const uint32_t sel = (e % 2) ? 0x7632u : 0x5410u;
          b0 = __byte_perm(v0[e / 2], v1[e / 2], sel);
          b1 = __byte_perm(v2[e / 2], v3[e / 2], sel);
        }
        mma16816(acc[h][e][0], acc[h][e][1], pa0, pa2, b0, b1, acc[h][e][0] * alpha,
                 acc[h][e][1] * alpha, MT());
      }
    }
  }

  // row g: the four lanes' shares of the sum; then the warps through shared memory
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
#pragma unroll
  for (int h = 0; h < NH; ++h)
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      sm_acc[warp][g][64 * h + 8 * (2 * t) + e] = acc[h][e][0];
      sm_acc[warp][g][64 * h + 8 * (2 * t + 1) + e] = acc[h][e][1];
    }
  if (t == 0) {
    sm_m[warp][g] = m;
    sm_l[warp][g] = l;
  }
  __syncthreads();
  merge_warps_and_store<T, D, GP>(sm_acc, sm_m, sm_l, b, kvh, split, group, num_kv_heads, num_splits, batch,
                                  v_scale, out, stride_ob, stride_oh, part_acc, part_ml);
}

template <typename T, typename C, int D>
int launch_decode_mma(const void* q, const void* kc, const void* vc, const int* bt, const int* sl,
                      void* out, float* part_acc, float* part_ml, const int64_t* strides, int batch,
                      int num_kv_heads, int group, int page, int split_tokens, int num_splits,
                      float q_scale, float v_scale, cudaStream_t stream) {
  if (page % 16 || split_tokens % (kNW * 16) || group > 8) return (int)cudaErrorInvalidValue;
  dim3 grid(batch * num_kv_heads, num_splits);
  paged_decode_mma_kernel<T, C, D><<<grid, kNW * 32, 0, stream>>>(
      (const T*)q, (const C*)kc, (const C*)vc, bt, sl, (T*)out, part_acc, part_ml, strides[0],
      strides[1], strides[2], strides[3], strides[4], strides[5], strides[6], strides[7],
      strides[8], strides[9], strides[10], batch, num_kv_heads, group, page, split_tokens,
      num_splits, q_scale, v_scale);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || num_splits == 1) return (int)err;
  paged_decode_combine_kernel<T, D><<<batch * num_kv_heads * group, D, 0, stream>>>(
      part_acc, part_ml, sl, (T*)out, strides[9], strides[10], batch, num_kv_heads * group,
      split_tokens, num_splits, v_scale);
  return (int)cudaGetLastError();
}

// Keys per slot and step (KPT) and the CTAs per SM the launch bounds ask for (MINB), per
// padded group GP. q and the accumulator take 16 registers per head; each key in flight 8
// (16-bit cache) or 4 (fp8). (V = 1, half the keys per step and one more CTA per SM, measured
// the same on H100 (.device/F-1) and was dropped; the parameter stays for tuning.)
template <int GP, int V> struct Tile {
  static constexpr int KPT0 = GP >= 8 ? 2 : 4, MINB0 = GP >= 8 ? 2 : GP >= 4 ? 3 : 4;
  static constexpr int KPT = V ? KPT0 / 2 : KPT0, MINB = V ? MINB0 + 1 : MINB0;
};

template <typename T, typename C, int D, int GP, int V>
int launch_decode(const void* q, const void* kc, const void* vc, const int* bt, const int* sl,
                  void* out, float* part_acc, float* part_ml, const int64_t* strides, int batch,
                  int num_kv_heads, int group, int page, int split_tokens, int num_splits,
                  float q_scale, float v_scale, cudaStream_t stream) {
  constexpr int KPT = Tile<GP, V>::KPT, MINB = Tile<GP, V>::MINB;
  if (page % KPT || split_tokens % (kNW * (32 / (D / 8)) * KPT)) return (int)cudaErrorInvalidValue;
  dim3 grid(batch * num_kv_heads, num_splits);
  paged_decode_kernel<T, C, D, GP, KPT, MINB><<<grid, kNW * 32, 0, stream>>>(
      (const T*)q, (const C*)kc, (const C*)vc, bt, sl, (T*)out, part_acc, part_ml, strides[0],
      strides[1], strides[2], strides[3], strides[4], strides[5], strides[6], strides[7],
      strides[8], strides[9], strides[10], batch, num_kv_heads, group, page, split_tokens,
      num_splits, q_scale, v_scale);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || num_splits == 1) return (int)err;
  paged_decode_combine_kernel<T, D><<<batch * num_kv_heads * group, D, 0, stream>>>(
      part_acc, part_ml, sl, (T*)out, strides[9], strides[10], batch, num_kv_heads * group,
      split_tokens, num_splits, v_scale);
  return (int)cudaGetLastError();
}

template <typename T, typename C, int D, int V>
int dispatch_group(int gp, const void* q, const void* kc, const void* vc, const int* bt,
                   const int* sl, void* out, float* pa, float* pml, const int64_t* st, int batch,
                   int hkv, int group, int page, int split_tokens, int num_splits, float qs,
                   float vs, cudaStream_t stream) {
  switch (gp) {
    case 1: return launch_decode<T, C, D, 1, V>(q, kc, vc, bt, sl, out, pa, pml, st, batch, hkv, group, page, split_tokens, num_splits, qs, vs, stream);
    case 2: return launch_decode<T, C, D, 2, V>(q, kc, vc, bt, sl, out, pa, pml, st, batch, hkv, group, page, split_tokens, num_splits, qs, vs, stream);
    case 4: return launch_decode<T, C, D, 4, V>(q, kc, vc, bt, sl, out, pa, pml, st, batch, hkv, group, page, split_tokens, num_splits, qs, vs, stream);
    case 8: return launch_decode<T, C, D, 8, V>(q, kc, vc, bt, sl, out, pa, pml, st, batch, hkv, group, page, split_tokens, num_splits, qs, vs, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

template <typename T, typename C>
int dispatch_dim(int head_dim, int variant, int gp, const void* q, const void* kc, const void* vc,
                 const int* bt, const int* sl, void* out, float* pa, float* pml,
                 const int64_t* st, int batch, int hkv, int group, int page, int split_tokens,
                 int num_splits, float qs, float vs, cudaStream_t stream) {
  if (variant == 2) {  // tensor cores, any group up to 8
    if (head_dim == 64) return launch_decode_mma<T, C, 64>(q, kc, vc, bt, sl, out, pa, pml, st, batch, hkv, group, page, split_tokens, num_splits, qs, vs, stream);
    if (head_dim == 128) return launch_decode_mma<T, C, 128>(q, kc, vc, bt, sl, out, pa, pml, st, batch, hkv, group, page, split_tokens, num_splits, qs, vs, stream);
    return (int)cudaErrorInvalidValue;
  }
  if (variant != 0) return (int)cudaErrorInvalidValue;
  switch (head_dim) {
    case 64: return dispatch_group<T, C, 64, 0>(gp, q, kc, vc, bt, sl, out, pa, pml, st, batch, hkv, group, page, split_tokens, num_splits, qs, vs, stream);
    case 128: return dispatch_group<T, C, 128, 0>(gp, q, kc, vc, bt, sl, out, pa, pml, st, batch, hkv, group, page, split_tokens, num_splits, qs, vs, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace

// The keys one CTA step covers (split_tokens must be a multiple of it), or 0 if unsupported.
extern "C" int tk_paged_decode_step_tokens(int head_dim, int group_pad, int variant) {
  if (head_dim != 64 && head_dim != 128) return 0;
  if (variant == 2) return kNW * 16;
  if (variant != 0) return 0;
  const int kpt = group_pad >= 8 ? 2 : 4;  // Tile<GP, 0>::KPT
  return kNW * (32 / (head_dim / 8)) * kpt;
}

// CTAs of the decode kernel resident per SM on the current device (for the split heuristic),
// or a negative cudaError_t.
extern "C" int tk_paged_decode_occupancy(int q_dtype, int cache_fp8, int head_dim, int group_pad,
                                         int variant) {
  int n = 0;
  cudaError_t err = cudaErrorInvalidValue;
#define TK_OCC(T, C, D, GP, V)                                                                   \
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(                                         \
      &n, paged_decode_kernel<T, C, D, GP, Tile<GP, V>::KPT, Tile<GP, V>::MINB>, kNW * 32, 0)
#define TK_OCC_G(T, C, D, V)                      \
  switch (group_pad) {                            \
    case 1: TK_OCC(T, C, D, 1, V); break;         \
    case 2: TK_OCC(T, C, D, 2, V); break;         \
    case 4: TK_OCC(T, C, D, 4, V); break;         \
    case 8: TK_OCC(T, C, D, 8, V); break;         \
    default: return -(int)cudaErrorInvalidValue;  \
  }
#define TK_OCC_D(T, C)                                        \
  if (variant == 2 && head_dim == 64) {                       \
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(      \
        &n, paged_decode_mma_kernel<T, C, 64>, kNW * 32, 0);  \
  } else if (variant == 2 && head_dim == 128) {               \
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(      \
        &n, paged_decode_mma_kernel<T, C, 128>, kNW * 32, 0); \
  } else if (head_dim == 64) {                                \
    TK_OCC_G(T, C, 64, 0)                                     \
  } else if (head_dim == 128) {                               \
    TK_OCC_G(T, C, 128, 0)                                    \
  } else {                                                    \
    return -(int)cudaErrorInvalidValue;                       \
  }
  if (q_dtype == tk::kBFloat16 && cache_fp8) {
    TK_OCC_D(__nv_bfloat16, __nv_fp8_e4m3)
  } else if (q_dtype == tk::kBFloat16) {
    TK_OCC_D(__nv_bfloat16, __nv_bfloat16)
  } else if (q_dtype == tk::kFloat16 && cache_fp8) {
    TK_OCC_D(__half, __nv_fp8_e4m3)
  } else if (q_dtype == tk::kFloat16) {
    TK_OCC_D(__half, __half)
  } else {
    return -(int)cudaErrorInvalidValue;
  }
#undef TK_OCC_D
#undef TK_OCC_G
#undef TK_OCC
  return err == cudaSuccess ? n : -(int)err;
}

// q_dtype: tk::DType (fp16 or bf16); cache_fp8: 0 = cache in q's dtype, 1 = float8_e4m3fn.
// group_pad: a power of two in {1, 2, 4, 8}, >= group. variant: 0 the CUDA-core kernel, 2 the
// tensor-core kernel (pages a multiple of 16). strides (elements): q b, q h, k b, k h,
// k t, v b, v h, v t, block_tables row, out b, out h. q_scale = softmax scale * log2(e) *
// k_scale. part_acc / part_ml: the workspace (see the top of this file), unused when
// num_splits == 1. Returns a cudaError_t.
extern "C" int tk_paged_decode(const void* q, const void* k_cache, const void* v_cache,
                               const int* block_tables, const int* seq_lens, void* out,
                               float* part_acc, float* part_ml, const int64_t* strides, int q_dtype,
                               int cache_fp8, int head_dim, int group_pad, int variant, int batch,
                               int num_kv_heads, int group, int page, int split_tokens,
                               int num_splits, float q_scale, float v_scale, cudaStream_t stream) {
  if (batch == 0) return 0;
  if (group > group_pad || num_splits < 1) return (int)cudaErrorInvalidValue;
  if (q_dtype == tk::kBFloat16) {
    if (cache_fp8)
      return dispatch_dim<__nv_bfloat16, __nv_fp8_e4m3>(head_dim, variant, group_pad, q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_ml, strides, batch, num_kv_heads, group, page, split_tokens, num_splits, q_scale, v_scale, stream);
    return dispatch_dim<__nv_bfloat16, __nv_bfloat16>(head_dim, variant, group_pad, q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_ml, strides, batch, num_kv_heads, group, page, split_tokens, num_splits, q_scale, v_scale, stream);
  }
  if (q_dtype == tk::kFloat16) {
    if (cache_fp8)
      return dispatch_dim<__half, __nv_fp8_e4m3>(head_dim, variant, group_pad, q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_ml, strides, batch, num_kv_heads, group, page, split_tokens, num_splits, q_scale, v_scale, stream);
    return dispatch_dim<__half, __half>(head_dim, variant, group_pad, q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_ml, strides, batch, num_kv_heads, group, page, split_tokens, num_splits, q_scale, v_scale, stream);
  }
  return (int)cudaErrorInvalidValue;
}
