// RMSNorm, optionally fused with the residual add before it: one block per row.
//   s = x + residual (rounded to T, as an unfused model stores it); y = s * rsqrt(mean(s^2) + eps) * w
// Pass 1 reads x and residual with 16-byte loads, writes s, and sums squares in fp32; pass 2
// re-reads s (just written, so from L1/L2) and writes y. Rows whose length is not a multiple
// of the vector width take the scalar path.
#include "common.cuh"

namespace {

template <typename T, bool kVec>
__global__ void rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                const T* __restrict__ weight, T* __restrict__ out,
                                T* __restrict__ residual_out, int hidden, float eps) {
  using V = tk::Vec<T>;
  constexpr int N = kVec ? V::N : 1;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  const T* rr = residual ? residual + row * hidden : nullptr;
  // Without a residual, s is x itself.
  T* sr = residual ? residual_out + row * hidden : const_cast<T*>(xr);
  T* yr = out + row * hidden;

  float sum_sq = 0.f;
  for (int i = threadIdx.x * N; i < hidden; i += blockDim.x * N) {
    T s[N];
    if constexpr (kVec) {
      V a = *reinterpret_cast<const V*>(xr + i);
#pragma unroll
      for (int j = 0; j < N; ++j) s[j] = a.v[j];
      if (rr) {
        V b = *reinterpret_cast<const V*>(rr + i);
#pragma unroll
        for (int j = 0; j < N; ++j) s[j] = tk::from_float<T>(tk::to_float(s[j]) + tk::to_float(b.v[j]));
        *reinterpret_cast<V*>(sr + i) = *reinterpret_cast<V*>(s);
      }
    } else {
      s[0] = rr ? tk::from_float<T>(tk::to_float(xr[i]) + tk::to_float(rr[i])) : xr[i];
      if (rr) sr[i] = s[0];
    }
#pragma unroll
    for (int j = 0; j < N; ++j) sum_sq += tk::to_float(s[j]) * tk::to_float(s[j]);
  }
  const float inv_rms = rsqrtf(tk::block_sum(sum_sq) / hidden + eps);
  if (rr) __syncthreads();  // make this block's writes of s visible to its own re-reads

  for (int i = threadIdx.x * N; i < hidden; i += blockDim.x * N) {
    T s[N], w[N], y[N];
    if constexpr (kVec) {
      *reinterpret_cast<V*>(s) = *reinterpret_cast<const V*>(sr + i);
      *reinterpret_cast<V*>(w) = *reinterpret_cast<const V*>(weight + i);
    } else {
      s[0] = sr[i];
      w[0] = weight[i];
    }
#pragma unroll
    for (int j = 0; j < N; ++j) y[j] = tk::from_float<T>(tk::to_float(s[j]) * inv_rms * tk::to_float(w[j]));
    if constexpr (kVec) {
      *reinterpret_cast<V*>(yr + i) = *reinterpret_cast<V*>(y);
    } else {
      yr[i] = y[0];
    }
  }
}

template <typename T>
int launch(const void* x, const void* residual, const void* weight, void* out, void* residual_out,
           int64_t rows, int64_t hidden, float eps, cudaStream_t stream) {
  if (rows == 0) return 0;
  const bool vec = hidden % tk::Vec<T>::N == 0;
  const int per_thread = vec ? tk::Vec<T>::N : 1;
  int threads = (int)((hidden / per_thread + 31) / 32 * 32);
  threads = threads < 32 ? 32 : threads > 1024 ? 1024 : threads;
  auto kernel = vec ? rms_norm_kernel<T, true> : rms_norm_kernel<T, false>;
  kernel<<<rows, threads, 0, stream>>>((const T*)x, (const T*)residual, (const T*)weight, (T*)out,
                                       (T*)residual_out, (int)hidden, eps);
  return (int)cudaGetLastError();
}

}  // namespace

// x, residual, out, residual_out: [rows, hidden] contiguous of `dtype`; weight: [hidden].
// residual may be null (plain RMSNorm; residual_out is then unused).
extern "C" int tk_rms_norm(const void* x, const void* residual, const void* weight, void* out,
                           void* residual_out, int64_t rows, int64_t hidden, int dtype, float eps,
                           cudaStream_t stream) {
  TK_DISPATCH_DTYPE(dtype, T, return launch<T>(x, residual, weight, out, residual_out, rows, hidden, eps, stream));
  return 0;
}
