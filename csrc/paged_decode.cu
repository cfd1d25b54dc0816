// Paged decode attention (one query token per sequence) over the HND paged KV cache: the CUDA
// C++ twin of trtllm_kernels/kernels/triton_attention.py's decode kernel, in two kernels:
//   variant 0  paged_decode_kernel      dot products on CUDA cores (any page a multiple of 4);
//   variant 2  paged_decode_mma_kernel  dot products on tensor cores (mma.sync m16n8k16, fp32
//                                       accumulate; pages a power of two of 16+), a warp per
//                                       program, described below.
// Both share the split-KV combine kernel and the workspace layout.
// Variant 2 on H200 (benchmarks/decode_sweep.py --cuda, 32/8 heads, D 128, CUDA graphs), us
// against the Triton kernel: FP8 pages B1024 x 128 78.8 / 105.4, B256 x 512 80.0 / 94.9,
// B512 x 1536 (pages of 32) 382.7 / 451.8 (1.00 of copy bandwidth), B64 x 4096 141.6 / 186.1;
// at D 64 0.54-0.77x Triton's time; bf16 pages within 4% of Triton. Its loop is ~12
// instructions per key and warp (ptxas, sm_90a) against ~46 for Triton's FP8 tiles, which load
// V byte by byte to pair keys for the MMA. The op dispatches FP8 pages at D 64 and 128 to it
// (triton_attention.cuda_decode_preferred). Variant 0 is bound by its CUDA-core work (shuffle
// reductions, redundant softmax: ~75 instructions per key and warp) and only serves pages
// variant 2 does not take, when asked for.
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

// The end of the CUDA-core kernel (variant 0): merge the kNW warps' softmax states of one
// (sequence, kv head) from shared memory, then write the group's outputs (one split) or this
// split's unnormalized sums, max and denominator for the combine kernel (several).
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
// Variant 2: the dot products on tensor cores (mma.sync m16n8k16, fp32 accumulate), one warp
// per (sequence, kv head, KV split), its next K/V step loaded while it computes the current one.
//
// A warp is a program of its own (a CTA holds 4 of them, nothing shared): no cross-warp merge,
// and a short context is still streamed by one warp step after step, not cut in four. Split-KV
// fills the GPU where pairs are few. A step is 16 keys; up to 8 query heads per kv head.
// Both products are transposed, so that every MMA accumulator is a real (key or dim, head)
// pair and not a padding row; lane (g = lane / 4, t = lane % 4) accumulates heads 2t, 2t + 1.
// QK: S^T[16 keys, 8 heads] = K[16 keys, D] q^T, D/16 MMAs. The reduction index is permuted so
// that every fragment is a plain load: lane t owns head dims [t * D/4, (t+1) * D/4); virtual k
// index 2t, 2t+1 of chunk c is dims t * D/4 + 4c + {0, 1} and 2t + 8, 2t + 9 is + {2, 3}, the
// same for K (A) and q (B), so lane (g, t) loads keys g and g + 8 as D/4 contiguous dims and
// q's B fragment is its own D/4 dims of head g. Each head's running max and sum over keys
// reduce across g (shuffles), so every lane holds those of its own two heads.
// PV: O^T[16 dims, 8 heads] += V^T[16 dims, 16 keys] P^T[16 keys, 8 heads] per m-tile e
// (e < D/16; row g of m-tile e is dim g * D/8 + 2e, row g + 8 the dim after it). P^T's B
// fragment (head g; keys 2t, 2t+1 | 2t+8, 2t+9) is the transpose of what S^T's accumulators
// hold (keys g | g + 8; heads 2t, 2t+1): one movmatrix each. V^T (A) needs two keys of one dim
// per register: lane (g, t) loads those four keys at dims g * D/8 .. (g+1) * D/8 - 1 (16 bytes
// for fp8 at D 128) and pairs them with byte permutes.
// FP8 pages are converted pairwise to fp16 (one cvt per fragment register) and the MMAs run
// in fp16 with q pre-scaled; bf16/fp16 pages run in their own type and S is scaled in fp32.
//
// Pipelining: a step's loads go to one of two register sets while the other one's math runs,
// and block ids are read one step further ahead, so each warp keeps a step (4 KB for fp8 at D
// 128) in flight without waiting on the block table. Every step but a program's last is whole;
// the last may run past seq_len inside its page (never past it: pages hold a multiple of 16
// keys), and there the scores are masked and V zeroed (unused slots may hold NaN).
// ---------------------------------------------------------------------------------------------

// d[0..3] += a b (m16n8k16, fp32 accumulators, A row-major, B column-major)
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1, __nv_bfloat16) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1, __half) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// the 8 x 8 16-bit matrix a warp holds as mma fragments (lane (g, t): row g, cols 2t, 2t+1),
// transposed in the same layout
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
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
// four e4m3 (low byte first) -> two fp16x2: bytes 0, 1 in lo and 2, 3 in hi (the cvt reads
// either half of the register in place, no shift)
__device__ __forceinline__ void e4m3x4_to_h2x2(uint32_t v, uint32_t& lo, uint32_t& hi) {
  asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n cvt.rn.f16x2.e4m3x2 %1, h;\n}"
      : "=r"(lo), "=r"(hi)
      : "r"(v));
}

// One warp step's K and V as lane (g, t) holds them (see above).
template <typename C, int D> struct MmaStep {
  static constexpr int KN = D / 4 * (int)sizeof(C) / 16;  // 16-byte pieces of a K row's D/4 dims
  static constexpr int VB = D / 8 * (int)sizeof(C);       // bytes of a V row's D/8 dims: 8, 16, 32
  using VT = typename std::conditional<VB >= 16, uint4, uint2>::type;
  static constexpr int VN = VB / (int)sizeof(VT);
  uint4 k[2][KN];  // keys g, g + 8
  VT v[4][VN];     // keys 2t, 2t + 1, 2t + 8, 2t + 9
};

// CTAs per SM the launch bounds ask for (ptxas, sm_90a, two steps of loads in registers):
// fp8 pages at D 128 need 148 registers (3 per SM; at 4 they spill), 16-bit pages at D 128 220
// (2), D 64 up to 124 (4).
template <typename C, int D> struct MmaMinBlocks {
  static constexpr int value = D == 64 ? 4 : sizeof(C) == 1 ? 3 : 2;
};

template <typename T, typename C, int D>
__global__ void __launch_bounds__(kNW * 32, (MmaMinBlocks<C, D>::value)) paged_decode_mma_kernel(
    const T* __restrict__ q, const C* __restrict__ kc, const C* __restrict__ vc,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens, T* __restrict__ out,
    float* __restrict__ part_acc, float* __restrict__ part_ml, int64_t stride_qb, int64_t stride_qh,
    int64_t stride_kb, int64_t stride_kh, int64_t stride_kt, int64_t stride_vb, int64_t stride_vh,
    int64_t stride_vt, int64_t stride_bt, int64_t stride_ob, int64_t stride_oh, int batch,
    int num_kv_heads, int group, int page_shift, int split_tokens, int num_splits, float q_scale,
    float v_scale) {
  constexpr bool kFp8 = sizeof(C) == 1;
  // the MMA input type: fp16 for fp8 pages (one cvt per pair), else the cache's own
  using MT = typename std::conditional<!kFp8 && std::is_same<T, __nv_bfloat16>::value, __nv_bfloat16,
                                       __half>::type;
  using Step = MmaStep<C, D>;
  constexpr int KW = 16;            // keys per step
  constexpr int NC = D / 16;        // QK k-chunks
  constexpr int NM = D / 16;        // PV m-tiles
  static_assert(D == 64 || D == 128, "head dim must be 64 or 128");

  // this warp's program: (sequence b, kv head, split), splits of one pair side by side
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int prog = blockIdx.x * kNW + warp;
  if (prog >= batch * num_kv_heads * num_splits) return;
  const int bh = prog / num_splits;
  const int split = prog - bh * num_splits;
  const int b = bh / num_kv_heads;
  const int kvh = bh - b * num_kv_heads;
  const int lo = split * split_tokens;
  const int* bt_row = block_tables + b * stride_bt;
  // the first block id is read beside seq_len (lo is inside the table: the split exists)
  const int64_t blk0 = bt_row[lo >> page_shift];
  const int seq_len = seq_lens[b];
  if (lo >= seq_len) return;
  const int hi = min(seq_len, lo + split_tokens);
  const int g = lane >> 2, t = lane & 3;
  const int page_mask = (1 << page_shift) - 1;

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

  float acc[NM][4];  // m-tile e: heads 2t, 2t+1 at dim g * D/8 + 2e, then at the dim after it
#pragma unroll
  for (int e = 0; e < NM; ++e) acc[e][0] = acc[e][1] = acc[e][2] = acc[e][3] = 0.f;
  // heads 2t, 2t + 1: running max and this lane's share of the sum
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  const C* k_lane = kc + kvh * stride_kh + g * stride_kt + t * (D / 4);
  const C* v_lane = vc + kvh * stride_vh + 2 * t * stride_vt + g * (D / 8);
  constexpr int kVRow[4] = {0, 1, 8, 9};  // V rows past the lane's first (key 2t)

  auto load = [&](Step& s, int64_t blk, int key0) {
    const int off = key0 & page_mask;
    const C* kp = k_lane + blk * stride_kb + off * stride_kt;
    const C* vp = v_lane + blk * stride_vb + off * stride_vt;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int u = 0; u < Step::KN; ++u)
        s.k[j][u] = __ldg(reinterpret_cast<const uint4*>(kp + 8 * j * stride_kt) + u);
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int u = 0; u < Step::VN; ++u)
        s.v[r][u] = __ldg(reinterpret_cast<const typename Step::VT*>(vp + kVRow[r] * stride_vt) + u);
  };

  // One step: S^T = K q^T, the online softmax, O^T += V^T P^T. kTail: the warp's last step,
  // which may run past seq_len (scores masked, V zeroed: unused slots may hold NaN).
  auto compute = [&](Step& st, int key0, auto tail) {
    constexpr bool kTail = decltype(tail)::value;
    // sc: (key g, head 2t), (key g, head 2t+1), (key g+8, head 2t), (key g+8, head 2t+1)
    float sc[4] = {0.f, 0.f, 0.f, 0.f};
    const uint32_t* w0 = reinterpret_cast<const uint32_t*>(st.k[0]);
    const uint32_t* w1 = reinterpret_cast<const uint32_t*>(st.k[1]);
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      uint32_t a0, a1, a2, a3;
      if constexpr (kFp8) {
        e4m3x4_to_h2x2(w0[c], a0, a2);
        e4m3x4_to_h2x2(w1[c], a1, a3);
      } else {
        a0 = w0[2 * c];
        a2 = w0[2 * c + 1];
        a1 = w1[2 * c];
        a3 = w1[2 * c + 1];
      }
      mma16816(sc, a0, a1, a2, a3, qa[c][0], qa[c][1], MT());
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) sc[i] *= s_scale;
    if constexpr (kTail) {
      if (key0 + g >= hi) sc[0] = sc[1] = -INFINITY;
      if (key0 + g + 8 >= hi) sc[2] = sc[3] = -INFINITY;
#pragma unroll
      for (int r = 0; r < 4; ++r)
        if (key0 + 2 * t + kVRow[r] >= hi)
#pragma unroll
          for (int u = 0; u < Step::VN; ++u) st.v[r][u] = typename Step::VT{};
    }
    // each head's max over the 16 keys: across g (lane bits 2..4)
    float mx0 = fmaxf(sc[0], sc[2]), mx1 = fmaxf(sc[1], sc[3]);
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
    }
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);  // finite: key0 < hi
    const float alpha0 = fast_exp2(m0 - n0), alpha1 = fast_exp2(m1 - n1);
    const float p0 = fast_exp2(sc[0] - n0), p1 = fast_exp2(sc[1] - n1);
    const float p2 = fast_exp2(sc[2] - n0), p3 = fast_exp2(sc[3] - n1);
    l0 = l0 * alpha0 + (p0 + p2);
    l1 = l1 * alpha1 + (p1 + p3);
    m0 = n0;
    m1 = n1;
    // P^T's B fragments (head g; keys 2t, 2t+1 | 2t+8, 2t+9): transposes of (key g; heads 2t,
    // 2t+1) and (key g+8; heads 2t, 2t+1) as 8 x 8 16-bit matrices
    const uint32_t pb0 = movmatrix_trans(pack2(p0, p1, MT())), pb1 = movmatrix_trans(pack2(p2, p3, MT()));
    const uint32_t* v0 = reinterpret_cast<const uint32_t*>(st.v[0]);
    const uint32_t* v1 = reinterpret_cast<const uint32_t*>(st.v[1]);
    const uint32_t* v2 = reinterpret_cast<const uint32_t*>(st.v[2]);
    const uint32_t* v3 = reinterpret_cast<const uint32_t*>(st.v[3]);
#pragma unroll
    for (int e = 0; e < NM; ++e) {
      uint32_t a0, a1, a2, a3;
      if constexpr (kFp8) {  // bytes 2e, 2e + 1 of rows (2t, 2t+1) and (2t+8, 2t+9)
        const uint32_t x = 2 * e % 4, sel = x | ((4 + x) << 4) | ((x + 1) << 8) | ((5 + x) << 12);
        e4m3x4_to_h2x2(__byte_perm(v0[e / 2], v1[e / 2], sel), a0, a1);
        e4m3x4_to_h2x2(__byte_perm(v2[e / 2], v3[e / 2], sel), a2, a3);
      } else {  // halves 2e, 2e + 1 (word e) of each row
        a0 = __byte_perm(v0[e], v1[e], 0x5410u);
        a1 = __byte_perm(v0[e], v1[e], 0x7632u);
        a2 = __byte_perm(v2[e], v3[e], 0x5410u);
        a3 = __byte_perm(v2[e], v3[e], 0x7632u);
      }
      acc[e][0] *= alpha0;
      acc[e][1] *= alpha1;
      acc[e][2] *= alpha0;
      acc[e][3] *= alpha1;
      mma16816(acc[e], a0, a1, a2, a3, pb0, pb1, MT());
    }
  };
  using Whole = std::integral_constant<bool, false>;
  using Tail = std::integral_constant<bool, true>;

  // The pipeline: load step base + KW (its block id read a step earlier) into `nxt` while
  // computing `cur`, a whole step; a tail step is computed at once. False when the warp is done.
  int base = lo;
  Step s0, s1;
  int64_t blk_next = 0;
  auto stage = [&](Step& cur, Step& nxt) {
    const int nb = base + KW;
    int64_t blk_after = 0;
    if (nb + KW < hi) blk_after = bt_row[(nb + KW) >> page_shift];
    if (nb < hi) load(nxt, blk_next, nb);
    compute(cur, base, Whole());
    base = nb;
    blk_next = blk_after;
    if (nb < hi && nb + KW > hi) {
      compute(nxt, nb, Tail());
      return false;
    }
    return nb < hi;
  };
  load(s0, blk0, base);
  if (base + KW < hi) blk_next = bt_row[(base + KW) >> page_shift];
  if (base + KW > hi) {
    compute(s0, base, Tail());
  } else {
    while (stage(s0, s1) && stage(s1, s0)) {
    }
  }

  // each head's sum over the lanes of its keys
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o);
  }
  // heads 2t, 2t + 1 at dims g * D/8 + 2e, + 1: the output, or this split's unnormalized sums
  // and (max, sum) for the combine kernel
  const int num_heads = num_kv_heads * group;
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    if (2 * t + x >= group) continue;
    const int h = kvh * group + 2 * t + x;
    if (num_splits == 1) {
      const float r = v_scale / (x ? l1 : l0);  // > 0: the split holds a key
      T* o = out + b * stride_ob + h * stride_oh + g * (D / 8);
#pragma unroll
      for (int e = 0; e < NM; ++e) {
        const uint32_t w = pack2(acc[e][x] * r, acc[e][2 + x] * r, T());
        *reinterpret_cast<uint32_t*>(o + 2 * e) = w;
      }
    } else {
      const int64_t row = ((int64_t)b * num_heads + h) * num_splits + split;
      float* pa = part_acc + row * D + g * (D / 8);
#pragma unroll
      for (int e = 0; e < NM; ++e) *reinterpret_cast<float2*>(pa + 2 * e) = make_float2(acc[e][x], acc[e][2 + x]);
      if (g == 0) {
        part_ml[row] = x ? m1 : m0;
        part_ml[(int64_t)batch * num_heads * num_splits + row] = x ? l1 : l0;
      }
    }
  }
}

template <typename T, typename C, int D>
int launch_decode_mma(const void* q, const void* kc, const void* vc, const int* bt, const int* sl,
                      void* out, float* part_acc, float* part_ml, const int64_t* strides, int batch,
                      int num_kv_heads, int group, int page, int split_tokens, int num_splits,
                      float q_scale, float v_scale, cudaStream_t stream) {
  // pages: a power of two of 16+ tokens (a warp step stays in one page; block ids by shift)
  if (page < 16 || (page & (page - 1)) || split_tokens % 16 || group > 8) return (int)cudaErrorInvalidValue;
  const int page_shift = __builtin_ctz((unsigned)page);
  const int grid = (batch * num_kv_heads * num_splits + kNW - 1) / kNW;  // a warp per program
  paged_decode_mma_kernel<T, C, D><<<grid, kNW * 32, 0, stream>>>(
      (const T*)q, (const C*)kc, (const C*)vc, bt, sl, (T*)out, part_acc, part_ml, strides[0],
      strides[1], strides[2], strides[3], strides[4], strides[5], strides[6], strides[7],
      strides[8], strides[9], strides[10], batch, num_kv_heads, group, page_shift, split_tokens,
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
  if (variant == 2) return 16;
  if (variant != 0) return 0;
  const int kpt = group_pad >= 8 ? 2 : 4;  // Tile<GP, 0>::KPT
  return kNW * (32 / (head_dim / 8)) * kpt;
}

// Programs of the decode kernel resident per SM on the current device (for the split
// heuristic): CTAs for variant 0, warps (kNW per CTA) for variant 2; or a negative cudaError_t.
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
  return err == cudaSuccess ? n * (variant == 2 ? kNW : 1) : -(int)err;
}

// q_dtype: tk::DType (fp16 or bf16); cache_fp8: 0 = cache in q's dtype, 1 = float8_e4m3fn.
// group_pad: a power of two in {1, 2, 4, 8}, >= group. variant: 0 the CUDA-core kernel, 2 the
// tensor-core kernel (pages a power of two of 16+). strides (elements): q b, q h, k b, k h,
// k t, v b, v h, v t, block_tables row, out b, out h. q_scale = softmax scale * log2(e) *
// k_scale. split_tokens: a multiple of tk_paged_decode_step_tokens; every split must start
// inside the block table (num_splits <= cdiv(max_blocks * page, split_tokens)): variant 2 reads
// a split's first block id before it knows whether the split holds tokens. part_acc / part_ml:
// the workspace (see the top of this file), unused when num_splits == 1. Returns a cudaError_t.
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
