// CUDA kernels of the universal-perturbation update (kernel family 1). Contract: fastpurify/ops/universal.py.
//
// delta: K perturbations of S = C*H*W elements; grad: K batches of B rows of S. One thread per column of a
// 256-column block streams the B rows (coalesced: a warp reads 128 contiguous bytes of fp32 per row). A CIFAR
// batch has only 12 such blocks, so the rows are also split into `nsplit` slices to fill the GPU; each slice
// writes its partial sums to a workspace and a finishing kernel adds them in slice order. Every reduction has a
// fixed order (no float atomics), so results are bitwise reproducible. Kernels:
//   _universal_reduce_kernel<FUSED>: one pass over grad; FUSED (nsplit = 1) also finishes the step.
//   _universal_finish_kernel: sums the slices, then finishes the step (nsplit > 1).
//   finishing the step: mean, penalty, SGD step; none/linf store delta; l2/l1 store the stepped value (fp32/
//   fp64) and the block's partial norm (a block reduction).
//   _universal_rescale_kernel (l2/l1): each block reduces its perturbation's partial norms (same order in every
//   block) and writes delta = y * min(1, radius / norm).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "device.cuh"
#include "universal.h"

namespace fastpurify {

namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T> __device__ __forceinline__ A load(const T* p, int64_t i) { return static_cast<A>(p[i]); }
template <> __device__ __forceinline__ float load<float, __half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float load<float, __nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

template <typename T, typename A> __device__ __forceinline__ T cast_to(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half cast_to<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 cast_to<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

constexpr int kThreads = 256;         // threads per block = columns per block
constexpr int64_t kRowsPerSplit = 16;  // fewer rows per slice would make the partials' traffic a sizeable share

template <typename T>
struct Params {
  using A = typename Acc<T>::type;
  T* d;
  const T* g;
  A* split;  // (K, nsplit, S) partial batch sums
  A* y;      // (K, S) stepped values (l2/l1)
  A* part;   // (K, nb) partial norms (l2/l1)
  int64_t k, b, s, nb, nsplit, rows;
  A step, wd2, radius, nbatch;
  UniversalNorm norm;
  bool mean, has_wd;
};

// Sum over the block; every thread gets the result. The tree is fixed: the same inputs give the same bits.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : A(0);
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

// acc: the batch sum of column j of perturbation kk (every thread of the block must call this: block reduction).
template <typename T>
__device__ __forceinline__ void finish_step(const Params<T>& p, int64_t kk, int64_t j, typename Acc<T>::type acc) {
  using A = typename Acc<T>::type;
  __shared__ A shared[kThreads / 32];
  const bool in = j < p.s;
  const int64_t i = kk * p.s + j;
  const A d = in ? load<A>(p.d, i) : A(0);
  A g = p.mean ? acc / p.nbatch : acc;
  if (p.has_wd) g = g + p.wd2 * d;  // weight_decay = 0 adds nothing (keeps an infinite delta infinite)
  A y = d + p.step * g;
  if (p.norm == UniversalNorm::kLinf) {
    y = y < -p.radius ? -p.radius : y;  // comparisons keep a NaN (fmin/fmax would drop it), as torch.clamp
    y = y > p.radius ? p.radius : y;
  }
  if (p.norm == UniversalNorm::kL2 || p.norm == UniversalNorm::kL1) {
    if (in) p.y[i] = y;
    const A v = in ? (p.norm == UniversalNorm::kL2 ? y * y : fabs(y)) : A(0);
    const A total = block_sum<A>(v, shared);
    if (threadIdx.x == 0) p.part[kk * p.nb + blockIdx.x] = total;
  } else if (in) {
    p.d[i] = cast_to<T>(y);
  }
}

template <typename T, bool FUSED>
__global__ void __launch_bounds__(kThreads) _universal_reduce_kernel(Params<T> p) {
  using A = typename Acc<T>::type;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t kk = blockIdx.z, sp = blockIdx.y;
  const int64_t b0 = sp * p.rows, b1 = b0 + p.rows < p.b ? b0 + p.rows : p.b;
  A acc = A(0);
  if (j < p.s) {
    const T* row = p.g + (kk * p.b + b0) * p.s + j;
#pragma unroll 4
    for (int64_t bb = b0; bb < b1; ++bb, row += p.s) acc += load<A>(row, 0);  // rows in order
  }
  if (FUSED) {
    finish_step<T>(p, kk, j, acc);
  } else if (j < p.s) {
    p.split[(kk * p.nsplit + sp) * p.s + j] = acc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) _universal_finish_kernel(Params<T> p) {
  using A = typename Acc<T>::type;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t kk = blockIdx.y;
  A acc = A(0);
  if (j < p.s) {
    for (int64_t sp = 0; sp < p.nsplit; ++sp) acc += p.split[(kk * p.nsplit + sp) * p.s + j];  // slice order
  }
  finish_step<T>(p, kk, j, acc);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) _universal_rescale_kernel(Params<T> p) {
  using A = typename Acc<T>::type;
  __shared__ A shared[kThreads / 32];
  const int64_t kk = blockIdx.y;
  A v = A(0);
  for (int64_t t = threadIdx.x; t < p.nb; t += kThreads) v += p.part[kk * p.nb + t];
  A n = block_sum<A>(v, shared);
  if (p.norm == UniversalNorm::kL2) n = sqrt(n);
  A factor = p.radius / n;
  factor = factor > A(1) ? A(1) : factor;  // min(1, radius/norm), keeping a NaN norm NaN; a zero norm gives 1
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j < p.s) p.d[kk * p.s + j] = cast_to<T>(p.y[kk * p.s + j] * factor);
}

struct Plan {
  int64_t nb, nsplit, rows;
  size_t split_off, y_off, part_off, bytes;
};

size_t align256(size_t v) { return (v + 255) / 256 * 256; }

Plan make_plan(const UniversalArgs& a) {
  Plan pl{};
  const size_t acc_size = a.dtype == DType::kFloat64 ? 8 : 4;
  pl.nb = (a.s + kThreads - 1) / kThreads;
  // Split the batch when the column blocks alone would leave most of the GPU idle (aim: 2 blocks per SM).
  const int64_t blocks = pl.nb * a.k > 0 ? pl.nb * a.k : 1;
  int64_t want = (2 * static_cast<int64_t>(num_sms()) + blocks - 1) / blocks;
  const int64_t most = (a.b + kRowsPerSplit - 1) / kRowsPerSplit;
  want = want < most ? want : most;
  want = want < 65535 ? want : 65535;  // gridDim.y limit
  want = want > 1 ? want : 1;
  pl.rows = (a.b + want - 1) / want;
  pl.nsplit = (a.b + pl.rows - 1) / pl.rows;
  const bool rescale = a.norm == UniversalNorm::kL2 || a.norm == UniversalNorm::kL1;
  pl.split_off = 0;
  pl.y_off = align256(pl.nsplit > 1 ? static_cast<size_t>(a.k * pl.nsplit * a.s) * acc_size : 0);
  pl.part_off = pl.y_off + align256(rescale ? static_cast<size_t>(a.k * a.s) * acc_size : 0);
  pl.bytes = pl.part_off + align256(rescale ? static_cast<size_t>(a.k * pl.nb) * acc_size : 0);
  return pl;
}

template <typename T>
cudaError_t launch(const UniversalArgs& a, void* workspace, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (a.s == 0 || a.k == 0) return cudaSuccess;
  const Plan pl = make_plan(a);
  char* ws = static_cast<char*>(workspace);
  Params<T> p;
  p.d = static_cast<T*>(a.delta);
  p.g = static_cast<const T*>(a.grad);
  p.split = reinterpret_cast<A*>(ws + pl.split_off);
  p.y = reinterpret_cast<A*>(ws + pl.y_off);
  p.part = reinterpret_cast<A*>(ws + pl.part_off);
  p.k = a.k;
  p.b = a.b;
  p.s = a.s;
  p.nb = pl.nb;
  p.nsplit = pl.nsplit;
  p.rows = pl.rows;
  // Scalars are rounded once to the compute type, as torch does with Python scalars in the reference.
  p.step = static_cast<A>(a.step);
  p.wd2 = static_cast<A>(a.wd2);
  p.radius = static_cast<A>(a.radius);
  p.nbatch = static_cast<A>(a.b);
  p.norm = a.norm;
  p.mean = a.mean;
  p.has_wd = a.has_wd;
  const dim3 reduce_grid(static_cast<unsigned>(pl.nb), static_cast<unsigned>(pl.nsplit), static_cast<unsigned>(a.k));
  const dim3 col_grid(static_cast<unsigned>(pl.nb), static_cast<unsigned>(a.k));
  if (pl.nsplit == 1) {
    _universal_reduce_kernel<T, true><<<reduce_grid, kThreads, 0, stream>>>(p);
  } else {
    _universal_reduce_kernel<T, false><<<reduce_grid, kThreads, 0, stream>>>(p);
    _universal_finish_kernel<T><<<col_grid, kThreads, 0, stream>>>(p);
  }
  if (a.norm == UniversalNorm::kL2 || a.norm == UniversalNorm::kL1) {
    _universal_rescale_kernel<T><<<col_grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

size_t universal_update_cuda_workspace(const UniversalArgs& a) {
  if (a.s == 0 || a.k == 0) return 0;
  return make_plan(a).bytes;
}

cudaError_t universal_update_cuda_launch(const UniversalArgs& a, void* workspace, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return launch<float>(a, workspace, stream);
    case DType::kFloat64: return launch<double>(a, workspace, stream);
    case DType::kFloat16: return launch<__half>(a, workspace, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpurify
