// Device helpers shared by the FP4 weight-only GEMMs (fp4_gemm.cu: mma.sync, 1-16 tokens on Hopper,
// 1-64 elsewhere; fp4_wgmma.cu: wgmma for more): e2m1 -> bf16 by bit placement, the scale bytes as bf16x2
// multipliers, and the streaming weight load.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

namespace tk {

// Two e2m1 codes, the nibbles at bits [S, S + 4) and [S + 16, S + 20) of r (S = 0 or 4) -> bf16x2
// holding e2m1 * 2^-126 each: the sign to bit 15 and the 3 magnitude bits to bits 8..6 (0.5 lands
// on a bf16 subnormal, exactly). Three instructions: isolate the two nibbles, and one multiply
// copies each twice, its magnitude bits to 6..8 and its sign to 15 (the copies do not overlap, so
// nothing carries); a mask keeps those bits. Nibbles 8 and 12 are nibbles 0 and 4 of r >> 8.
template <int S>
__device__ __forceinline__ uint32_t e2m1x2(uint32_t r) {
  static_assert(S == 0 || S == 4, "nibbles 0 or 4 of each half");
  return ((r & (0x000F000Fu << S)) * (S == 0 ? 0x1040u : 0x104u)) & 0x81C081C0u;
}

__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

__device__ __forceinline__ uint32_t bf16x2_splat(float f) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(r) : "f"(f));
  return r;
}

// Scales are applied to the codes (e2m1 * 2^-126) in bf16, exactly (at most 6 significant bits):
// NVFP4 with one multiply by scale * 2^117 (at most 448 * 2^117, inside bf16's range), which
// leaves e2m1 * scale * 2^-9 (>= 2^-19); the fp32 accumulators get the 2^9 back with the global
// scale. MXFP4's power-of-two scales span 2^-127..2^127, so its codes take two multiplies (by
// 2^126, then by the scale).
constexpr float kNVUnscale = 512.f;  // 2^9

// A raw scale byte -> the bf16x2 multiplier `scaled` takes: e4m3 * 2^117 (NaN stays NaN) or
// e8m0 (2^(s - 127); 0 is 2^-127, a bf16 subnormal; 255 NaN).
template <bool kNV>
__device__ __forceinline__ uint32_t scale_bf16x2(uint32_t s) {
  if constexpr (kNV) {
    __nv_fp8_e4m3 f;
    f.__x = (__nv_fp8_storage_t)s;
    return bf16x2_splat(float(f) * 0x1p117f);
  } else {
    const uint32_t b = s == 0 ? 0x0040u : s == 255 ? 0x7FC0u : s << 7;
    return b | (b << 16);
  }
}

// Codes (e2m1x2) times their multiplier (scale_bf16x2 or an equal value)
template <bool kNV>
__device__ __forceinline__ uint32_t scaled(uint32_t codes, uint32_t mult) {
  constexpr uint32_t two126 = 0x7E807E80u;  // bf16x2 (2^126, 2^126)
  return kNV ? mul_bf16x2(codes, mult) : mul_bf16x2(mul_bf16x2(codes, two126), mult);
}

// Weights are read once: keep L1 for other data (fp4_gemm.cu's activations, which every block
// re-reads), and ask L2 to fetch the 256-byte segment around each 16-byte load (the row's next
// K steps).
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

}  // namespace tk
