// Device helpers shared by the FP4 weight-only GEMMs (fp4_gemm.cu: mma.sync for 1-64 tokens,
// fp4_wgmma.cu: wgmma for more): e2m1 -> bf16 by bit placement, the scale bytes as bf16x2, and the
// streaming weight load.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

namespace tk {

// Two e2m1 codes, the nibbles at bits [S, S + 4) and [S + 16, S + 20) of r -> bf16x2 holding
// e2m1 * 2^-126 each.
template <int S>
__device__ __forceinline__ uint32_t e2m1x2(uint32_t r) {
  const uint32_t mag = (S <= 6 ? r << (6 - S) : r >> (S - 6)) & 0x01C001C0u;
  const uint32_t sgn = (r << (12 - S)) & 0x80008000u;
  return mag | sgn;
}

__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// A raw scale byte -> its value as bf16, twice (a bf16x2).
template <bool kNV>
__device__ __forceinline__ uint32_t scale_bf16x2(uint32_t s) {
  uint32_t b;
  if constexpr (kNV) {  // e4m3 (NaN stays NaN)
    __nv_fp8_e4m3 f;
    f.__x = (__nv_fp8_storage_t)s;
    const __nv_bfloat16 h = __float2bfloat16_rn(float(f));
    b = *reinterpret_cast<const uint16_t*>(&h);
  } else {  // e8m0: 2^(s - 127); 0 is 2^-127 (a bf16 subnormal), 255 NaN
    b = s == 0 ? 0x0040u : s == 255 ? 0x7FC0u : s << 7;
  }
  return b | (b << 16);
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
