// CUDA kernels around cuDNN's convolutions for the mask-weighted convolution (kernel family 2). Contract:
// fastpurify/ops/masked_conv.py; interface: masked_conv.h.
//
// All kernels are memory-bound elementwise passes: each thread handles kPer consecutive elements (coalesced,
// 8 fp32 = two 16-byte transactions per thread), products are taken in fp32 (fp64 for fp64) and rounded once,
// as the eager multiply does. The multi-tensor kernels find their layer by a binary search over the layers'
// first blocks (a few dozen layers: a handful of cached loads), so every layer is one launch in total.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "masked_conv.h"

namespace fastpurify {

namespace {

constexpr int kThreads = 256;
constexpr int kPer = static_cast<int>(kMultiBlock / kThreads);

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T> __device__ __forceinline__ A to_acc(T v) { return static_cast<A>(v); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__global__ void _masked_mul_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                                   const T* __restrict__ c, T* __restrict__ out2, int64_t n) {
  using A = typename Acc<T>::type;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kMultiBlock + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int64_t i = base + static_cast<int64_t>(j) * kThreads;
    if (i < n) {
      const A av = to_acc<A>(a[i]);
      out[i] = from_acc<T>(av * to_acc<A>(b[i]));
      if (out2 != nullptr) out2[i] = from_acc<T>(av * to_acc<A>(c[i]));
    }
  }
}

// The layer that owns block `blk`: the last entry whose first_block <= blk.
template <typename E>
__device__ __forceinline__ int64_t owner(const E* table, int64_t count, int64_t blk) {
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid].first_block <= blk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__global__ void _multi_mul_kernel(const MultiMulEntry* __restrict__ table, int64_t count) {
  using A = typename Acc<T>::type;
  const int64_t blk = blockIdx.x;
  const MultiMulEntry e = table[owner(table, count, blk)];
  const T* a = static_cast<const T*>(e.a);
  const T* b = static_cast<const T*>(e.b);
  T* out = static_cast<T*>(e.out);
  const int64_t base = (blk - e.first_block) * kMultiBlock + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int64_t i = base + static_cast<int64_t>(j) * kThreads;
    if (i < e.n) out[i] = from_acc<T>(to_acc<A>(a[i]) * to_acc<A>(b[i]));
  }
}

template <typename T>
__global__ void _masked_adam_clamp_kernel(const AdamEntry* __restrict__ table, int64_t count, T w1, T beta2, T w2,
                                          T bc2_sqrt, T eps, T neg_step, T l1, bool has_l1) {
  const int64_t blk = blockIdx.x;
  const AdamEntry e = table[owner(table, count, blk)];
  T* mask = static_cast<T*>(e.mask);
  const T* grad = static_cast<const T*>(e.grad);
  T* ea = static_cast<T*>(e.exp_avg);
  T* es = static_cast<T*>(e.exp_avg_sq);
  const int64_t base = (blk - e.first_block) * kMultiBlock + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int64_t i = base + static_cast<int64_t>(j) * kThreads;
    if (i >= e.n) continue;
    const T m = mask[i];
    T g = grad[i];
    if (has_l1) g = g + l1 * (m > T(0) ? T(1) : (m < T(0) ? T(-1) : T(0)));  // torch.sign: sign(0) = 0
    // torch.optim.Adam's single-tensor arithmetic in its order; explicit round-to-nearest intrinsics keep
    // --use_fast_math from approximating the sqrt and the divisions.
    const T a = ea[i] + w1 * (g - ea[i]);
    const T s = es[i] * beta2 + w2 * g * g;
    T denom, nm;
    if constexpr (sizeof(T) == 4) {
      denom = __fdiv_rn(__fsqrt_rn(s), bc2_sqrt) + eps;
      nm = m + __fdiv_rn(neg_step * a, denom);
    } else {
      denom = __ddiv_rn(__dsqrt_rn(s), bc2_sqrt) + eps;
      nm = m + __ddiv_rn(neg_step * a, denom);
    }
    nm = nm < T(0) ? T(0) : nm;  // comparisons with NaN are false: NaN propagates as in torch.clamp
    nm = nm > T(1) ? T(1) : nm;
    ea[i] = a;
    es[i] = s;
    mask[i] = nm;
  }
}

int64_t blocks_for(int64_t n) { return (n + kMultiBlock - 1) / kMultiBlock; }

template <typename T>
cudaError_t mul_typed(const void* a, const void* b, void* out, const void* c, void* out2, int64_t n,
                      cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  _masked_mul_kernel<T><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, stream>>>(
      static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(out), static_cast<const T*>(c),
      static_cast<T*>(out2), n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t multi_typed(const MultiMulEntry* table, int64_t count, int64_t blocks, cudaStream_t stream) {
  if (blocks == 0) return cudaSuccess;
  _multi_mul_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, count);
  return cudaGetLastError();
}

template <typename T>
cudaError_t adam_typed(const AdamEntry* table, int64_t count, int64_t blocks, const AdamScalars& s,
                       cudaStream_t stream) {
  if (blocks == 0) return cudaSuccess;
  _masked_adam_clamp_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      table, count, static_cast<T>(s.w1), static_cast<T>(s.beta2), static_cast<T>(s.w2), static_cast<T>(s.bc2_sqrt),
      static_cast<T>(s.eps), static_cast<T>(s.neg_step), static_cast<T>(s.l1), s.l1 != 0.0);
  return cudaGetLastError();
}

}  // namespace

cudaError_t masked_mul_cuda_launch(DType dtype, const void* a, const void* b, void* out, const void* c, void* out2,
                                   int64_t n, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return mul_typed<float>(a, b, out, c, out2, n, stream);
    case DType::kFloat64: return mul_typed<double>(a, b, out, c, out2, n, stream);
    case DType::kFloat16: return mul_typed<__half>(a, b, out, c, out2, n, stream);
    case DType::kBFloat16: return mul_typed<__nv_bfloat16>(a, b, out, c, out2, n, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t multi_mul_cuda_launch(DType dtype, const MultiMulEntry* table, int64_t count, int64_t blocks,
                                  cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return multi_typed<float>(table, count, blocks, stream);
    case DType::kFloat64: return multi_typed<double>(table, count, blocks, stream);
    case DType::kFloat16: return multi_typed<__half>(table, count, blocks, stream);
    case DType::kBFloat16: return multi_typed<__nv_bfloat16>(table, count, blocks, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t masked_adam_clamp_cuda_launch(DType dtype, const AdamEntry* table, int64_t count, int64_t blocks,
                                          const AdamScalars& s, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return adam_typed<float>(table, count, blocks, s, stream);
    case DType::kFloat64: return adam_typed<double>(table, count, blocks, s, stream);
    default: return cudaErrorInvalidValue;  // masks are fp32 or fp64 (checked by the launcher)
  }
}

}  // namespace fastpurify
