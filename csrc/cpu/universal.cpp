// C++ CPU kernel of the universal-perturbation update (kernel family 1). Contract: fastpurify/ops/universal.py.
//
// delta: K perturbations of S = C*H*W elements; grad: K batches of B rows of S. Work is split into tasks of
// (perturbation k, a fixed chunk of kChunk columns): each task streams the B gradient rows of its chunk into
// an accumulator that stays in L1 (one pass over grad, the hot part), adds the penalty, steps, and writes delta
// (none / linf) or the stepped value and the chunk's partial norm (l2 / l1). For l2/l1 a short second pass
// rescales each perturbation by min(1, radius / norm). The chunk size is a constant, not derived from the
// thread count, so the partial norms and their sum (in chunk order) are the same on any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace fastpurify {

namespace {

enum class UNorm { kNone, kL2, kL1, kLinf };

UNorm parse_unorm(const std::string& norm) {
  if (norm == "none") return UNorm::kNone;
  if (norm == "l2") return UNorm::kL2;
  if (norm == "l1") return UNorm::kL1;
  if (norm == "linf") return UNorm::kLinf;
  TORCH_CHECK(false, "universal_update_cpu_: unknown norm '", norm, "' (valid: none, l2, l1, linf)");
}

// Columns per task: at least 2048, and otherwise about a quarter of a thread's share, so that each task streams
// long contiguous row segments (the prefetcher keeps up) into an accumulator that stays in L2. Measured on 2
// threads, (128, 3, 224, 224) fp32: fixed 2048-column chunks ran at 0.6-0.75x the eager grad.sum(0) chain
// (128 interleaved short streams per task); see benchmarks/results/cpu-amd-epyc-2t/summary.md for the fix.
int64_t chunk_columns(int64_t s) {
  const int64_t share = (s + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  return std::max<int64_t>(2048, share);
}

template <typename scalar_t>
void run(scalar_t* d, const scalar_t* g, int64_t k, int64_t b, int64_t s, double step, bool mean, double wd,
         UNorm norm, double radius) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t kChunk = chunk_columns(s);
  const int64_t nchunks = (s + kChunk - 1) / kChunk;
  const bool rescale = norm == UNorm::kL2 || norm == UNorm::kL1;
  // The stepped value kept in the accumulation type until the rescale, so a half-precision delta is rounded
  // once, as in the fp32 reference.
  std::vector<acc_t> ybuf(rescale ? static_cast<size_t>(k * s) : 0);
  std::vector<double> partial(rescale ? static_cast<size_t>(k * nchunks) : 0, 0.0);
  // Scalars are rounded once to the compute type, as torch does with Python scalars in the reference.
  const acc_t st = static_cast<acc_t>(step), wd2 = static_cast<acc_t>(2.0 * wd), r = static_cast<acc_t>(radius);
  const acc_t nb = static_cast<acc_t>(b);
  at::parallel_for(0, k * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(kChunk);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t kk = t / nchunks, j0 = (t % nchunks) * kChunk, len = std::min(kChunk, s - j0);
      std::fill(acc.begin(), acc.begin() + len, acc_t(0));
      for (int64_t bb = 0; bb < b; ++bb) {  // the batch reduction: rows in order, contiguous (vectorisable)
        const scalar_t* row = g + (kk * b + bb) * s + j0;
        for (int64_t j = 0; j < len; ++j) acc[j] += static_cast<acc_t>(row[j]);
      }
      scalar_t* dp = d + kk * s + j0;
      double part = 0.0;
      for (int64_t j = 0; j < len; ++j) {
        const acc_t di = static_cast<acc_t>(dp[j]);
        acc_t gi = mean ? acc[j] / nb : acc[j];
        if (wd != 0.0) gi = gi + wd2 * di;  // weight_decay = 0 adds nothing (keeps an infinite delta infinite)
        acc_t y = di + st * gi;
        if (norm == UNorm::kLinf) {
          // std::max/min keep a NaN first argument: NaN propagates as in torch.clamp.
          y = std::min(std::max(y, -r), r);
        }
        if (rescale) {
          ybuf[kk * s + j0 + j] = y;
          part += norm == UNorm::kL2 ? static_cast<double>(y) * y : std::fabs(static_cast<double>(y));
        } else {
          dp[j] = static_cast<scalar_t>(y);
        }
      }
      if (rescale) partial[t] = part;
    }
  });
  if (!rescale) return;
  std::vector<acc_t> factor(k);
  for (int64_t kk = 0; kk < k; ++kk) {
    double total = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) total += partial[kk * nchunks + c];
    const acc_t n = static_cast<acc_t>(norm == UNorm::kL2 ? std::sqrt(total) : total);
    const acc_t f = r / n;
    factor[kk] = f > acc_t(1) ? acc_t(1) : f;  // min(1, radius/norm), keeping a NaN norm NaN; 0 norm -> 1
  }
  at::parallel_for(0, k * nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t kk = t / nchunks, j0 = (t % nchunks) * kChunk, len = std::min(kChunk, s - j0);
      const acc_t f = factor[kk];
      const acc_t* yp = ybuf.data() + kk * s + j0;
      scalar_t* dp = d + kk * s + j0;
      for (int64_t j = 0; j < len; ++j) dp[j] = static_cast<scalar_t>(yp[j] * f);
    }
  });
}

}  // namespace

void universal_update_cpu_(at::Tensor delta, const at::Tensor& grad, int64_t k, int64_t b, double step, bool mean,
                           double weight_decay, const std::string& norm, double radius, bool descend) {
  TORCH_CHECK(delta.device().is_cpu() && grad.device().is_cpu(), "universal_update_cpu_: tensors must be on CPU");
  TORCH_CHECK(delta.is_contiguous() && grad.is_contiguous(),
              "universal_update_cpu_: delta and grad must be contiguous");
  TORCH_CHECK(grad.scalar_type() == delta.scalar_type(), "universal_update_cpu_: grad dtype must match delta's");
  TORCH_CHECK(k > 0 && b > 0 && delta.numel() % k == 0, "universal_update_cpu_: bad K=", k, " or B=", b);
  const int64_t s = delta.numel() / k;
  TORCH_CHECK(grad.numel() == k * b * s, "universal_update_cpu_: grad must hold K*B*S = ", k * b * s,
              " elements, got ", grad.numel());
  const UNorm kind = parse_unorm(norm);
  if (s == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "universal_update_cpu_", [&] {
    run<scalar_t>(delta.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), k, b, s, descend ? -step : step, mean,
                  weight_decay, kind, radius);
  });
}

}  // namespace fastpurify
