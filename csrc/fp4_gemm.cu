// FP4 weight-only GEMM for decode-sized batches (W4A16, bf16 activations, 1 to 64 tokens):
// out[M, N] = x[M, K] @ (e2m1 * scale * global)[N, K]^T, NVFP4 or MXFP4 weights in the packed
// layout of trtllm_kernels/fp4.py (byte j of a row: column j low nibble, column K/2 + j high).
//
// Why CUDA here: at a few tokens the GEMM is a stream of 4-bit weights, and the Triton kernel
// spent its time moving each dequantized tile through shared memory into the MMA operand
// layout (three barriers a step). Here every lane loads its weights straight from global
// memory into the registers mma.sync reads them from, with no shared memory on the way:
//
// - The weights are the MMA's A operand (m16n8k16: 16 weight rows x 8 tokens; 1-8 token
//   tiles, each step's weights dequantized once for all of them). A lane
//   (group g = lane / 4, q = lane % 4) owns rows g and g + 8 of each 16-row tile and, per
//   64-byte step of K, the 16 bytes [16q, 16q + 16) of those rows: one 16-byte load a row.
// - The order of K inside a dot product is free as long as both operands agree, so each lane's
//   16 bytes become its own k-slots of eight MMAs (four for the low nibbles, four for the
//   high ones) without any exchange between lanes; the activations are loaded in the same
//   order (16 contiguous columns a lane) and paired to match with two byte permutes.
// - A lane's 16 bytes are exactly one NVFP4 group (16 columns) of the low half and one of the
//   high half (half an MXFP4 group), so each register of weights has a single scale.
// - e2m1 -> bf16 is bit placement (three instructions a code pair, `e2m1x2` in fp4.cuh), and
//   the group's scale one bf16x2 multiply (NVFP4; MXFP4 two), exact (`kNVUnscale` in fp4.cuh).
// - The warps of a block split the K steps of the same rows (interleaved, so the block reads
//   contiguous bytes) and add their fp32 results through shared memory; a grid split of K
//   writes fp32 partials that the caller sums in order (deterministic).
#include "common.cuh"
#include "fp4.cuh"

namespace {

using tk::e2m1x2;
using tk::kNVUnscale;
using tk::load_stream;
using tk::scale_bf16x2;
using tk::scaled;

constexpr int kStepBytes = 64;  // bytes of each weight row a warp consumes per K step
constexpr int kMaxWarps = 8;

__device__ __forceinline__ void mma_bf16(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One K step's operands of a lane, loaded a step ahead of their use. The activations too while
// there are at most two 8-token tiles (measured faster); more would cost too many registers, so
// those are read when used (L1 hits: every block on an SM reads the same few rows of x).
template <int kMT, int kNT>
struct Step {
  static constexpr bool kXAhead = kNT <= 2;
  uint4 w[kMT][2];         // 16 bytes of rows g and g + 8 of each 16-row tile
  uint32_t s[kMT][2][2];  // raw scale bytes: [tile][row g, g + 8][low, high half]
  uint4 x[kXAhead ? kNT : 1][2][2];  // 16 activations of token g of each 8-token tile: [low, high][2 x 8]
};

template <bool kNV, int kMT, int kNT>
__global__ void __launch_bounds__(kMaxWarps * 32) fp4_gemm_small_m_kernel(
    const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w, const uint8_t* __restrict__ s,
    const float* __restrict__ gscale, __nv_bfloat16* __restrict__ out, float* __restrict__ partial, int M,
    int N, int half, int64_t stride_x, int64_t stride_w, int64_t stride_s, int64_t stride_o,
    int steps_per_split) {
  constexpr int kGroup = kNV ? 16 : 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int row0 = blockIdx.x * 16 * kMT;
  const int steps = half / kStepBytes;
  const int first = blockIdx.y * steps_per_split;
  const int last = min(steps, first + steps_per_split);

  // this lane's rows (past N: re-read row N - 1, never stored) and tokens (past M: token M - 1)
  int wrow[kMT][2], srow[kMT][2];  // offsets (w and s are at most 2^31 bytes: checked by the caller)
#pragma unroll
  for (int t = 0; t < kMT; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = min(row0 + 16 * t + 8 * h + g, N - 1);
      wrow[t][h] = r * (int)stride_w + 16 * q;
      srow[t][h] = r * (int)stride_s;
    }
  const __nv_bfloat16* xrow[kNT];
#pragma unroll
  for (int u = 0; u < kNT; ++u) xrow[u] = x + min(8 * u + g, M - 1) * stride_x + 16 * q;
  const int half_groups = half / kGroup;  // scale columns of the low half

  auto load_x = [&](int off, int u, int hf, uint4* xv) {
    const uint4* p = reinterpret_cast<const uint4*>(xrow[u] + hf * half + off);
    xv[0] = __ldg(p);
    xv[1] = __ldg(p + 1);
  };
  using St = Step<kMT, kNT>;
  constexpr bool kXAhead = St::kXAhead;
  auto load = [&](int step, St& st) {
    const int off = step * kStepBytes;  // byte (= low-half column) offset of this step
    const int grp = (off + 16 * q) / kGroup;
#pragma unroll
    for (int t = 0; t < kMT; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        st.w[t][h] = load_stream(w + wrow[t][h] + off);
        st.s[t][h][0] = __ldg(s + srow[t][h] + grp);
        st.s[t][h][1] = __ldg(s + srow[t][h] + half_groups + grp);
      }
    if constexpr (kXAhead)
#pragma unroll
      for (int u = 0; u < kNT; ++u)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) load_x(off, u, hf, st.x[u][hf]);
  };

  float acc[kMT][kNT][4] = {};
  // word j of a lane's 16 bytes of rows g and g + 8 of tile t -> the A fragments of its two
  // MMAs (low nibbles: bytes (0, 2) and (1, 3) of the word; high nibbles the same, 4 bits up),
  // given the tile's multipliers sc (row g low, row g + 8 low, row g high, row g + 8 high)
  auto dequant = [&](const St& st, int t, int j, const uint32_t* sc, uint32_t* f) {
    const uint32_t ra = reinterpret_cast<const uint32_t*>(&st.w[t][0])[j];
    const uint32_t rb = reinterpret_cast<const uint32_t*>(&st.w[t][1])[j];
    const uint32_t ra8 = ra >> 8, rb8 = rb >> 8;  // bytes 1 and 3 down
    f[0] = scaled<kNV>(e2m1x2<0>(ra), sc[0]);
    f[1] = scaled<kNV>(e2m1x2<0>(rb), sc[1]);
    f[2] = scaled<kNV>(e2m1x2<0>(ra8), sc[0]);
    f[3] = scaled<kNV>(e2m1x2<0>(rb8), sc[1]);
    f[4] = scaled<kNV>(e2m1x2<4>(ra), sc[2]);
    f[5] = scaled<kNV>(e2m1x2<4>(rb), sc[3]);
    f[6] = scaled<kNV>(e2m1x2<4>(ra8), sc[2]);
    f[7] = scaled<kNV>(e2m1x2<4>(rb8), sc[3]);
  };
  auto scales = [&](const St& st, int t, uint32_t* sc) {
    sc[0] = scale_bf16x2<kNV>(st.s[t][0][0]);
    sc[1] = scale_bf16x2<kNV>(st.s[t][1][0]);
    sc[2] = scale_bf16x2<kNV>(st.s[t][0][1]);
    sc[3] = scale_bf16x2<kNV>(st.s[t][1][1]);
  };
  // The activations of token tile u, half hf, paired like the weights: for word j of a lane's
  // 16 columns, k-slots (2q, 2q + 1) hold columns (4j, 4j + 2), k-slots (2q + 8, 2q + 9)
  // columns (4j + 1, 4j + 3).
  auto pair_x = [&](const uint4* xv, uint32_t (*b)[2]) {
    const uint32_t* v = reinterpret_cast<const uint32_t*>(xv);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      b[j][0] = __byte_perm(v[2 * j], v[2 * j + 1], 0x5410);
      b[j][1] = __byte_perm(v[2 * j], v[2 * j + 1], 0x7632);
    }
  };
  auto compute = [&](int step, const St& st) {
    if constexpr (kXAhead) {  // few token tiles: all their fragments first, weights word by word
      uint32_t b[kNT][2][4][2];
#pragma unroll
      for (int u = 0; u < kNT; ++u)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) pair_x(st.x[u][hf], b[u][hf]);
#pragma unroll
      for (int t = 0; t < kMT; ++t) {
        uint32_t sc[4], f[8];
        scales(st, t, sc);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          dequant(st, t, j, sc, f);
#pragma unroll
          for (int u = 0; u < kNT; ++u) {
            mma_bf16(acc[t][u], f[0], f[1], f[2], f[3], b[u][0][j][0], b[u][0][j][1]);
            mma_bf16(acc[t][u], f[4], f[5], f[6], f[7], b[u][1][j][0], b[u][1][j][1]);
          }
        }
      }
    } else {  // many token tiles: the step's weights first, then one token tile at a time
      uint32_t a[kMT][4][8];
#pragma unroll
      for (int t = 0; t < kMT; ++t) {
        uint32_t sc[4];
        scales(st, t, sc);
#pragma unroll
        for (int j = 0; j < 4; ++j) dequant(st, t, j, sc, a[t][j]);
      }
#pragma unroll
      for (int u = 0; u < kNT; ++u)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          uint4 xv[2];
          load_x(step * kStepBytes, u, hf, xv);
          uint32_t b[4][2];
          pair_x(xv, b);
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int t = 0; t < kMT; ++t) {
              const uint32_t* f = a[t][j] + 4 * hf;
              mma_bf16(acc[t][u], f[0], f[1], f[2], f[3], b[j][0], b[j][1]);
            }
        }
    }
  };

  // this warp's steps, interleaved with the block's other warps (so a block reads contiguous
  // bytes of each row), each step's operands loaded while the previous one computes (deeper
  // rings of registers measured no faster: benchmarks/results/h100-2026-11-28/fp4_small_m)
  int step = first + warp;
  if (step < last) {
    St cur, nxt;
    load(step, cur);
    for (; step + warps < last; step += warps) {
      load(step + warps, nxt);
      compute(step, cur);
      cur = nxt;
    }
    compute(step, cur);
  }

  // add the warps' results (warp 0 keeps the sum), then store rows g, g + 8 x tokens 2q, 2q + 1
  __shared__ float red[kMaxWarps - 1][kMT * kNT * 4][32];
  if (warps > 1) {
    if (warp > 0) {
#pragma unroll
      for (int t = 0; t < kMT; ++t)
#pragma unroll
        for (int u = 0; u < kNT; ++u)
#pragma unroll
          for (int i = 0; i < 4; ++i) red[warp - 1][(t * kNT + u) * 4 + i][lane] = acc[t][u][i];
    }
    __syncthreads();
    if (warp > 0) return;
    for (int v = 0; v < warps - 1; ++v)
#pragma unroll
      for (int t = 0; t < kMT; ++t)
#pragma unroll
        for (int u = 0; u < kNT; ++u)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[t][u][i] += red[v][(t * kNT + u) * 4 + i][lane];
  }
  const float gs = (gscale ? *gscale : 1.f) * (kNV ? kNVUnscale : 1.f);
  float* part = partial ? partial + (int64_t)blockIdx.y * M * N : nullptr;
#pragma unroll
  for (int t = 0; t < kMT; ++t)
#pragma unroll
    for (int u = 0; u < kNT; ++u)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = row0 + 16 * t + g + 8 * (i >> 1), n = 8 * u + 2 * q + (i & 1);
        if (r >= N || n >= M) continue;
        if (part)
          part[(int64_t)n * N + r] = acc[t][u][i] * gs;
        else
          out[n * stride_o + r] = __float2bfloat16_rn(acc[t][u][i] * gs);
      }
}

template <bool kNV, int kMT>
int launch(const void* x, const void* w, const void* s, const float* g, void* out, float* partial, int M,
           int N, int half, int64_t stride_x, int64_t stride_w, int64_t stride_s, int64_t stride_o, int warps,
           int split, cudaStream_t stream) {
  const int steps = half / kStepBytes;
  const int per = (steps + split - 1) / split;
  const dim3 grid((N + 16 * kMT - 1) / (16 * kMT), split);
  auto run = [&](auto kernel) {
    kernel<<<grid, 32 * warps, 0, stream>>>((const __nv_bfloat16*)x, (const uint8_t*)w, (const uint8_t*)s, g,
                                           (__nv_bfloat16*)out, partial, M, N, half, stride_x, stride_w,
                                           stride_s, stride_o, per);
  };
  if (M <= 8)
    run(fp4_gemm_small_m_kernel<kNV, kMT, 1>);
  else if (M <= 16)
    run(fp4_gemm_small_m_kernel<kNV, kMT, 2>);
  else if (M <= 32)
    run(fp4_gemm_small_m_kernel<kNV, kMT, 4>);
  else
    run(fp4_gemm_small_m_kernel<kNV, kMT, 8>);
  return (int)cudaGetLastError();
}

}  // namespace

// x: bf16 [M, K] (row stride stride_x elements, 16-byte aligned rows); w: uint8 [N, half = K/2]
// packed codes; s: uint8 scale bytes [N, K / group] (e4m3 for NVFP4, e8m0 for MXFP4); g: the
// NVFP4 global scale (fp32, device) or null; out: bf16 [M, N] (row stride stride_o), or with
// split > 1, partial: fp32 [split, M, N] to be summed over the split. Needs 1 <= M <= 64,
// half % 64 == 0, w rows 16-byte aligned. tiles: 16-row weight tiles a block (1, 2 or 4);
// warps: warps a block (1..8) splitting its K steps. w and s must span less than 2^31 bytes.
extern "C" int tk_fp4_gemm_small_m(const void* x, const void* w, const void* s, const float* g, void* out,
                                   float* partial, int M, int N, int half, int64_t stride_x, int64_t stride_w,
                                   int64_t stride_s, int64_t stride_o, int nvfp4, int tiles, int warps,
                                   int split, cudaStream_t stream) {
  if (M < 1 || M > 64 || half % kStepBytes || warps < 1 || warps > kMaxWarps || split < 1 ||
      (split > 1 && !partial) || (int64_t)N * stride_w >= (1ll << 31) ||
      (int64_t)N * stride_s >= (1ll << 31))
    return (int)cudaErrorInvalidValue;
#define TK_FP4_LAUNCH(NV, MT)                                                                           \
  return launch<NV, MT>(x, w, s, g, out, partial, M, N, half, stride_x, stride_w, stride_s, stride_o, \
                        warps, split, stream)
  switch (tiles * 2 + (nvfp4 ? 1 : 0)) {
    case 3: TK_FP4_LAUNCH(true, 1);
    case 2: TK_FP4_LAUNCH(false, 1);
    case 5: TK_FP4_LAUNCH(true, 2);
    case 4: TK_FP4_LAUNCH(false, 2);
    case 9: TK_FP4_LAUNCH(true, 4);
    case 8: TK_FP4_LAUNCH(false, 4);
    default: return (int)cudaErrorInvalidValue;
  }
#undef TK_FP4_LAUNCH
}
