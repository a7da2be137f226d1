// C++ CPU kernels of SAU's dual-logit loss (kernel family 1). Contract: fastpurify/ops/dual_logit.py.
//
// Forward: one task per row (parallel over rows): max/argmax, the two softmaxes, the masked cross-entropies and
// the Jensen-Shannon term of the row; each row writes its masks and its two loss terms, and the loss is the
// sum of the terms in row order (deterministic on any number of threads). Backward: one task per row writes
// dL/dz and dL/dz0 from the saved masks and the upstream gradient, recomputing the softmaxes (a row of C <= 1000
// logits stays in L1).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace fastpurify {

namespace {

constexpr double kProbFloor = 1e-8;  // SAU floors both softmaxes at 1e-8 before the logarithms

// Softmax statistics of one row: max, argmax (first maximal index; a NaN counts as the maximum, as in
// torch.argmax) and sum of exp(z - max).
template <typename scalar_t, typename acc_t>
struct RowStats {
  acc_t max, sum;
  int64_t arg;
  RowStats(const scalar_t* z, int64_t c) : max(static_cast<acc_t>(z[0])), sum(0), arg(0) {
    for (int64_t j = 1; j < c; ++j) {
      const acc_t v = static_cast<acc_t>(z[j]);
      if (v > max || (std::isnan(v) && !std::isnan(max))) {
        max = v;
        arg = j;
      }
    }
    for (int64_t j = 0; j < c; ++j) sum += std::exp(static_cast<acc_t>(z[j]) - max);
  }
  acc_t prob(const scalar_t* z, int64_t j) const { return std::exp(static_cast<acc_t>(z[j]) - max) / sum; }
  // log_softmax at j, written as F.log_softmax computes it: z - max - log(sum)
  acc_t log_prob(const scalar_t* z, int64_t j) const { return static_cast<acc_t>(z[j]) - max - std::log(sum); }
};

// Label -> its log-probability, NaN for a label outside [0, C) (not checked on the host: that would sync a GPU).
template <typename scalar_t, typename acc_t>
acc_t label_log_prob(const RowStats<scalar_t, acc_t>& st, const scalar_t* z, int64_t y, int64_t c) {
  return (y >= 0 && y < c) ? st.log_prob(z, y) : std::numeric_limits<acc_t>::quiet_NaN();
}

template <typename scalar_t>
void forward(const scalar_t* z, const scalar_t* z0, const int64_t* y, const int64_t* yhat, const int64_t* yhat0,
             bool* a, bool* a0, bool* s, int64_t b, int64_t c, double beta1, double beta2, at::Tensor& loss) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> adv(b), share(b);
  const acc_t floor = static_cast<acc_t>(kProbFloor), half = acc_t(0.5);
  at::parallel_for(0, b, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, c)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* zr = z + i * c;
      const scalar_t* z0r = z0 + i * c;
      const RowStats<scalar_t, acc_t> st(zr, c), st0(z0r, c);
      const bool ai = st.arg != yhat[i], a0i = st0.arg != yhat0[i];
      const bool si = ai && a0i && st.arg == st0.arg;
      a[i] = ai;
      a0[i] = a0i;
      s[i] = si;
      acc_t t = acc_t(0);
      if (!ai) t += -label_log_prob(st, zr, y[i], c);
      if (!a0i) t += -label_log_prob(st0, z0r, y[i], c);
      adv[i] = t;
      acc_t js = acc_t(0);
      if (!si) {
        for (int64_t j = 0; j < c; ++j) {
          // std::max(p, floor) keeps a NaN p (its comparison is false), as torch.clamp does.
          const acc_t p = std::max(st.prob(zr, j), floor), p0 = std::max(st0.prob(z0r, j), floor);
          const acc_t m = half * (p + p0), lm = std::log(m);
          js += half * (p * std::log(p) + p0 * std::log(p0)) - half * (p * lm + p0 * lm);
        }
      }
      share[i] = js;
    }
  });
  double sa = 0.0, ss = 0.0;  // row order: the same loss on any number of threads
  for (int64_t i = 0; i < b; ++i) {
    sa += adv[i];
    ss += share[i];
  }
  const double n = static_cast<double>(b);
  loss.fill_(beta1 * (-sa / 2.0 / n) + beta2 * (ss / n));
}

template <typename scalar_t>
void backward(const scalar_t* z, const scalar_t* z0, const int64_t* y, const bool* a, const bool* a0, const bool* s,
              double gout, scalar_t* gz, scalar_t* gz0, int64_t b, int64_t c, double beta1, double beta2) {
  using acc_t = at::opmath_type<scalar_t>;
  const double n = static_cast<double>(b);
  const acc_t c_adv = static_cast<acc_t>(-(gout * beta1) / 2.0 / n);  // d loss / d CE_i of an unmasked row
  const acc_t c_js = static_cast<acc_t>((gout * beta2) / n);            // d loss / d JS_i of an unmasked row
  const acc_t floor = static_cast<acc_t>(kProbFloor), half = acc_t(0.5);
  at::parallel_for(0, b, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, c)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> u(c), u0(c);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* zr = z + i * c;
      const scalar_t* z0r = z0 + i * c;
      const RowStats<scalar_t, acc_t> st(zr, c), st0(z0r, c);
      const acc_t ca = a[i] ? acc_t(0) : c_adv, ca0 = a0[i] ? acc_t(0) : c_adv, cs = s[i] ? acc_t(0) : c_js;
      const int64_t yi = y[i];
      const acc_t bad = (yi >= 0 && yi < c) ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
      // dJS/dp_j = 0.5·(log q_j − log m_j) where the floor did not act (q = max(p, 1e-8)), else 0; then the
      // softmax backward p_j·(u_j − Σ_k p_k u_k).
      acc_t dot = acc_t(0), dot0 = acc_t(0);
      if (!s[i]) {
        for (int64_t j = 0; j < c; ++j) {
          const acc_t p = st.prob(zr, j), p0 = st0.prob(z0r, j);
          const acc_t q = std::max(p, floor), q0 = std::max(p0, floor), lm = std::log(half * (q + q0));
          u[j] = p >= floor ? half * (std::log(q) - lm) : acc_t(0);
          u0[j] = p0 >= floor ? half * (std::log(q0) - lm) : acc_t(0);
          dot += p * u[j];
          dot0 += p0 * u0[j];
        }
      }
      for (int64_t j = 0; j < c; ++j) {
        const acc_t p = st.prob(zr, j), p0 = st0.prob(z0r, j), onehot = j == yi ? acc_t(1) : acc_t(0);
        acc_t g = acc_t(0), g0 = acc_t(0);
        if (!a[i]) g += ca * (p - onehot + bad);
        if (!a0[i]) g0 += ca0 * (p0 - onehot + bad);
        if (!s[i]) {
          g += cs * (p * (u[j] - dot));
          g0 += cs * (p0 * (u0[j] - dot0));
        }
        gz[i * c + j] = static_cast<scalar_t>(g);
        gz0[i * c + j] = static_cast<scalar_t>(g0);
      }
    }
  });
}

void check_inputs(const char* fn, const at::Tensor& z, const at::Tensor& z0, std::initializer_list<at::Tensor> rows) {
  TORCH_CHECK(z.device().is_cpu() && z0.device().is_cpu(), fn, ": tensors must be on CPU");
  TORCH_CHECK(z.dim() == 2 && z.sizes() == z0.sizes() && z.is_contiguous() && z0.is_contiguous() &&
                  z.scalar_type() == z0.scalar_type(),
              fn, ": z and z0 must be contiguous (B, C) tensors of one dtype");
  for (const auto& t : rows) {
    TORCH_CHECK(t.is_cpu() && t.is_contiguous() && t.dim() == 1 && t.size(0) == z.size(0), fn,
                ": label and mask tensors must be contiguous (B,) CPU tensors");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_logit_loss_cpu(
    const at::Tensor& z, const at::Tensor& z0, const at::Tensor& y, const at::Tensor& yhat, const at::Tensor& yhat0,
    double beta1, double beta2) {
  check_inputs("dual_logit_loss_cpu", z, z0, {y, yhat, yhat0});
  for (const auto* t : {&y, &yhat, &yhat0}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, "dual_logit_loss_cpu: labels must be int64");
  }
  const int64_t b = z.size(0), c = z.size(1);
  TORCH_CHECK(b > 0 && c > 0, "dual_logit_loss_cpu: z must have at least one row and one class");
  const auto acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({}, z.options().dtype(acc_type));
  at::Tensor a = at::empty({b}, z.options().dtype(at::kBool));
  at::Tensor a0 = at::empty({b}, z.options().dtype(at::kBool));
  at::Tensor s = at::empty({b}, z.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dual_logit_loss_cpu", [&] {
    forward<scalar_t>(z.data_ptr<scalar_t>(), z0.data_ptr<scalar_t>(), y.data_ptr<int64_t>(),
                      yhat.data_ptr<int64_t>(), yhat0.data_ptr<int64_t>(), a.data_ptr<bool>(), a0.data_ptr<bool>(),
                      s.data_ptr<bool>(), b, c, beta1, beta2, loss);
  });
  return {loss, a, a0, s};
}

std::tuple<at::Tensor, at::Tensor> dual_logit_loss_backward_cpu(const at::Tensor& z, const at::Tensor& z0,
                                                                 const at::Tensor& y, const at::Tensor& a,
                                                                 const at::Tensor& a0, const at::Tensor& s,
                                                                 const at::Tensor& gout, double beta1, double beta2) {
  check_inputs("dual_logit_loss_backward_cpu", z, z0, {y, a, a0, s});
  TORCH_CHECK(y.scalar_type() == at::kLong, "dual_logit_loss_backward_cpu: labels must be int64");
  for (const auto* t : {&a, &a0, &s}) {
    TORCH_CHECK(t->scalar_type() == at::kBool, "dual_logit_loss_backward_cpu: masks must be bool");
  }
  TORCH_CHECK(gout.numel() == 1 && gout.is_cpu(), "dual_logit_loss_backward_cpu: gout must be a one-element CPU tensor");
  const int64_t b = z.size(0), c = z.size(1);
  at::Tensor gz = at::empty_like(z), gz0 = at::empty_like(z0);
  if (b == 0 || c == 0) return {gz, gz0};
  const double g = gout.to(at::kDouble).item<double>();  // a CPU tensor: no device sync
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dual_logit_loss_backward_cpu", [&] {
    backward<scalar_t>(z.data_ptr<scalar_t>(), z0.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), a.data_ptr<bool>(),
                       a0.data_ptr<bool>(), s.data_ptr<bool>(), g, gz.data_ptr<scalar_t>(), gz0.data_ptr<scalar_t>(), b,
                       c, beta1, beta2);
  });
  return {gz, gz0};
}

}  // namespace fastpurify
