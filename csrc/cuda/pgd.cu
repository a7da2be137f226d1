// CUDA kernel of the PGD perturbation update (kernel family 1). Torch-free: raw pointers + cudaStream_t,
// launched from csrc/cuda/pgd_bind.cpp. One read of delta, grad (and x), one write of delta: the update is
// memory-bound (12-16 bytes/element in fp32), so the kernel is a grid-stride loop with 64-bit indexing.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pgd.h"

namespace fastpurify {

namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// clamp with torch.clamp's NaN behaviour (NaN in, NaN out): fmin/fmax would drop the NaN.
template <typename A> __device__ __forceinline__ A clamp_nan(A v, A lo, A hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

template <typename T>
__global__ void _pgd_update_kernel(T* __restrict__ d, const T* __restrict__ g, const T* __restrict__ x, int64_t n,
                                   int64_t nx, typename Acc<T>::type step, typename Acc<T>::type eps,
                                   typename Acc<T>::type lo, typename Acc<T>::type hi, bool has_box) {
  using A = typename Acc<T>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A gi = to_acc<T>(g[i]);
    const A s = gi > A(0) ? step : (gi < A(0) ? -step : A(0));  // torch.sign: sign(0) = sign(NaN) = 0
    A y = clamp_nan<A>(to_acc<T>(d[i]) + s, -eps, eps);
    if (has_box) {
      const A xi = to_acc<T>(x[nx == n ? i : i % nx]);
      y = clamp_nan<A>(xi + y, lo, hi) - xi;
    }
    d[i] = from_acc<T>(y);
  }
}

template <typename T>
cudaError_t launch(void* d, const void* g, const void* x, int64_t n, int64_t nx, double step, double eps, double lo,
                   double hi, bool has_box, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  // Enough blocks to fill every SM several times over; the grid-stride loop covers the rest.
  int device = 0, sms = 132;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t want = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(want < int64_t(sms) * 16 ? want : int64_t(sms) * 16);
  _pgd_update_kernel<T><<<blocks, kThreads, 0, stream>>>(
      static_cast<T*>(d), static_cast<const T*>(g), static_cast<const T*>(x), n, nx, static_cast<A>(step),
      static_cast<A>(eps), static_cast<A>(lo), static_cast<A>(hi), has_box);
  return cudaGetLastError();
}

}  // namespace

cudaError_t pgd_update_linf_cuda_launch(DType dtype, void* delta, const void* grad, const void* x, int64_t n,
                                        int64_t nx, double step, double eps, double lo, double hi, bool has_box,
                                        cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch<float>(delta, grad, x, n, nx, step, eps, lo, hi, has_box, stream);
    case DType::kFloat64: return launch<double>(delta, grad, x, n, nx, step, eps, lo, hi, has_box, stream);
    case DType::kFloat16: return launch<__half>(delta, grad, x, n, nx, step, eps, lo, hi, has_box, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(delta, grad, x, n, nx, step, eps, lo, hi, has_box, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpurify
