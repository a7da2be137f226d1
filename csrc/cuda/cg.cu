// CUDA kernels of the conjugate-gradient vector updates (kernel family 3). Torch-free: raw pointers +
// cudaStream_t, launched from csrc/cuda/cg_bind.cpp. Contract: fastpurify/ops/cg.py.
//
// cg_step is two kernels: phase 1 (grid: tiles x systems) updates x and r in one pass (24 B/element in fp32,
// the traffic floor of the update) and writes one partial sum of r^2 per tile; phase 2 (one block per system)
// adds the partials in tile order. No atomics: the result does not depend on scheduling. alpha and beta are
// computed by every block from the per-system scalars in device memory, so nothing waits for the host and
// the whole CG iteration can be captured in a CUDA graph. Inactive systems return before touching memory.
#include <cuda_runtime.h>

#include <cstdint>

#include "device.cuh"
#include "cg.h"

namespace fastpurify {

namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ bool is_active(const T* rr, const int32_t* status, int64_t s, T tol2) {
  return rr[s] > tol2 && status[s] >= 0;
}

// Sum over the block (kThreads threads); thread 0 gets the result.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : A(0);
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) _cg_step_kernel(T* x, T* r, const T* p, const T* ap, const T* rr,
                                                            const T* pap, const int32_t* status, T* part, int64_t n,
                                                            int64_t per_sys, int64_t first, T tol2) {
  __shared__ T shared[kThreads / 32];
  const int64_t s = blockIdx.y, tile = blockIdx.x;
  if (!is_active<T>(rr, status, s, tol2)) {  // uniform over the block: no divergence, no traffic
    if (threadIdx.x == 0) part[s * per_sys + first + tile] = T(0);
    return;
  }
  const T alpha = rr[s] / pap[s];
  const int64_t lo = tile * kCgTile;
  const int64_t hi = lo + kCgTile < n ? lo + kCgTile : n;
  T* xs = x + s * n;
  T* rs = r + s * n;
  const T* ps = p + s * n;
  const T* as = ap + s * n;
  T acc = T(0);
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    xs[i] = xs[i] + alpha * ps[i];
    const T v = rs[i] - alpha * as[i];
    rs[i] = v;
    acc += v * v;
  }
  acc = block_sum<T>(acc, shared);
  if (threadIdx.x == 0) part[s * per_sys + first + tile] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) _cg_finalize_kernel(const T* part, const T* rr, const T* pap, T* rr_new,
                                                                int32_t* iters, int32_t* status, int64_t per_sys,
                                                                T tol2) {
  __shared__ double shared[kThreads / 32];
  const int64_t s = blockIdx.x;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < per_sys; i += kThreads) acc += static_cast<double>(part[s * per_sys + i]);
  acc = block_sum<double>(acc, shared);
  if (threadIdx.x != 0) return;
  const bool on = is_active<T>(rr, status, s, tol2);
  if (!on) {
    rr_new[s] = rr[s];
    return;
  }
  const T total = static_cast<T>(acc);
  rr_new[s] = total;
  const int32_t it = iters[s] + 1;
  iters[s] = it;
  if (!isfinite(total) || !isfinite(pap[s])) {
    status[s] = -it;  // frozen: nothing after a NaN/Inf is meaningful
  } else if (pap[s] <= T(0) && status[s] == 0) {
    status[s] = it;  // first non-positive curvature: recorded, iteration goes on (as hypertorch's CG does)
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) _cg_direction_kernel(T* p, const T* r, const T* rr, const T* rr_new,
                                                                 const int32_t* status, int64_t n, T tol2) {
  const int64_t s = blockIdx.y;
  if (!is_active<T>(rr, status, s, tol2)) return;
  const T beta = rr_new[s] / rr[s];
  T* ps = p + s * n;
  const T* rs = r + s * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    ps[i] = rs[i] + beta * ps[i];
  }
}

template <typename T>
cudaError_t step(const CgStepArgs& a, cudaStream_t stream) {
  if (a.n == 0 || a.nsys == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((a.n + kCgTile - 1) / kCgTile), static_cast<unsigned>(a.nsys));
  _cg_step_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<T*>(a.x), static_cast<T*>(a.r), static_cast<const T*>(a.p), static_cast<const T*>(a.ap),
      static_cast<const T*>(a.rr), static_cast<const T*>(a.pap), a.status, static_cast<T*>(a.part), a.n, a.per_sys,
      a.first, static_cast<T>(a.tol2));
  return cudaGetLastError();
}

template <typename T>
cudaError_t finalize(const CgFinalizeArgs& a, cudaStream_t stream) {
  if (a.nsys == 0) return cudaSuccess;
  _cg_finalize_kernel<T><<<static_cast<unsigned>(a.nsys), kThreads, 0, stream>>>(
      static_cast<const T*>(a.part), static_cast<const T*>(a.rr), static_cast<const T*>(a.pap),
      static_cast<T*>(a.rr_new), a.iters, a.status, a.per_sys, static_cast<T>(a.tol2));
  return cudaGetLastError();
}

template <typename T>
cudaError_t direction(const CgDirectionArgs& a, cudaStream_t stream) {
  if (a.n == 0 || a.nsys == 0) return cudaSuccess;
  const int64_t want = (a.n + kThreads - 1) / kThreads;
  int64_t cap = static_cast<int64_t>(num_sms()) * 16 / a.nsys;  // fill every SM; the grid-stride loop does the rest
  cap = cap < 1 ? 1 : cap;
  const dim3 grid(static_cast<unsigned>(want < cap ? want : cap), static_cast<unsigned>(a.nsys));
  _cg_direction_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<T*>(a.p), static_cast<const T*>(a.r),
                                                         static_cast<const T*>(a.rr), static_cast<const T*>(a.rr_new),
                                                         a.status, a.n, static_cast<T>(a.tol2));
  return cudaGetLastError();
}

}  // namespace

cudaError_t cg_step_partial_cuda_launch(const CgStepArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return step<float>(a, stream);
    case DType::kFloat64: return step<double>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cg_finalize_cuda_launch(const CgFinalizeArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return finalize<float>(a, stream);
    case DType::kFloat64: return finalize<double>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cg_direction_cuda_launch(const CgDirectionArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return direction<float>(a, stream);
    case DType::kFloat64: return direction<double>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastpurify
