// FP4 weight-only GEMM on Hopper's warpgroup MMA, for batches of 17-255 tokens (W4A16): out[M, N] =
// x[M, K] @ (e2m1 * scale * global)[N, K]^T, NVFP4 or MXFP4 weights in the packed layout of
// trtllm_kernels/fp4.py (byte j of a row: column j low nibble, K/2 + j high).
//
// Why: from ~16 tokens the mma.sync kernel (fp4_gemm.cu) is bound by its activation reads
// (every warp loads its own copy) and by mma.sync's rate; at 128 tokens the GEMM needs most of
// the tensor cores' bf16 rate. Here the output is computed transposed, out^T = W x^T, so the
// weights are wgmma's A operand, taken from registers where they are dequantized, and the
// activations are its B operand, copied once per block by TMA into shared memory:
//
// - A block is kWG warpgroups; each owns 64 weight rows (wgmma's M) and all kNT tokens of the
//   block's tile (wgmma's N). K advances in steps of 64 bytes of each row: low columns
//   [64s, 64s + 64) and high columns K/2 + [64s, 64s + 64), eight 16-column MMA chunks.
// - Activations (the permuted copy below): per step two TMA boxes of [kNT tokens, 64 columns]
//   (the low and the high columns) in a ring of kStages slots, 128-byte swizzled as wgmma reads
//   them; one thread issues them, `full` mbarriers say a slot landed, `empty` ones that every
//   warp's MMAs on it are done. Tokens past M come in as zeros from TMA's bounds check.
// - The order of K inside the dot product is free as long as both operands agree. A lane (group
//   g = lane / 4, q = lane % 4 of its warp's 16 rows) loads 16 bytes of rows g and g + 8 per step
//   (bytes 16q .. 16q + 15), two steps ahead, straight from global memory into registers, and uses
//   them as they are: word c of its bytes
//   is its register fragment of chunk c (low nibbles) and 4 + c (high nibbles), as in
//   fp4_gemm.cu. The activations are put in that K order instead, once per call, by
//   `permute_x_kernel` (a read and a write of x: 1.5-3% of gate_up's bytes at 64-128 tokens)
//   before TMA brings them in, so no lane trades weight bytes with another (a 4 x 4 transpose
//   of words in each lane quad took ~60 of a step's ~410 instructions before: ptxas, sm_90a).
// - Scales: a lane's 16 bytes of a row are one NVFP4 group (16 columns) of the low half and one
//   of the high half (half an MXFP4 group), so a lane converts 4 scales a step (rows g, g + 8 x
//   low, high), not 16; e2m1 -> bf16 by bit placement and the multiplies are exact
//   (`kNVUnscale` in fp4.cuh); the global scale multiplies the fp32 accumulators last.
// - Each step's eight MMAs go in two halves of four: a warpgroup dequantizes one half while the
//   other runs.
// - A K split over grid.y writes fp32 partials the caller sums in order (deterministic).
//
// What limits it: the instruction stream and its latencies. Before the permuted activations a warp
// spent ~330 instructions a step, most of them dequantizing, and with 8-16 warps an SM (registers)
// the schedulers issued 0.4-0.55 a cycle (H100, benchmarks/results/h100-2026-11-28/fp4_wgmma). Now
// ~310 (ptxas, NVFP4) and 13-19% less time at gate_up, 7-9% at down (H200, 32-128 tokens,
// benchmarks/results/h200-2026-11-28-fp4); the warps still wait half of the cycles, on loads,
// on the MMAs and on dependent arithmetic (Nsight Compute stall reasons, same folder).
//
// W4A8 (kA8, MXFP4 only; the section "W4A8" below): the same kernel on fp8 wgmma, x quantized per
// token to e4m3 by quantize_x_e4m3_kernel (in the fragments' K order) and each group's codes
// turned into e4m3 bytes by a table lookup with its power of two folded in: four MMAs a step and
// ~260 instructions (ptxas, 64 tokens x 4 warpgroups) against MXFP4 W4A16's ~347; H200 gate_up
// at 64 / 128 tokens 1.13x / 1.11x faster (benchmarks/results/h200-2026-11-29-w4a8).
#include <cuda.h>

#include <type_traits>

#include "common.cuh"
#include "fp4.cuh"

namespace {

using tk::e2m1x2;
using tk::kNVUnscale;
using tk::load_stream;
using tk::scale_bf16x2;
using tk::scaled;

constexpr int kStepBytes = 64;  // bytes of each weight row consumed per K step

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// --- mbarriers and TMA ---------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t phase) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(phase)
      : "memory");
}

// box [rows, 64 columns] of the tensor map at (column, row) -> shared memory, counted on bar
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, int col, int row, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_addr(dst)),
      "l"(map), "r"(col), "r"(row), "r"(smem_addr(bar))
      : "memory");
}

// --- wgmma ---------------------------------------------------------------------------------

// Shared-memory matrix descriptor of a K-major operand in 128-byte swizzled rows (8-row groups
// 1024 bytes apart); the start address may step by 32 bytes (16 bf16 of K) inside a row: adding
// bytes / 16 to the descriptor moves it (shared addresses < 2^18: no carry out of the field).
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  return (uint64_t)((smem_addr(p) & 0x3FFFF) >> 4) | (uint64_t)1 << 16 | (uint64_t)(1024 >> 4) << 32 |
         (uint64_t)1 << 62;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// wait until at most N committed groups of this warpgroup's MMAs are still running
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Keep a register's value where it is across an asynchronous wgmma that reads or writes it.
__device__ __forceinline__ void fence_reg(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }

#define TK_ACC8(d, o)                                                                                  \
  "+f"(d[o + 0]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]), "+f"(d[o + 5]), \
      "+f"(d[o + 6]), "+f"(d[o + 7])

// d[64 x kNT] += a (64 x 16 bf16, or 64 x 32 e4m3 with kE4M3; registers) * b (16 or 32 x kNT of the
// same type, shared memory, K-major)
template <int kNT, bool kE4M3>
__device__ __forceinline__ void wgmma(float* d, const uint32_t* a, uint64_t b);

// Both A types of one token tile: D the accumulator placeholders, AB those of A's registers and
// B's descriptor, then the accumulator constraints.
#define TK_WGMMA(NT, D, AB, ...)                                                                        \
  template <>                                                                                            \
  __device__ __forceinline__ void wgmma<NT, false>(float* d, const uint32_t* a, uint64_t b) {            \
    asm volatile("wgmma.mma_async.sync.aligned.m64n" #NT "k16.f32.bf16.bf16 {" D "}, " AB ", 1, 1, 1, 0;" \
                 : __VA_ARGS__                                                                           \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                                   \
  }                                                                                                      \
  template <>                                                                                            \
  __device__ __forceinline__ void wgmma<NT, true>(float* d, const uint32_t* a, uint64_t b) {             \
    asm volatile("wgmma.mma_async.sync.aligned.m64n" #NT "k32.f32.e4m3.e4m3 {" D "}, " AB ", 1, 1, 1;"    \
                 : __VA_ARGS__                                                                           \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                                   \
  }

TK_WGMMA(16, "%0, %1, %2, %3, %4, %5, %6, %7", "{%8, %9, %10, %11}, %12", TK_ACC8(d, 0))
TK_WGMMA(32, "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15",
         "{%16, %17, %18, %19}, %20", TK_ACC8(d, 0), TK_ACC8(d, 8))
TK_WGMMA(64,
         "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
         "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31",
         "{%32, %33, %34, %35}, %36", TK_ACC8(d, 0), TK_ACC8(d, 8), TK_ACC8(d, 16), TK_ACC8(d, 24))
TK_WGMMA(128,
         "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
         "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "
         "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "
         "%62, %63",
         "{%64, %65, %66, %67}, %68", TK_ACC8(d, 0), TK_ACC8(d, 8), TK_ACC8(d, 16), TK_ACC8(d, 24),
         TK_ACC8(d, 32), TK_ACC8(d, 40), TK_ACC8(d, 48), TK_ACC8(d, 56))
#undef TK_WGMMA
#undef TK_ACC8

// --- the weights of one step -----------------------------------------------------------------

// One step's raw weights of a lane: 16 bytes and the scale bytes of rows g and g + 8
struct Raw {
  uint4 w[2];
  uint32_t s[2][2];  // [row][low, high half]
};

// wp[h]: this lane's bytes of row h (g, g + 8) at step 0; sp[h][hf]: the scale byte of those
// bytes' low / high nibbles at step 0
template <bool kNV>
__device__ __forceinline__ void load_raw(Raw& r, const uint8_t* const* wp, const uint8_t* const (*sp)[2],
                                         int step) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    r.w[h] = load_stream(wp[h] + step * kStepBytes);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      r.s[h][hf] = __ldg(sp[h][hf] + (kNV ? 4 : 2) * step);  // group 4s + q (NVFP4), 2s + q / 2 (MX)
  }
}

// Half H of a step's fragments: chunks 2H, 2H + 1 (low nibbles of word c of each row's 16 bytes)
// and 4 + 2H, 5 + 2H (their high nibbles) -> a[j][0..3] (rows g / g + 8, k-slots 2q.. / 2q + 8..),
// j as `chunk_of`. w: the bytes of rows g and g + 8; m: their multipliers [row][low, high half].
template <bool kNV, int H>
__device__ __forceinline__ void dequant_half(const uint4* w, const uint32_t (*m)[2], uint32_t (*a)[4]) {
#pragma unroll
  for (int cc = 0; cc < 2; ++cc) {
    const int c = 2 * H + cc;
    const uint32_t w0 = reinterpret_cast<const uint32_t*>(&w[0])[c];  // row g
    const uint32_t w1 = reinterpret_cast<const uint32_t*>(&w[1])[c];  // row g + 8
    const uint32_t v0 = w0 >> 8, v1 = w1 >> 8;                        // bytes 1, 3 down
    a[cc][0] = scaled<kNV>(e2m1x2<0>(w0), m[0][0]);
    a[cc][1] = scaled<kNV>(e2m1x2<0>(w1), m[1][0]);
    a[cc][2] = scaled<kNV>(e2m1x2<0>(v0), m[0][0]);
    a[cc][3] = scaled<kNV>(e2m1x2<0>(v1), m[1][0]);
    a[2 + cc][0] = scaled<kNV>(e2m1x2<4>(w0), m[0][1]);
    a[2 + cc][1] = scaled<kNV>(e2m1x2<4>(w1), m[1][1]);
    a[2 + cc][2] = scaled<kNV>(e2m1x2<4>(v0), m[0][1]);
    a[2 + cc][3] = scaled<kNV>(e2m1x2<4>(v1), m[1][1]);
  }
}

// fragment j of half H -> its 16-column chunk of the step (0-3 low columns, 4-7 high)
__device__ __forceinline__ constexpr int chunk_of(int H, int j) { return (j < 2 ? 0 : 4) + 2 * H + j % 2; }

// --- W4A8: MXFP4 weights as e4m3 against fp8 activations ---------------------------------------
//
// A code times its group's scale 2^(e - 127) is e2m1 * 2^(e - E + 6) * 2^(E - 133), E the largest
// scale byte of the row in the block's K share. The first factor is an e4m3 value (at most
// 6 * 2^6 = 384), exact while e >= E - 14 (its smallest code, 0.5 * 2^-8, is e4m3's smallest
// subnormal) and rounded to nearest even below; the second multiplies the row's fp32 accumulators
// in the epilogue. Each (row, group) converts its codes through an 8-byte table of the e4m3 bytes
// of the magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6} x 2^(e - E + 6): entry i of the block's table is
// that for e - E = i - kLutTop (entries below 0 are clamped to entry 0, all zeros by then), entry
// kLutNaN (a NaN scale byte, 255) all NaN.
constexpr int kLutTop = 22, kLutNaN = 23, kLutEntries = 24;

__device__ __forceinline__ uint2 lut_entry(int i) {
  const float mags[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  uint32_t b[2] = {0, 0};
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float v = ldexpf(mags[c], i - kLutTop + 6);
    const uint32_t e = i == kLutNaN ? 0x7Fu : __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
    b[c / 4] |= e << (8 * (c % 4));
  }
  return make_uint2(b[0], b[1]);
}

// Four codes, in the high nibble of each byte of v -> their e4m3 bytes through the group's table,
// in the order of v's bytes 2, 0, 3, 1: their magnitudes become prmt's selector nibbles with one
// add (m >> 20 brings bytes 2, 3 down between bytes 0, 1; no bits overlap), and a second prmt
// replicates each byte's sign bit. Five instructions for four codes.
__device__ __forceinline__ uint32_t e2m1x4_e4m3(uint32_t v, uint2 lut) {
  const uint32_t m = v & 0x70707070u;
  const uint32_t sel = m + (m >> 20);
  uint32_t mag, sgn;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(mag) : "r"(lut.x), "r"(lut.y), "r"(sel));
  asm("prmt.b32 %0, %1, %1, 0x9B8A;" : "=r"(sgn) : "r"(v));
  return mag | (sgn & 0x80808080u);
}

// Half H of a step's W4A8 fragments: chunks 2H, 2H + 1 (32 k-slots each) from word c = 2H, 2H + 1
// of each row's 16 bytes: a[cc] = {row g, row g + 8} x {low nibbles: k-slots 4q..4q + 3, high
// nibbles: 16 + 4q..}. lut: the tables of rows g, g + 8 x low, high half.
template <int H>
__device__ __forceinline__ void dequant_half_e4m3(const uint4* w, const uint2 (*lut)[2], uint32_t (*a)[4]) {
#pragma unroll
  for (int cc = 0; cc < 2; ++cc) {
    const uint32_t w0 = reinterpret_cast<const uint32_t*>(&w[0])[2 * H + cc];
    const uint32_t w1 = reinterpret_cast<const uint32_t*>(&w[1])[2 * H + cc];
    a[cc][0] = e2m1x4_e4m3(w0 << 4, lut[0][0]);
    a[cc][1] = e2m1x4_e4m3(w1 << 4, lut[1][0]);
    a[cc][2] = e2m1x4_e4m3(w0, lut[0][1]);
    a[cc][3] = e2m1x4_e4m3(w1, lut[1][1]);
  }
}

// The activation ring: 128 KB (8 steps) below 128-token tiles, 192 KB (6) at 128 tokens, where 6
// slots against 4 took 70.0-70.5 us against 71.5-71.8 at gate_up (H200, benchmarks/results/
// h200-2026-11-28-fp4); 12 slots for 64 tokens were no faster (43.9-44.4 against 43.7). A W4A8
// step's activations are half as many bytes (one fp8 box, not two bf16 ones).
template <int kNT>
constexpr int stages_for() {
  return kNT >= 128 ? 6 : 8;
}

template <bool kA8, int kNT>
constexpr int smem_bytes() {
  return stages_for<kNT>() * (kA8 ? 1 : 2) * kNT * 128 + 1024;  // + alignment of the ring to 1024 bytes
}

// kA8: W4A8 (MXFP4 weights; xs the per-token scales of the fp8 activations), else W4A16.
template <bool kNV, bool kA8, int kNT, int kWG>
__global__ void __launch_bounds__(128 * kWG) fp4_wgmma_kernel(
    const __grid_constant__ CUtensorMap xmap, const uint8_t* __restrict__ w, const uint8_t* __restrict__ s,
    const float* __restrict__ gscale, const float* __restrict__ xs, __nv_bfloat16* __restrict__ out,
    float* __restrict__ partial, int M, int N, int half, int64_t stride_w, int64_t stride_s, int64_t stride_o,
    int steps_per_split) {
  static_assert(!(kNV && kA8), "W4A8 takes MXFP4 weights");
  constexpr int kStages = stages_for<kNT>();
  constexpr int kBox = kNT * 128;  // bytes of one [kNT, 64] bf16 box ([kNT, 128] fp8)
  constexpr int kSlot = (kA8 ? 1 : 2) * kBox;
  constexpr int kFrags = kA8 ? 2 : 4;  // MMAs (fragments) a half step
  constexpr int kWarps = 4 * kWG;
  extern __shared__ uint8_t smem_raw[];
  __shared__ uint64_t full[kStages], empty[kStages];
  __shared__ uint2 luts[kA8 ? kLutEntries : 1];
  uint8_t* ring = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int row0 = blockIdx.x * 64 * kWG + 16 * warp;  // warp w of warpgroup v: rows 64v + 16(w % 4)
  const int tok0 = blockIdx.z * kNT;
  const int first = blockIdx.y * steps_per_split;
  const int count = max(0, min(half / kStepBytes, first + steps_per_split) - first);

  if (tid == 0) {
    for (int i = 0; i < kStages; ++i) mbar_init(&full[i], 1), mbar_init(&empty[i], kWarps);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (kA8 && tid < kLutEntries) luts[tid] = lut_entry(tid);
  __syncthreads();
  auto issue = [&](int i) {  // activations of the split's step i into slot i % kStages
    uint8_t* dst = ring + (i % kStages) * kSlot;
    uint64_t* bar = &full[i % kStages];
    mbar_expect_tx(bar, kSlot);
    if constexpr (kA8) {
      tma_load(dst, &xmap, (first + i) * 2 * kStepBytes, tok0, bar);
    } else {
      tma_load(dst, &xmap, (first + i) * kStepBytes, tok0, bar);
      tma_load(dst + kBox, &xmap, half + (first + i) * kStepBytes, tok0, bar);
    }
  };
  if (tid == 0)
    for (int i = 0; i < min(kStages, count); ++i) issue(i);

  const uint8_t* wp[2];
  const uint8_t* sp[2][2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // rows past N re-read row N - 1 and are never stored
    const int r = min(row0 + 8 * h + g, N - 1);
    wp[h] = w + r * stride_w + first * kStepBytes + 16 * q;
    sp[h][0] = s + r * stride_s + (first * kStepBytes + 16 * q) / (kNV ? 16 : 32);
    sp[h][1] = sp[h][0] + half / (kNV ? 16 : 32);
  }

  float acc[kNT / 2];
#pragma unroll
  for (int i = 0; i < kNT / 2; ++i) acc[i] = 0.f;
  // Each step's MMAs go in two halves, each half's fragments dequantized while the other half's
  // MMAs run: the warpgroup keeps the tensor cores busy on its own, with the registers of one
  // step's fragments.
  uint32_t frag[2][kFrags][4];  // [half][fragment][register]
  uint32_t mult[2][2];  // W4A16: the multipliers of the step being dequantized [row][low, high half]
  uint2 lut[2][2];      // W4A8: its groups' tables [row][low, high half]
  Raw raw[2];  // steps loaded ahead: step i in raw[i % 2]
  int top[2];  // W4A8: E of rows g, g + 8 (see kLutTop)
  if constexpr (kA8) {
    // E over the share's groups of each row: lane q reads steps q, q + 4, ... (2 low and 2 high
    // scale bytes a step), then the quad's maxima are combined.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint8_t* lo = sp[h][0] - q / 2;  // the row's scale bytes of step `first`
      uint32_t e = 0;
      for (int i = q; i < count; i += 4) {
        const uint32_t a = *reinterpret_cast<const uint16_t*>(lo + 2 * i);
        const uint32_t b = *reinterpret_cast<const uint16_t*>(lo + half / 32 + 2 * i);
        e = max(e, max(max(a & 0xFF, a >> 8), max(b & 0xFF, b >> 8)));
      }
      e = max(e, __shfl_xor_sync(0xffffffffu, e, 1));
      top[h] = max(e, __shfl_xor_sync(0xffffffffu, e, 2));
    }
  }
  auto multipliers = [&](const Raw& r) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        if constexpr (kA8) {
          const int e = r.s[h][hf];
          lut[h][hf] = luts[e == 255 ? kLutNaN : max(e - top[h] + kLutTop, 0)];
        } else {
          mult[h][hf] = scale_bf16x2<kNV>(r.s[h][hf]);
        }
      }
  };
  auto dequant = [&](auto H, const Raw& r) {
    if constexpr (kA8)
      dequant_half_e4m3<H>(r.w, lut, frag[H]);
    else
      dequant_half<kNV, H>(r.w, mult, frag[H]);
  };
  auto fence_half = [&](uint32_t (*f)[4]) {
#pragma unroll
    for (int j = 0; j < kFrags; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) fence_reg(f[j][k]);
  };
  auto mma_half = [&](auto H, uint64_t desc) {
    fence_half(frag[H]);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < kFrags; ++j) {
      // W4A8: chunk 2H + j is 32 bytes into the step's fp8 box; W4A16: `chunk_of` in the two boxes
      const int off = kA8 ? 32 * (2 * H + j) : (chunk_of(H, j) / 4) * kBox + (chunk_of(H, j) % 4) * 32;
      wgmma<kNT, kA8>(acc, frag[H][j], desc + (off >> 4));
    }
    wgmma_commit();
  };
  using H0 = std::integral_constant<int, 0>;
  using H1 = std::integral_constant<int, 1>;
  if (count > 0) load_raw<kNV>(raw[0], wp, sp, 0);
  if (count > 1) load_raw<kNV>(raw[1], wp, sp, 1);
  if (count > 0) {
    multipliers(raw[0]);
    dequant(H0(), raw[0]);
  }
#pragma unroll
  for (int j = 0; j < kNT / 2; ++j) fence_reg(acc[j]);

  // step i (its first half's fragments ready; its raw weights in `cur`, step i + 1's in `next`):
  // thread 0 refills the slot two steps back once every warp has released it; wait for the
  // step's activations; MMAs of half 0; once the previous step's half 1 is done (its slot is
  // released), dequantize half 1 and issue it; load step i + 2 into `cur`; once half 0 is done,
  // dequantize step i + 1's half 0.
  auto step = [&](int i, Raw& cur, const Raw& next) {
    if (tid == 0 && i >= 2 && i - 2 + kStages < count) {
      mbar_wait(&empty[(i - 2) % kStages], ((i - 2) / kStages) & 1);
      issue(i - 2 + kStages);
    }
    __syncwarp();
    mbar_wait(&full[i % kStages], (i / kStages) & 1);
    const uint64_t desc = smem_desc(ring + (i % kStages) * kSlot);
    mma_half(H0(), desc);
    wgmma_wait<1>();
    fence_half(frag[1]);
    __syncwarp();
    if (i > 0 && lane == 0) mbar_arrive(&empty[(i - 1) % kStages]);
    dequant(H1(), cur);
    mma_half(H1(), desc);
    if (i + 2 < count) load_raw<kNV>(cur, wp, sp, i + 2);
    wgmma_wait<1>();
    fence_half(frag[0]);
    if (i + 1 < count) {
      multipliers(next);
      dequant(H0(), next);
    }
  };
  int i = 0;
  for (; i + 1 < count; i += 2) {  // two steps a turn: the raw buffers alternate by name
    step(i, raw[0], raw[1]);
    step(i + 1, raw[1], raw[0]);
  }
  if (i < count) step(i, raw[0], raw[1]);
  wgmma_wait<0>();
#pragma unroll
  for (int j = 0; j < kNT / 2; ++j) fence_reg(acc[j]);

  // d[4j + 2h + e]: row g + 8h, token 8j + 2q + e
  const float gs = (gscale ? *gscale : 1.f) * (kNV ? kNVUnscale : 1.f);
  float rows[2] = {gs, gs};
  if constexpr (kA8)
    for (int h = 0; h < 2; ++h) rows[h] = ldexpf(1.f, top[h] - 133);  // 2^(E - 127 - 6)
  float* part = partial ? partial + (int64_t)blockIdx.y * M * N : nullptr;
#pragma unroll
  for (int j = 0; j < kNT / 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = row0 + g + 8 * h, t = tok0 + 8 * j + 2 * q + e;
        if (r >= N || t >= M) continue;
        const float v = acc[4 * j + 2 * h + e] * (kA8 ? xs[t] * rows[h] : rows[h]);
        if (part)
          part[(int64_t)t * N + r] = v;
        else
          out[t * stride_o + r] = __float2bfloat16_rn(v);
      }
}

// x [M, K] (row stride stride_x) -> xp [M, K] contiguous in the K order of the weights' fragments:
// in each 64-column segment, chunk c (columns 16c .. 16c + 15 of xp) holds at k-slots 2q, 2q + 1 the
// columns 16q + 4c and 16q + 4c + 2 of x, at k-slots 8 + 2q, 9 + 2q the columns 16q + 4c + 1 and
// 16q + 4c + 3 (the columns of lane q's word c: bytes 0, 2 and 1, 3, the order e2m1x2 reads them).
// One thread a chunk: four 8-byte loads, two 16-byte stores.
__global__ void permute_x_kernel(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ xp, int K,
                                 int64_t stride_x, int chunks) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= chunks) return;
  const int per_row = K / 16, m = (int)(i / per_row), j = (int)(i % per_row);
  const int seg = 64 * (j / 4), c = j % 4;
  uint32_t lo[4], hi[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint2 v = *reinterpret_cast<const uint2*>(x + m * stride_x + seg + 16 * q + 4 * c);
    lo[q] = __byte_perm(v.x, v.y, 0x5410);  // columns 4c, 4c + 2 of lane q's 16
    hi[q] = __byte_perm(v.x, v.y, 0x7632);  // columns 4c + 1, 4c + 3
  }
  uint4* dst = reinterpret_cast<uint4*>(xp + (int64_t)m * K + seg + 16 * c);
  dst[0] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  dst[1] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver (the library links the runtime only)
EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

template <bool kNV, bool kA8, int kNT, int kWG>
int launch(const CUtensorMap& xmap, const void* w, const void* s, const float* g, const float* xs, void* out,
           float* partial, int M, int N, int half, int64_t stride_w, int64_t stride_s, int64_t stride_o, int split,
           cudaStream_t stream) {
  if constexpr (kNT == 128 && kWG == 4) {  // 128 registers a thread cannot hold its accumulators
    return (int)cudaErrorInvalidValue;
  } else {
  auto kernel = fp4_wgmma_kernel<kNV, kA8, kNT, kWG>;
  constexpr int bytes = smem_bytes<kA8, kNT>();
  static const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (attr != cudaSuccess) return (int)attr;
  const int steps = half / kStepBytes;
  const int per = (steps + split - 1) / split;
  const dim3 grid((N + 64 * kWG - 1) / (64 * kWG), split, (M + kNT - 1) / kNT);
  kernel<<<grid, 128 * kWG, bytes, stream>>>(xmap, (const uint8_t*)w, (const uint8_t*)s, g, xs,
                                             (__nv_bfloat16*)out, partial, M, N, half, stride_w, stride_s,
                                             stride_o, per);
  return (int)cudaGetLastError();
  }
}

// The TMA map of the activations the kernel reads: [M, K] elements of `type` (row pitch K
// elements of `bytes`), boxes of [tokens, 128 bytes], 128-byte swizzled
int encode_x_map(CUtensorMap* map, CUtensorMapDataType type, int bytes, void* x, int M, int K, int tokens) {
  EncodeTiled encode = encode_tiled();
  if (!encode) return (int)cudaErrorNotSupported;
  const cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)M};
  const cuuint64_t strides[1] = {(cuuint64_t)K * bytes};
  const cuuint32_t box[2] = {(cuuint32_t)(128 / bytes), (cuuint32_t)tokens};
  const cuuint32_t unit[2] = {1, 1};
  if (encode(map, type, 2, x, dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return (int)cudaErrorInvalidValue;
  return (int)cudaSuccess;
}

// launch<kNV, kA8, tokens, warpgroups>, or cudaErrorInvalidValue for a combination not built
#define TK_WGMMA_LAUNCH(NV, A8, NT, WG)                                                                    \
  return launch<NV, A8, NT, WG>(xmap, w, s, g, xs, out, partial, M, N, half, stride_w, stride_s, stride_o, split, \
                                stream)
#define TK_WGMMA_TOKENS(NV, A8, WG)               \
  switch (tokens) {                               \
    case 16: TK_WGMMA_LAUNCH(NV, A8, 16, WG);     \
    case 32: TK_WGMMA_LAUNCH(NV, A8, 32, WG);     \
    case 64: TK_WGMMA_LAUNCH(NV, A8, 64, WG);     \
    case 128: TK_WGMMA_LAUNCH(NV, A8, 128, WG);   \
    default: return (int)cudaErrorInvalidValue;   \
  }

template <bool kNV, bool kA8>
int launch_config(const CUtensorMap& xmap, const void* w, const void* s, const float* g, const float* xs, void* out,
                  float* partial, int M, int N, int half, int64_t stride_w, int64_t stride_s, int64_t stride_o,
                  int tokens, int warpgroups, int split, cudaStream_t stream) {
  switch (warpgroups) {
    case 1: TK_WGMMA_TOKENS(kNV, kA8, 1);
    case 2: TK_WGMMA_TOKENS(kNV, kA8, 2);
    case 4: TK_WGMMA_TOKENS(kNV, kA8, 4);
    default: return (int)cudaErrorInvalidValue;
  }
}
#undef TK_WGMMA_TOKENS
#undef TK_WGMMA_LAUNCH

// x bf16 [M, K] -> xq e4m3 [M, K] in the W4A8 fragments' K order, xs fp32 [M]: per token
// xs = max(amax, 1e-12) * fp32(1 / 448) and xq = x / xs rounded to nearest even, bit for bit
// trtllm_kernels.fp8's token scales as torch computes them on CUDA (it divides by a scalar as a
// multiply by its reciprocal; a true division differs by an ulp at times, and bf16 activations
// land on e4m3 rounding ties often enough that such an ulp flips codes). In each 128-column
// segment s of xq, chunk c (32 columns) holds at k-slots 4q + i the columns
// 64s + 16q + 4c + (2, 0, 3, 1)[i] of x and at 16 + 4q + i the same columns of its second half
// (the order e2m1x4_e4m3 leaves lane q's word c in). One block of 1024 threads a token (decode
// has a few tokens: the row is read in one round of loads, kept in L1 for the quantizing pass);
// thread t owns the 8-column tasks t, t + 1024, ... Other outputs (Out): xq in x's own order (for a
// library fp8 GEMM), or bf16 xq * xs in x's own order (the fp8 activations dequantized, for the
// W4A16 kernels).
enum class Out { kFragments, kNatural, kRounded };

template <Out kOut>
__global__ void __launch_bounds__(1024) quantize_x_e4m3_kernel(const __nv_bfloat16* __restrict__ x,
                                                              void* __restrict__ xq, float* __restrict__ xs,
                                                              int half, int64_t stride_x) {
  const int m = blockIdx.x, tasks = half / 4;
  const __nv_bfloat16* row = x + m * stride_x;
  auto load = [&](int t, int hf) {  // 4 columns of task t: (low, high half) x (64s + 16q + 4c + 0..3)
    const int col = 64 * (t >> 4) + 16 * (t & 3) + 4 * ((t >> 2) & 3);
    return *reinterpret_cast<const uint2*>(row + hf * half + col);
  };
  float amax = 0.f;
#pragma unroll 4
  for (int t = threadIdx.x; t < tasks; t += blockDim.x)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const uint2 v = load(t, hf);
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float2 f = __bfloat1622float2(h[j]);
        amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
      }
    }
  const float scale = fmaxf(tk::block_max(amax), 1e-12f) * (1.f / 448.f);
  if (threadIdx.x == 0) xs[m] = scale;
  for (int t = threadIdx.x; t < tasks; t += blockDim.x) {
    const int seg = t >> 4, c = (t >> 2) & 3, q = t & 3;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const uint2 v = load(t, hf);
      const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&v);
      const int64_t at = (int64_t)m * 2 * half + hf * half + 64 * seg + 16 * q + 4 * c;  // x's own order
      if constexpr (kOut == Out::kRounded) {
        __nv_bfloat16 r[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          __nv_fp8_e4m3 q8;
          q8.__x = __nv_cvt_float_to_fp8(__bfloat162float(e[i]) / scale, __NV_SATFINITE, __NV_E4M3);
          r[i] = __float2bfloat16_rn(float(q8) * scale);
        }
        *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(xq) + at) = *reinterpret_cast<const uint2*>(r);
      } else if constexpr (kOut == Out::kNatural) {
        uint32_t word = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i)
          word |= (uint32_t)__nv_cvt_float_to_fp8(__bfloat162float(e[i]) / scale, __NV_SATFINITE, __NV_E4M3)
                  << (8 * i);
        *reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(xq) + at) = word;
      } else {
        uint32_t word = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float f = __bfloat162float(e[(0x1302 >> (4 * i)) & 0xF]) / scale;  // columns 2, 0, 3, 1
          word |= (uint32_t)__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3) << (8 * i);
        }
        *reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(xq) + (int64_t)m * 2 * half + 128 * seg + 32 * c +
                                     16 * hf + 4 * q) = word;
      }
    }
  }
}

// MXFP4 w [N, half] -> e4m3 [N, 2 half] in K's own order, the values the W4A8 GEMM multiplies (E
// over the whole row), and rs fp32 [N] = 2^(E - 133): the operands of an fp8 GEMM with row-wise
// scales, for prefill, where a library GEMM outruns converting in registers. One block a row;
// 16 packed bytes a thread and step (one scale group of each half).
__global__ void __launch_bounds__(128) w4a8_weights_kernel(const uint8_t* __restrict__ w,
                                                          const uint8_t* __restrict__ s, uint8_t* __restrict__ out,
                                                          float* __restrict__ rs, int half, int64_t stride_w,
                                                          int64_t stride_s) {
  __shared__ uint2 luts[kLutEntries];
  if (threadIdx.x < kLutEntries) luts[threadIdx.x] = lut_entry(threadIdx.x);
  const int64_t row = blockIdx.x;
  const uint8_t* srow = s + row * stride_s;
  float e = 0.f;
  for (int j = threadIdx.x; j < half / 16; j += blockDim.x) e = fmaxf(e, srow[j]);
  const int top = (int)tk::block_max(e);  // (its __syncthreads also publishes the tables)
  if (threadIdx.x == 0) rs[row] = ldexpf(1.f, top - 133);
  auto table = [&](int e) { return luts[e == 255 ? kLutNaN : max(e - top + kLutTop, 0)]; };
  for (int j = 16 * threadIdx.x; j < half; j += 16 * blockDim.x) {
    const uint4 v = *reinterpret_cast<const uint4*>(w + row * stride_w + j);
    const uint2 lo = table(srow[j / 32]), hi = table(srow[(half + j) / 32]);
    uint32_t a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // e2m1x4_e4m3 leaves bytes 2, 0, 3, 1: put them back in order
      const uint32_t x = reinterpret_cast<const uint32_t*>(&v)[i];
      a[i] = __byte_perm(e2m1x4_e4m3(x << 4, lo), 0, 0x2031);
      b[i] = __byte_perm(e2m1x4_e4m3(x, hi), 0, 0x2031);
    }
    uint8_t* o = out + row * 2 * half + j;
    *reinterpret_cast<uint4*>(o) = make_uint4(a[0], a[1], a[2], a[3]);
    *reinterpret_cast<uint4*>(o + half) = make_uint4(b[0], b[1], b[2], b[3]);
  }
}

}  // namespace

// x: bf16 [M, K = 2 half] (row stride stride_x elements, a multiple of 8; 16-byte aligned); xp:
// bf16 [M, K] scratch for its permuted copy (16-byte aligned);
// w: uint8 [N, half] packed codes (16-byte aligned rows); s: uint8 scale bytes [N, K / group]
// (e4m3 for NVFP4, e8m0 for MXFP4); g: the
// NVFP4 global scale (fp32, device) or null; out: bf16 [M, N] (row stride stride_o), or with
// split > 1, partial: fp32 [split, M, N] to be summed over the split. half % 64 == 0.
// tokens: the block's token tile (16, 32, 64 or 128; more tokens take more tiles over grid.z);
// warpgroups: 1, 2 or 4 (64 weight rows each; 1 or 2 with 128-token tiles).
extern "C" int tk_fp4_gemm_wgmma(const void* x, void* xp, const void* w, const void* s, const float* g, void* out,
                                 float* partial, int M, int N, int half, int64_t stride_x, int64_t stride_w,
                                 int64_t stride_s, int64_t stride_o, int nvfp4, int tokens, int warpgroups,
                                 int split, cudaStream_t stream) {
  if (M < 1 || N < 1 || half < kStepBytes || half % kStepBytes || stride_x % 8 || split < 1 ||
      (split > 1 && !partial) || !xp)
    return (int)cudaErrorInvalidValue;
  CUtensorMap xmap;
  if (const int e = encode_x_map(&xmap, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, xp, M, 2 * half, tokens)) return e;
  const int chunks = M * (half / 8);  // 16-column chunks of x
  permute_x_kernel<<<(chunks + 255) / 256, 256, 0, stream>>>((const __nv_bfloat16*)x, (__nv_bfloat16*)xp,
                                                            2 * half, stride_x, chunks);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return (int)e;
  const float* xs = nullptr;
  return nvfp4 ? launch_config<true, false>(xmap, w, s, g, xs, out, partial, M, N, half, stride_w, stride_s,
                                            stride_o, tokens, warpgroups, split, stream)
               : launch_config<false, false>(xmap, w, s, g, xs, out, partial, M, N, half, stride_w, stride_s,
                                             stride_o, tokens, warpgroups, split, stream);
}

// W4A8: out = dequant(xq) @ dequant(w)^T with x quantized per token to e4m3 first (xq: uint8 [M, K]
// scratch, 16-byte aligned; xs: fp32 [M] scratch, its scales) and MXFP4 w (s: e8m0 bytes, their
// rows and base 2-byte aligned). The arguments of tk_fp4_gemm_wgmma's, with xp replaced by xq, xs;
// g must be null and nvfp4 0.
extern "C" int tk_fp4_gemm_w4a8(const void* x, void* xq, float* xs, const void* w, const void* s, const float* g,
                                void* out, float* partial, int M, int N, int half, int64_t stride_x,
                                int64_t stride_w, int64_t stride_s, int64_t stride_o, int nvfp4, int tokens,
                                int warpgroups, int split, cudaStream_t stream) {
  if (M < 1 || N < 1 || half < kStepBytes || half % kStepBytes || stride_x % 8 || stride_s % 2 || split < 1 ||
      (split > 1 && !partial) || !xq || !xs || reinterpret_cast<uintptr_t>(s) % 2 || g || nvfp4)
    return (int)cudaErrorInvalidValue;
  CUtensorMap xmap;
  if (const int e = encode_x_map(&xmap, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, xq, M, 2 * half, tokens)) return e;
  quantize_x_e4m3_kernel<Out::kFragments><<<M, 1024, 0, stream>>>((const __nv_bfloat16*)x, xq, xs, half, stride_x);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return (int)e;
  return launch_config<false, true>(xmap, w, s, nullptr, xs, out, partial, M, N, half, stride_w, stride_s,
                                    stride_o, tokens, warpgroups, split, stream);
}

// W4A8 prefill weights: MXFP4 w (uint8 [N, half], 16-byte aligned rows), s (e8m0 [N, K / 32]) ->
// out e4m3 [N, 2 half] (contiguous, 16-byte aligned), rs fp32 [N]; half % 64 == 0.
extern "C" int tk_fp4_w4a8_weights(const void* w, const void* s, void* out, float* rs, int N, int half,
                                   int64_t stride_w, int64_t stride_s, cudaStream_t stream) {
  if (N < 1 || half < kStepBytes || half % kStepBytes || stride_w % 16) return (int)cudaErrorInvalidValue;
  w4a8_weights_kernel<<<N, 128, 0, stream>>>((const uint8_t*)w, (const uint8_t*)s, (uint8_t*)out, rs, half,
                                             stride_w, stride_s);
  return (int)cudaGetLastError();
}

// x bf16 [M, K] (row stride stride_x, a multiple of 8; 16-byte aligned) -> out [M, K] (contiguous,
// x's own order): each token quantized to e4m3 as tk_fp4_gemm_w4a8 quantizes it, out the e4m3
// bytes, or with `rounded` bf16 xq * xs; xs fp32 [M] the scales. K % 128 == 0.
extern "C" int tk_fp8_quantize_tokens(const void* x, void* out, float* xs, int M, int K, int64_t stride_x,
                                      int rounded, cudaStream_t stream) {
  if (M < 1 || K < 2 * kStepBytes || K % (2 * kStepBytes) || stride_x % 8) return (int)cudaErrorInvalidValue;
  if (rounded)
    quantize_x_e4m3_kernel<Out::kRounded><<<M, 1024, 0, stream>>>((const __nv_bfloat16*)x, out, xs, K / 2, stride_x);
  else
    quantize_x_e4m3_kernel<Out::kNatural><<<M, 1024, 0, stream>>>((const __nv_bfloat16*)x, out, xs, K / 2, stride_x);
  return (int)cudaGetLastError();
}
