// C++ CPU kernel of the PGD perturbation update (kernel family 1): one pass over delta, grad and x.
// Contract (fastpurify/ops/pgd.py): contiguous delta updated in place; x broadcast over delta's leading dims.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <limits>

namespace fastpurify {

namespace {

// Elements per parallel task: below this, thread start-up costs more than the loop (~32k floats = 128 KB).
constexpr int64_t kGrain = 32768;

template <typename acc_t>
inline acc_t clamp_nan(acc_t v, acc_t lo, acc_t hi) {
  // std::max/min return their first argument when a comparison with NaN is false: NaN propagates as in
  // torch.clamp, which the reference uses.
  return std::min(std::max(v, lo), hi);
}

template <typename scalar_t, typename acc_t>
inline void linf_segment(scalar_t* __restrict d, const scalar_t* __restrict g, const scalar_t* __restrict x,
                         int64_t len, acc_t step, acc_t eps, acc_t lo, acc_t hi) {
  for (int64_t i = 0; i < len; ++i) {
    const acc_t gi = static_cast<acc_t>(g[i]);
    // step*sign(g) with torch.sign's convention: sign(0) = sign(NaN) = 0.
    const acc_t s = gi > acc_t(0) ? step : (gi < acc_t(0) ? -step : acc_t(0));
    acc_t y = clamp_nan<acc_t>(static_cast<acc_t>(d[i]) + s, -eps, eps);
    if (x != nullptr) {
      const acc_t xi = static_cast<acc_t>(x[i]);
      y = clamp_nan<acc_t>(xi + y, lo, hi) - xi;
    }
    d[i] = static_cast<scalar_t>(y);
  }
}

}  // namespace

void pgd_update_linf_cpu_(at::Tensor delta, const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                          double step, double eps, c10::optional<double> lower, c10::optional<double> upper,
                          bool descend) {
  TORCH_CHECK(delta.device().is_cpu() && grad.device().is_cpu(), "pgd_update_linf_cpu_: tensors must be on CPU");
  TORCH_CHECK(delta.is_contiguous() && grad.is_contiguous(), "pgd_update_linf_cpu_: delta and grad must be contiguous");
  TORCH_CHECK(grad.numel() == delta.numel() && grad.scalar_type() == delta.scalar_type(),
              "pgd_update_linf_cpu_: grad must match delta in size and dtype");
  const bool box = x.has_value() && (lower.has_value() || upper.has_value());
  const int64_t n = delta.numel();
  int64_t nx = n;
  if (box) {
    TORCH_CHECK(x->is_cpu() && x->is_contiguous() && x->scalar_type() == delta.scalar_type(),
                "pgd_update_linf_cpu_: x must be a contiguous CPU tensor of delta's dtype");
    nx = x->numel();
    TORCH_CHECK(nx > 0 && n % nx == 0, "pgd_update_linf_cpu_: x.numel() must divide delta.numel()");
  }
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "pgd_update_linf_cpu_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    const acc_t st = static_cast<acc_t>(descend ? -step : step);
    const acc_t ep = static_cast<acc_t>(eps);
    const acc_t lo = lower.has_value() ? static_cast<acc_t>(*lower) : -inf;
    const acc_t hi = upper.has_value() ? static_cast<acc_t>(*upper) : inf;
    scalar_t* d = delta.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* xp = box ? x->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      // Walk [begin, end) in segments along which x is contiguous, so the inner loop vectorises.
      int64_t i = begin;
      while (i < end) {
        const int64_t j = i % nx;
        const int64_t len = std::min(end - i, nx - j);
        linf_segment<scalar_t, acc_t>(d + i, g + i, xp ? xp + j : nullptr, len, st, ep, lo, hi);
        i += len;
      }
    });
  });
}

}  // namespace fastpurify
