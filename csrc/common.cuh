// Shared helpers for the csrc kernels: dtype codes, conversions, 16-byte vectors, reductions.
// Every kernel file exposes plain extern "C" launchers (device pointers, sizes, a stream) and
// returns a cudaError_t as int, so one library serves torch ops and TensorRT plugins alike and
// never depends on torch's C++ ABI.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace tk {

// Dtype codes shared with trtllm_kernels/kernels/csrc.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N elements of T moved as one 16-byte access.
template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <class Op>
__device__ __forceinline__ float warp_reduce(float x, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Reduce over the block; every thread gets the result. blockDim.x must be a multiple of 32.
template <class Op>
__device__ __forceinline__ float block_reduce(float x, Op op) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = warp_reduce(x, op);
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  float total = partial[0];
  for (int w = 1; w < warps; ++w) total = op(total, partial[w]);  // same-address reads: a broadcast
  __syncthreads();  // partial[] may be reused by a later call
  return total;
}

__device__ __forceinline__ float block_sum(float x) { return block_reduce(x, Sum()); }
__device__ __forceinline__ float block_max(float x) { return block_reduce(x, Max()); }

}  // namespace tk

#define TK_DISPATCH_DTYPE(code, T, ...)                         \
  switch (code) {                                               \
    case tk::kFloat32: { using T = float; __VA_ARGS__; break; } \
    case tk::kFloat16: { using T = __half; __VA_ARGS__; break; } \
    case tk::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return (int)cudaErrorInvalidValue;                 \
  }
