// CUDA kernels of the PGD perturbation update (kernel family 1). Torch-free: raw pointers + cudaStream_t,
// launched from csrc/cuda/pgd_bind.cpp. Contract: fastpurify/ops/pgd.py.
//
// L-inf: a grid-stride loop, one read of delta, grad (and x), one write of delta (12-16 B/element: the
// kernel is memory-bound). L2/L1: one block per sample; the gradient norm and the stepped-delta norm are
// block reductions (warp shuffles + shared memory), then a third sweep rescales and stores; a CIFAR sample
// (12 KB) stays in L1/L2 between sweeps. Both optionally write the model input (x + delta - mean) / std in
// out's dtype and strides (e.g. bf16 channels_last) in their last sweep. No host synchronisation anywhere.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device.cuh"
#include "pgd.h"

namespace fastpurify {

namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T> __device__ __forceinline__ A widen(T v) { return static_cast<A>(v); }
template <> __device__ __forceinline__ float widen<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float widen<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename A, typename T> __device__ __forceinline__ A load(const T* p, int64_t i) { return widen<A>(p[i]); }

template <typename T, typename A> __device__ __forceinline__ T cast_to(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half cast_to<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 cast_to<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half cast_to<__half, double>(double v) { return __double2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 cast_to<__nv_bfloat16, double>(double v) {
  return __float2bfloat16_rn(static_cast<float>(v));
}

// clamp with torch.clamp's NaN behaviour (NaN in, NaN out): fmin/fmax would drop the NaN.
template <typename A> __device__ __forceinline__ A clamp_nan(A v, A lo, A hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

template <typename A> __device__ __forceinline__ A sign_step(A g, A step) {
  return g > A(0) ? step : (g < A(0) ? -step : A(0));  // torch.sign: sign(0) = sign(NaN) = 0
}

template <typename T, typename O>
struct Params {
  using A = typename Acc<T>::type;
  T* d;
  const T* g;
  const T* x;
  O* out;
  const float* mean;
  const float* std;
  int64_t n, nx, c, h, w;
  int64_t so[4];
  A step, eps, lo, hi;
  bool has_box;
};

// Box clamp, store delta, write the model input: the shared last step of both kernels.
template <typename T, typename O>
__device__ __forceinline__ void finish(const Params<T, O>& p, int64_t i, typename Acc<T>::type y) {
  using A = typename Acc<T>::type;
  A xi = A(0);
  if (p.x != nullptr) {
    xi = load<A>(p.x, p.nx == p.n ? i : i % p.nx);
    if (p.has_box) y = clamp_nan<A>(xi + y, p.lo, p.hi) - xi;
  }
  const T stored = cast_to<T>(y);
  p.d[i] = stored;
  if (p.out != nullptr) {
    const int64_t ww = i % p.w, hh = (i / p.w) % p.h, cc = (i / (p.w * p.h)) % p.c, mm = i / (p.w * p.h * p.c);
    // widen the stored value, not load(&stored): taking its address put it on the stack (8-byte frame, 4-byte
    // spill in the fp32 L1 sample kernels, nvcc 13.0 sm_90 -O3).
    A v = xi + widen<A>(stored);
    if (p.mean != nullptr) v = (v - static_cast<A>(p.mean[cc])) / static_cast<A>(p.std[cc]);
    p.out[mm * p.so[0] + cc * p.so[1] + hh * p.so[2] + ww * p.so[3]] = cast_to<O>(v);
  }
}

template <typename T, typename O>
__global__ void _pgd_update_kernel(Params<T, O> p) {
  using A = typename Acc<T>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    const A y = clamp_nan<A>(load<A>(p.d, i) + sign_step<A>(load<A>(p.g, i), p.step), -p.eps, p.eps);
    finish<T, O>(p, i, y);
  }
}

constexpr int kSampleThreads = 256;

// Sum over the block; every thread gets the result.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by the previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kSampleThreads / 32 ? shared[threadIdx.x] : A(0);
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

template <typename T, typename O, bool L2>
__global__ void __launch_bounds__(kSampleThreads) _pgd_update_sample_kernel(Params<T, O> p, int64_t s) {
  using A = typename Acc<T>::type;
  __shared__ A shared[kSampleThreads / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * s;
  A scale = p.step;
  if (L2) {
    A ss = A(0);
    for (int64_t j = threadIdx.x; j < s; j += kSampleThreads) {
      const A g = load<A>(p.g, base + j);
      ss += g * g;
    }
    scale = p.step / (sqrt(block_sum<A>(ss, shared)) + A(1e-10));  // torchattacks' PGDL2 guard
  }
  A acc = A(0);
  for (int64_t j = threadIdx.x; j < s; j += kSampleThreads) {
    const A g = load<A>(p.g, base + j);
    const A y = load<A>(p.d, base + j) + (L2 ? g * scale : sign_step<A>(g, p.step));
    acc += L2 ? y * y : fabs(y);
  }
  A norm = block_sum<A>(acc, shared);
  if (L2) norm = sqrt(norm);
  A factor = p.eps / norm;
  factor = factor > A(1) ? A(1) : factor;  // min(1, eps/norm), keeping a NaN norm NaN
  // Not unrolled: unrolled, the int64 index arithmetic of finish() made ptxas spill 4 bytes (8-byte stack frame)
  // in the fp32 L1 variants (nvcc 13.0, sm_90, -O3); at 40 registers the SM runs enough warps to hide the loads.
#pragma unroll 1
  for (int64_t j = threadIdx.x; j < s; j += kSampleThreads) {
    const A g = load<A>(p.g, base + j);
    const A y = (load<A>(p.d, base + j) + (L2 ? g * scale : sign_step<A>(g, p.step))) * factor;
    finish<T, O>(p, base + j, y);
  }
}

template <typename T, typename O>
cudaError_t launch(const PgdArgs& a, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (a.n == 0) return cudaSuccess;
  Params<T, O> p;
  p.d = static_cast<T*>(a.delta);
  p.g = static_cast<const T*>(a.grad);
  p.x = static_cast<const T*>(a.x);
  p.out = static_cast<O*>(a.out);
  p.mean = a.mean;
  p.std = a.std;
  p.n = a.n;
  p.nx = a.nx;
  p.c = a.c;
  p.h = a.h;
  p.w = a.w;
  for (int k = 0; k < 4; ++k) p.so[k] = a.so[k];
  p.step = static_cast<A>(a.step);
  p.eps = static_cast<A>(a.eps);
  p.lo = static_cast<A>(a.lo);
  p.hi = static_cast<A>(a.hi);
  p.has_box = a.has_box;
  if (a.norm == PgdNorm::kLinf) {
    constexpr int kThreads = 256;
    const int64_t want = (a.n + kThreads - 1) / kThreads;
    const int64_t cap = static_cast<int64_t>(num_sms()) * 16;  // fill every SM; the grid-stride loop does the rest
    _pgd_update_kernel<T, O><<<static_cast<unsigned>(want < cap ? want : cap), kThreads, 0, stream>>>(p);
  } else {
    const int64_t s = a.c * a.h * a.w;
    if (a.norm == PgdNorm::kL2) {
      _pgd_update_sample_kernel<T, O, true><<<static_cast<unsigned>(a.m), kSampleThreads, 0, stream>>>(p, s);
    } else {
      _pgd_update_sample_kernel<T, O, false><<<static_cast<unsigned>(a.m), kSampleThreads, 0, stream>>>(p, s);
    }
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_out(const PgdArgs& a, cudaStream_t stream) {
  switch (a.out_dtype) {
    case DType::kFloat32: return launch<T, float>(a, stream);
    case DType::kFloat64: return launch<T, double>(a, stream);
    case DType::kFloat16: return launch<T, __half>(a, stream);
    case DType::kBFloat16: return launch<T, __nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t pgd_update_cuda_launch(const PgdArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return dispatch_out<float>(a, stream);
    case DType::kFloat64: return dispatch_out<double>(a, stream);
    case DType::kFloat16: return dispatch_out<__half>(a, stream);
    case DType::kBFloat16: return dispatch_out<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpurify
