// C++ CPU kernels of the mask-weighted convolution (kernel family 2). Contract: fastpurify/ops/masked_conv.py.
//
// The convolution itself is ATen's (oneDNN on x86): a hand-written CPU conv would not beat it. What is fused
// here is everything around it, each in one pass over memory with at::parallel_for:
//   - W_eff = weight * mask (forward and backward), instead of an eager multiply per layer;
//   - the backward asks at::convolution_backward for dL/dW_eff only when a mask or weight gradient is needed
//     (output_mask), then writes dL/dmask = dW_eff * weight and dL/dweight = dW_eff * mask in one pass;
//   - the multi-tensor kernels walk every layer's tensors in one parallel region (one task list over the
//     concatenated element range: no per-layer dispatch, no small-tensor imbalance);
//   - AWM's mask optimiser step: L1 subgradient + Adam (torch.optim.Adam's arithmetic, in its order) + clamp to
//     [0, 1], one read and one write of each state tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace fastpurify {

namespace {

constexpr int64_t kGrain = 32768;  // elements per task: ~128 KB of fp32 per stream, well above task overhead

// Elementwise out = a * b over one contiguous tensor (the product is rounded once to the tensor's dtype, as the
// eager multiply does).
void mul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "masked_conv_mul", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) o[i] = static_cast<scalar_t>(static_cast<acc_t>(pa[i]) * static_cast<acc_t>(pb[i]));
    });
  });
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na, const char* nb) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", nb, " dtype ", b.scalar_type(), " != ", na, " dtype ",
              a.scalar_type());
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", nb, " shape ", b.sizes(), " != ", na, " shape ", a.sizes());
}

at::Tensor weff_of(const at::Tensor& weight, const at::Tensor& mask) {
  at::Tensor w = weight.contiguous(), m = mask.contiguous();
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  mul_into(out, w, m);
  return out;
}

// Task list over a list of tensors: element ranges [start[i], start[i+1]) of a virtual concatenation.
std::vector<int64_t> prefix(const std::vector<at::Tensor>& ts) {
  std::vector<int64_t> start(ts.size() + 1, 0);
  for (size_t i = 0; i < ts.size(); ++i) start[i + 1] = start[i] + ts[i].numel();
  return start;
}

// Calls f(tensor index, begin, end) for the pieces of [lo, hi) of the virtual concatenation.
template <typename F>
void for_pieces(const std::vector<int64_t>& start, int64_t lo, int64_t hi, const F& f) {
  size_t t = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
  while (lo < hi && t + 1 < start.size()) {
    const int64_t end = std::min(hi, start[t + 1]);
    if (end > lo) f(t, lo - start[t], end - start[t]);
    lo = end;
    ++t;
  }
}

void check_lists(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                 const std::vector<at::Tensor>& c, const char* op) {
  TORCH_CHECK(a.size() == b.size() && a.size() == c.size(), op, ": lists of different lengths ", a.size(), ", ",
              b.size(), ", ", c.size());
  for (size_t i = 0; i < a.size(); ++i) {
    check_pair(a[i], b[i], op, "first", "second");
    check_pair(a[i], c[i], op, "first", "third");
    TORCH_CHECK(a[i].is_contiguous() && b[i].is_contiguous() && c[i].is_contiguous(), op,
                ": tensor ", i, " is not contiguous");
    TORCH_CHECK(a[i].scalar_type() == a[0].scalar_type(), op, ": all tensors must share one dtype");
  }
}

// out[i] = a[i] * b[i] for every i, one parallel region.
void multi_mul(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, std::vector<at::Tensor>& out,
               const char* op) {
  check_lists(a, b, out, op);
  if (a.empty()) return;
  const auto start = prefix(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[0].scalar_type(), "masked_conv_multi_mul", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, start.back(), kGrain, [&](int64_t lo, int64_t hi) {
      for_pieces(start, lo, hi, [&](size_t t, int64_t b0, int64_t b1) {
        const scalar_t* pa = a[t].data_ptr<scalar_t>();
        const scalar_t* pb = b[t].data_ptr<scalar_t>();
        scalar_t* o = out[t].data_ptr<scalar_t>();
        for (int64_t i = b0; i < b1; ++i)
          o[i] = static_cast<scalar_t>(static_cast<acc_t>(pa[i]) * static_cast<acc_t>(pb[i]));
      });
    });
  });
}

}  // namespace

at::Tensor masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                             const c10::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                             std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
  check_pair(weight, mask, "masked_conv2d_cpu", "weight", "mask");
  return at::conv2d(x, weff_of(weight, mask), bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& gout, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
    bool need_x, bool need_mask, bool need_weight, bool need_bias) {
  check_pair(weight, mask, "masked_conv2d_backward_cpu", "weight", "mask");
  const bool need_w = need_mask || need_weight;
  // W_eff is recomputed (one pass over the weights) rather than saved: the forward keeps no extra tensor alive.
  at::Tensor weff = weff_of(weight, mask);
  c10::OptionalArrayRef<int64_t> bias_sizes;
  std::vector<int64_t> bsz = {weight.size(0)};
  if (need_bias) bias_sizes = bsz;
  at::Tensor gx, gw, gb;
  std::tie(gx, gw, gb) = at::convolution_backward(gout, x, weff, bias_sizes, stride, padding, dilation, false,
                                                  {0, 0}, groups, {need_x, need_w, need_bias});
  at::Tensor gmask, gweight;
  if (need_w) {
    gw = gw.contiguous();
    const at::Tensor w = weight.contiguous(), m = mask.contiguous();
    if (need_mask) gmask = at::empty_like(w, at::MemoryFormat::Contiguous);
    if (need_weight) gweight = at::empty_like(w, at::MemoryFormat::Contiguous);
    // Epilogue: both products from one read of dW_eff.
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "masked_conv2d_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* pg = gw.data_ptr<scalar_t>();
      const scalar_t* pw = w.data_ptr<scalar_t>();
      const scalar_t* pm = m.data_ptr<scalar_t>();
      scalar_t* om = need_mask ? gmask.data_ptr<scalar_t>() : nullptr;
      scalar_t* ow = need_weight ? gweight.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          const acc_t g = static_cast<acc_t>(pg[i]);
          if (om) om[i] = static_cast<scalar_t>(g * static_cast<acc_t>(pw[i]));
          if (ow) ow[i] = static_cast<scalar_t>(g * static_cast<acc_t>(pm[i]));
        }
      });
    });
  }
  return std::make_tuple(gx, gmask, gweight, gb);
}

void build_masked_weights_cpu_(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& masks,
                               std::vector<at::Tensor> outs) {
  multi_mul(weights, masks, outs, "build_masked_weights_cpu_");
}

void mask_grads_cpu_(const std::vector<at::Tensor>& grad_weffs, const std::vector<at::Tensor>& weights,
                     std::vector<at::Tensor> out_grads) {
  multi_mul(grad_weffs, weights, out_grads, "mask_grads_cpu_");
}

void masked_adam_clamp_cpu_(std::vector<at::Tensor> masks, const std::vector<at::Tensor>& grads,
                            std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs, double lr,
                            double beta1, double beta2, double eps, double l1, int64_t step) {
  check_lists(masks, grads, exp_avgs, "masked_adam_clamp_cpu_");
  check_lists(masks, exp_avg_sqs, exp_avgs, "masked_adam_clamp_cpu_");
  TORCH_CHECK(step >= 1, "masked_adam_clamp_cpu_: step must be >= 1, got ", step);
  if (masks.empty()) return;
  // Scalars in double, then rounded once to the compute type, as torch does with Python scalars.
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  const double step_size = lr / bc1;
  const auto start = prefix(masks);
  AT_DISPATCH_FLOATING_TYPES(masks[0].scalar_type(), "masked_adam_clamp_cpu_", [&] {
    using acc_t = scalar_t;
    const acc_t w1 = static_cast<acc_t>(1.0 - beta1), b2 = static_cast<acc_t>(beta2);
    const acc_t w2 = static_cast<acc_t>(1.0 - beta2), c2 = static_cast<acc_t>(bc2_sqrt);
    const acc_t e = static_cast<acc_t>(eps), ss = static_cast<acc_t>(-step_size), lam = static_cast<acc_t>(l1);
    const bool has_l1 = l1 != 0.0;
    at::parallel_for(0, start.back(), kGrain, [&](int64_t lo, int64_t hi) {
      for_pieces(start, lo, hi, [&](size_t t, int64_t b0, int64_t b1) {
        scalar_t* m = masks[t].data_ptr<scalar_t>();
        const scalar_t* gp = grads[t].data_ptr<scalar_t>();
        scalar_t* ea = exp_avgs[t].data_ptr<scalar_t>();
        scalar_t* es = exp_avg_sqs[t].data_ptr<scalar_t>();
        for (int64_t i = b0; i < b1; ++i) {
          const acc_t mv = m[i];
          acc_t g = gp[i];
          if (has_l1) {  // L1 subgradient with torch.sign's convention (sign(0) = 0)
            const acc_t sg = mv > acc_t(0) ? acc_t(1) : (mv < acc_t(0) ? acc_t(-1) : acc_t(0));
            g = g + lam * sg;
          }
          const acc_t a = ea[i] + w1 * (g - ea[i]);  // lerp with weight < 0.5, as ATen evaluates it
          const acc_t s = es[i] * b2 + w2 * g * g;   // mul_(beta2).addcmul_(g, g, value=1 - beta2)
          const acc_t denom = std::sqrt(s) / c2 + e;
          acc_t nm = mv + ss * a / denom;          // addcdiv_(exp_avg, denom, value=-step_size)
          nm = std::min(std::max(nm, acc_t(0)), acc_t(1));  // clamp keeping NaN (see pgd.cpp)
          ea[i] = a;
          es[i] = s;
          m[i] = nm;
        }
      });
    });
  });
}

}  // namespace fastpurify
