// CUDA kernels of SAU's dual-logit loss (kernel family 1). Contract: fastpurify/ops/dual_logit.py.
//
// One warp per row (8 rows per 256-thread block): a row of C <= 1000 logits is 32 strided loads per lane at
// most, reduced with warp shuffles (no shared memory, no block barrier). The forward kernel writes each row's
// masks and its two loss terms; a one-block kernel sums the terms in a fixed order (deterministic, no float
// atomics) into the 0-d loss. The backward kernel writes dL/dz and dL/dz0 per row from the saved masks and the
// upstream gradient, which it reads from device memory (no host sync).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dual_logit.h"

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

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;
constexpr double kProbFloor = 1e-8;  // SAU floors both softmaxes at 1e-8 before the logarithms

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename A> __device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) {
    const A w = __shfl_xor_sync(0xffffffffu, v, o);
    v = (w > v || isnan(w)) ? w : v;  // NaN wins, as in torch.max
  }
  return v;
}

// Is (v, i) a better argmax candidate than (bv, bi)? Larger value, NaN above all (torch.argmax), ties to the
// smaller index.
template <typename A> __device__ __forceinline__ bool better(A v, int64_t i, A bv, int64_t bi) {
  if (isnan(v) || isnan(bv)) return isnan(v) && (!isnan(bv) || i < bi);
  return v > bv || (v == bv && i < bi);
}

// Softmax statistics of one row, identical in every lane: max, argmax, Σ exp(z − max).
template <typename T, typename A>
struct Row {
  A max, sum;
  int64_t arg;
  __device__ Row(const T* z, int64_t c, int lane) {
    A bv = -INFINITY;
    int64_t bi = c;  // "none yet": loses every comparison against a real index
    for (int64_t j = lane; j < c; j += 32) {
      const A v = load<A>(z, j);
      if (bi == c || better(v, j, bv, bi)) {
        bv = v;
        bi = j;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const A ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi != c && (bi == c || better(ov, oi, bv, bi))) {
        bv = ov;
        bi = oi;
      }
    }
    max = bv;
    arg = bi;
    A e = A(0);
    for (int64_t j = lane; j < c; j += 32) e += exp(load<A>(z, j) - max);
    sum = warp_sum(e);
  }
  __device__ __forceinline__ A prob(const T* z, int64_t j) const { return exp(load<A>(z, j) - max) / sum; }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) _dual_logit_loss_kernel(DualLogitArgs p) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= p.b) return;  // a whole warp leaves together: the shuffles below stay converged
  const int64_t c = p.c;
  const T* z = static_cast<const T*>(p.z) + row * c;
  const T* z0 = static_cast<const T*>(p.z0) + row * c;
  const Row<T, A> st(z, c, lane), st0(z0, c, lane);
  const bool a = st.arg != p.yhat[row], a0 = st0.arg != p.yhat0[row];
  const bool s = a && a0 && st.arg == st0.arg;
  const int64_t y = p.y[row];
  const bool valid = y >= 0 && y < c;  // not checked on the host (a sync): an invalid label gives a NaN loss
  // −log_softmax at the label, as F.cross_entropy: −(z_y − max − log Σ).
  A adv = A(0);
  if (!a) adv += valid ? -(load<A>(z, y) - st.max - log(st.sum)) : A(NAN);
  if (!a0) adv += valid ? -(load<A>(z0, y) - st0.max - log(st0.sum)) : A(NAN);
  A js = A(0);
  if (!s) {
    const A floor = static_cast<A>(kProbFloor), half = A(0.5);
    for (int64_t j = lane; j < c; j += 32) {
      A q = st.prob(z, j), q0 = st0.prob(z0, j);
      q = q < floor ? floor : q;  // clamp(min=1e-8) keeping a NaN
      q0 = q0 < floor ? floor : q0;
      const A lm = log(half * (q + q0));
      js += half * (q * log(q) + q0 * log(q0)) - half * (q * lm + q0 * lm);
    }
    js = warp_sum(js);
  }
  if (lane == 0) {
    p.a[row] = a;
    p.a0[row] = a0;
    p.s[row] = s;
    A* terms = static_cast<A*>(p.terms);
    terms[2 * row] = adv;
    terms[2 * row + 1] = js;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads) _dual_logit_sum_kernel(const A* terms, A* loss, int64_t b, A beta1,
                                                                    A beta2) {
  __shared__ A shared[2][kThreads / 32];
  A sa = A(0), ss = A(0);
  for (int64_t i = threadIdx.x; i < b; i += kThreads) {  // fixed assignment and tree: deterministic
    sa += terms[2 * i];
    ss += terms[2 * i + 1];
  }
  sa = warp_sum(sa);
  ss = warp_sum(ss);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    shared[0][warp] = sa;
    shared[1][warp] = ss;
  }
  __syncthreads();
  if (warp == 0) {
    sa = lane < kThreads / 32 ? shared[0][lane] : A(0);
    ss = lane < kThreads / 32 ? shared[1][lane] : A(0);
    sa = warp_sum(sa);
    ss = warp_sum(ss);
    if (lane == 0) {
      const A n = static_cast<A>(b);
      *loss = beta1 * (-sa / A(2) / n) + beta2 * (ss / n);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) _dual_logit_loss_backward_kernel(DualLogitBackwardArgs p) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= p.b) return;
  const int64_t c = p.c;
  const T* z = static_cast<const T*>(p.z) + row * c;
  const T* z0 = static_cast<const T*>(p.z0) + row * c;
  T* dz = static_cast<T*>(p.dz) + row * c;
  T* dz0 = static_cast<T*>(p.dz0) + row * c;
  const A g = *static_cast<const A*>(p.gout);
  const A n = static_cast<A>(p.b);
  const A c_adv = -(g * static_cast<A>(p.beta1)) / A(2) / n;  // d loss / d CE_i of an unmasked row
  const A c_js = (g * static_cast<A>(p.beta2)) / n;           // d loss / d JS_i of an unmasked row
  const bool a = p.a[row] != 0, a0 = p.a0[row] != 0, s = p.s[row] != 0;
  const int64_t y = p.y[row];
  const A bad = (y >= 0 && y < c) ? A(0) : A(NAN);
  const Row<T, A> st(z, c, lane), st0(z0, c, lane);
  const A floor = static_cast<A>(kProbFloor), half = A(0.5);
  // dJS/dp_j = ½(log q_j − log m_j) where the floor did not act, else 0; softmax backward p_j·(u_j − Σ p·u).
  auto u_of = [&](A pp, A pp0, A& u, A& u0) {
    const A q = pp < floor ? floor : pp, q0 = pp0 < floor ? floor : pp0;
    const A lm = log(half * (q + q0));
    u = pp >= floor ? half * (log(q) - lm) : A(0);
    u0 = pp0 >= floor ? half * (log(q0) - lm) : A(0);
  };
  A dot = A(0), dot0 = A(0);
  if (!s) {
    for (int64_t j = lane; j < c; j += 32) {
      const A pp = st.prob(z, j), pp0 = st0.prob(z0, j);
      A u, u0;
      u_of(pp, pp0, u, u0);
      dot += pp * u;
      dot0 += pp0 * u0;
    }
    dot = warp_sum(dot);
    dot0 = warp_sum(dot0);
  }
  for (int64_t j = lane; j < c; j += 32) {
    const A pp = st.prob(z, j), pp0 = st0.prob(z0, j), onehot = j == y ? A(1) : A(0);
    A gz = A(0), gz0 = A(0);
    if (!a) gz += c_adv * (pp - onehot + bad);
    if (!a0) gz0 += c_adv * (pp0 - onehot + bad);
    if (!s) {
      A u, u0;
      u_of(pp, pp0, u, u0);
      gz += c_js * (pp * (u - dot));
      gz0 += c_js * (pp0 * (u0 - dot0));
    }
    dz[j] = cast_to<T>(gz);
    dz0[j] = cast_to<T>(gz0);
  }
}

unsigned row_blocks(int64_t b) { return static_cast<unsigned>((b + kRowsPerBlock - 1) / kRowsPerBlock); }

template <typename T>
cudaError_t launch_forward(const DualLogitArgs& a, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (a.b == 0) return cudaSuccess;
  _dual_logit_loss_kernel<T><<<row_blocks(a.b), kThreads, 0, stream>>>(a);
  _dual_logit_sum_kernel<A><<<1, kThreads, 0, stream>>>(static_cast<const A*>(a.terms), static_cast<A*>(a.loss), a.b,
                                                         static_cast<A>(a.beta1), static_cast<A>(a.beta2));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const DualLogitBackwardArgs& a, cudaStream_t stream) {
  if (a.b == 0) return cudaSuccess;
  _dual_logit_loss_backward_kernel<T><<<row_blocks(a.b), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t dual_logit_loss_cuda_launch(const DualLogitArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return launch_forward<float>(a, stream);
    case DType::kFloat64: return launch_forward<double>(a, stream);
    case DType::kFloat16: return launch_forward<__half>(a, stream);
    case DType::kBFloat16: return launch_forward<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t dual_logit_loss_backward_cuda_launch(const DualLogitBackwardArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return launch_backward<float>(a, stream);
    case DType::kFloat64: return launch_backward<double>(a, stream);
    case DType::kFloat16: return launch_backward<__half>(a, stream);
    case DType::kBFloat16: return launch_backward<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpurify
