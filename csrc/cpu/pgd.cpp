// C++ CPU kernel of the PGD perturbation update (kernel family 1). Contract: fastpurify/ops/pgd.py.
//
// L-inf is one pass over delta, grad (and x), parallel over (sample, channel) planes. L2/L1 need two
// per-sample norms (of the gradient, then of the stepped delta): each sample is handled by one task, in
// three sweeps over its C*H*W elements (12 KB for CIFAR: they stay in L1/L2 cache), with no host loop and
// no temporary tensor. The optional model input out_x = (x + delta - mean) / std is written in the last
// sweep, in out_x's own dtype and strides (e.g. bf16 channels_last).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace fastpurify {

namespace {

enum class Norm { kLinf, kL2, kL1 };

Norm parse_norm(const std::string& norm) {
  if (norm == "linf") return Norm::kLinf;
  if (norm == "l2") return Norm::kL2;
  if (norm == "l1") return Norm::kL1;
  TORCH_CHECK(false, "pgd_update_cpu_: unknown norm '", norm, "' (valid: linf, l2, l1)");
}

// Sizes of the (M, C, H, W) view: the sample spans the last min(3, ndim - 1) dims (all of a 1-D tensor).
struct Geometry {
  int64_t m, c, h, w;
  int64_t hw() const { return h * w; }
  int64_t sample() const { return c * h * w; }
};

Geometry view4(const at::Tensor& t) {
  const int64_t nd = t.dim();
  const int64_t ns = nd <= 1 ? nd : std::min<int64_t>(3, nd - 1);
  int64_t chw[3] = {1, 1, 1};
  for (int64_t i = 0; i < ns; ++i) chw[3 - ns + i] = t.size(nd - ns + i);
  int64_t m = 1;
  for (int64_t i = 0; i < nd - ns; ++i) m *= t.size(i);
  return {m, chw[0], chw[1], chw[2]};
}

template <typename acc_t>
inline acc_t clamp_nan(acc_t v, acc_t lo, acc_t hi) {
  // std::max/min return their first argument when a comparison with NaN is false: NaN propagates as in
  // torch.clamp, which the reference uses.
  return std::min(std::max(v, lo), hi);
}

template <typename acc_t>
inline acc_t sign_step(acc_t g, acc_t step) {
  return g > acc_t(0) ? step : (g < acc_t(0) ? -step : acc_t(0));  // torch.sign: sign(0) = sign(NaN) = 0
}

template <typename scalar_t, typename out_t>
struct Update {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* d;
  const scalar_t* g;
  const scalar_t* x;  // nullptr: no box clamp and no out_x
  out_t* out;         // nullptr: no model input to write
  const float* mean;  // nullptr: no normalisation
  const float* std;
  int64_t nx;         // x broadcasts with period nx over the flat index
  Geometry geo;
  int64_t so[4];      // out_x element strides of the (M, C, H, W) view
  acc_t step, eps, lo, hi;
  bool box;

  // Last sweep over one (sample m, channel c) plane: y = value_of(i), box clamp, store delta, write the model
  // input. x's offset is computed once per plane (x spans whole planes whenever it spans a sample); only an x
  // smaller than a plane needs the per-element modulo.
  template <typename F>
  inline void finish_plane(int64_t m, int64_t c, F&& value_of) const {
    const int64_t hw = geo.hw();
    const int64_t base = (m * geo.c + c) * hw;
    const bool plane_x = x != nullptr && nx % hw == 0;
    const scalar_t* xp = plane_x ? x + base % nx : nullptr;
    const acc_t mu = mean ? static_cast<acc_t>(mean[c]) : acc_t(0);
    const acc_t sd = std ? static_cast<acc_t>(std[c]) : acc_t(1);
    if (out == nullptr && (x == nullptr || !box || plane_x)) {  // the hot path: one contiguous, vectorisable loop
      scalar_t* dp = d + base;
      for (int64_t j = 0; j < hw; ++j) {
        acc_t y = value_of(base + j);
        if (box) {
          const acc_t xi = static_cast<acc_t>(xp[j]);
          y = clamp_nan<acc_t>(xi + y, lo, hi) - xi;
        }
        dp[j] = static_cast<scalar_t>(y);
      }
      return;
    }
    for (int64_t hh = 0; hh < geo.h; ++hh) {
      const int64_t row = base + hh * geo.w;
      for (int64_t ww = 0; ww < geo.w; ++ww) {
        const int64_t i = row + ww;
        acc_t y = value_of(i);
        acc_t xi = acc_t(0);
        if (x != nullptr) {
          xi = static_cast<acc_t>(plane_x ? xp[i - base] : x[i % nx]);
          if (box) y = clamp_nan<acc_t>(xi + y, lo, hi) - xi;
        }
        d[i] = static_cast<scalar_t>(y);
        if (out != nullptr) {
          // The model input of the stored delta (rounded to delta's dtype first).
          const acc_t v = (xi + static_cast<acc_t>(static_cast<scalar_t>(y)) - mu) / sd;
          out[m * so[0] + c * so[1] + hh * so[2] + ww * so[3]] = static_cast<out_t>(v);
        }
      }
    }
  }

  void linf() const {
    const int64_t planes = geo.m * geo.c;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, geo.hw()));
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        finish_plane(p / geo.c, p % geo.c, [&](int64_t i) {
          return clamp_nan<acc_t>(static_cast<acc_t>(d[i]) + sign_step<acc_t>(static_cast<acc_t>(g[i]), step), -eps,
                                  eps);
        });
      }
    });
  }

  void per_sample(bool l2) const {
    const int64_t s = geo.sample();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s));
    at::parallel_for(0, geo.m, grain, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* gs = g + m * s;
        acc_t scale_g = step;  // l2: step / (||g||_2 + 1e-10); l1: step * sign(g)
        if (l2) {
          double ss = 0.0;
          for (int64_t i = 0; i < s; ++i) {
            const double v = static_cast<double>(gs[i]);
            ss += v * v;
          }
          scale_g = step / (static_cast<acc_t>(std::sqrt(ss)) + acc_t(1e-10));
        }
        // Sweep 2: the norm of the stepped delta. Sweep 3 recomputes the step (d and g are still in cache)
        // rather than storing it, so half-precision delta is rounded once, as in the fp32 reference.
        auto stepped = [&](int64_t i) {
          const acc_t gi = static_cast<acc_t>(g[i]);
          return static_cast<acc_t>(d[i]) + (l2 ? gi * scale_g : sign_step<acc_t>(gi, step));
        };
        double norm = 0.0;
        for (int64_t i = m * s; i < (m + 1) * s; ++i) {
          const acc_t y = stepped(i);
          norm += l2 ? static_cast<double>(y) * y : std::fabs(static_cast<double>(y));
        }
        const acc_t n = static_cast<acc_t>(l2 ? std::sqrt(norm) : norm);
        const acc_t factor = std::min<acc_t>(eps / n, acc_t(1));  // NaN norm -> NaN factor, as in the reference
        for (int64_t c = 0; c < geo.c; ++c) {
          finish_plane(m, c, [&](int64_t i) { return stepped(i) * factor; });
        }
      }
    });
  }
};

}  // namespace

void pgd_update_cpu_(at::Tensor delta, const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                     const c10::optional<at::Tensor>& out_x, const c10::optional<at::Tensor>& mean,
                     const c10::optional<at::Tensor>& std, double step, double eps, c10::optional<double> lower,
                     c10::optional<double> upper, bool descend, const std::string& norm,
                     const c10::optional<std::vector<int64_t>>& out_strides) {
  TORCH_CHECK(delta.device().is_cpu() && grad.device().is_cpu(), "pgd_update_cpu_: tensors must be on CPU");
  TORCH_CHECK(delta.is_contiguous() && grad.is_contiguous(), "pgd_update_cpu_: delta and grad must be contiguous");
  TORCH_CHECK(grad.numel() == delta.numel() && grad.scalar_type() == delta.scalar_type(),
              "pgd_update_cpu_: grad must match delta in size and dtype");
  const Norm kind = parse_norm(norm);
  const int64_t n = delta.numel();
  int64_t nx = n;
  if (x.has_value()) {
    TORCH_CHECK(x->is_cpu() && x->is_contiguous() && x->scalar_type() == delta.scalar_type(),
                "pgd_update_cpu_: x must be a contiguous CPU tensor of delta's dtype");
    nx = x->numel();
    TORCH_CHECK(nx > 0 && n % nx == 0, "pgd_update_cpu_: x.numel() must divide delta.numel()");
  }
  const bool has_out = out_x.has_value();
  if (has_out) {
    TORCH_CHECK(x.has_value(), "pgd_update_cpu_: out_x needs x");
    TORCH_CHECK(out_x->is_cpu() && out_x->numel() == n, "pgd_update_cpu_: out_x must be a CPU tensor like delta");
    TORCH_CHECK(out_strides.has_value() && out_strides->size() == 4, "pgd_update_cpu_: out_strides must hold 4 ints");
  }
  const Geometry geo = view4(delta);
  for (const auto* t : {&mean, &std}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->is_cpu() && (*t)->is_contiguous() && (*t)->scalar_type() == at::kFloat &&
                      (*t)->numel() == geo.c,
                  "pgd_update_cpu_: mean/std must be contiguous float32 CPU tensors with one value per channel");
    }
  }
  if (n == 0) return;
  const bool box = x.has_value() && (lower.has_value() || upper.has_value());
  const at::ScalarType out_type = has_out ? out_x->scalar_type() : delta.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "pgd_update_cpu_", [&] {
    using scalar_t_ = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "pgd_update_cpu_out", [&] {
      using out_t = scalar_t;
      using acc_t = at::opmath_type<scalar_t_>;
      const acc_t inf = std::numeric_limits<acc_t>::infinity();
      Update<scalar_t_, out_t> u{};
      u.d = delta.data_ptr<scalar_t_>();
      u.g = grad.data_ptr<scalar_t_>();
      u.x = x.has_value() ? x->data_ptr<scalar_t_>() : nullptr;
      u.out = has_out ? out_x->data_ptr<out_t>() : nullptr;
      u.mean = mean.has_value() ? mean->data_ptr<float>() : nullptr;
      u.std = std.has_value() ? std->data_ptr<float>() : nullptr;
      u.nx = nx;
      u.geo = geo;
      for (int k = 0; k < 4; ++k) u.so[k] = has_out ? (*out_strides)[k] : 0;
      u.step = static_cast<acc_t>(descend ? -step : step);
      u.eps = static_cast<acc_t>(eps);
      u.lo = lower.has_value() ? static_cast<acc_t>(*lower) : -inf;
      u.hi = upper.has_value() ? static_cast<acc_t>(*upper) : inf;
      u.box = box;
      if (kind == Norm::kLinf) {
        u.linf();
      } else {
        u.per_sample(kind == Norm::kL2);
      }
    });
  });
}

}  // namespace fastpurify
