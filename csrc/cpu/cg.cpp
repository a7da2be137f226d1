// C++ CPU kernels of the conjugate-gradient vector updates (kernel family 3). Contract: fastpurify/ops/cg.py.
//
// cg_step_cpu_: x += alpha p; r -= alpha Ap; rr_new = ||r||^2 per system, alpha = rr / pAp read from the
// per-system scalars (no host round trip in the caller). One read of x, r, p, Ap and one write of x and r
// (24 B/element in fp32) instead of the three eager passes (36 B/element plus temporaries). The sum of
// squares is reduced in two phases: fixed-size chunks produce partial sums in parallel, then one pass per
// system adds them in chunk order. The chunk size does not depend on the thread count, so results are
// bit-reproducible on any machine with the same build. Lists of tensors (parameter-shaped pieces of one
// vector) are handled in one call: their chunks share the partial-sum buffer, so each system still gets
// one ||r||^2 across all pieces.
// cg_direction_cpu_: p = r + beta p with beta = rr_new / rr, one read of r and p, one write of p.
// Systems that are inactive (rr <= tol^2 or status < 0) are skipped entirely: their vectors stay bit-identical.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace fastpurify {

namespace {

// Elements per task: large enough to amortise the task overhead (~1 us), small enough that 11.2 M unknowns
// give hundreds of tasks to balance over the threads.
constexpr int64_t kChunk = 1 << 15;
constexpr int kLanes = 8;  // independent accumulators: lets the compiler vectorise the sum without -ffast-math

struct Layout {
  int64_t nsys = 1;
  std::vector<int64_t> n;       // row length of each tensor
  std::vector<int64_t> chunks;  // chunks per row of each tensor
  std::vector<int64_t> first;   // index of each tensor's first chunk within a system's partials
  int64_t per_sys = 0;          // chunks per system over all tensors
};

Layout make_layout(const std::vector<at::Tensor>& ts, int64_t nsys, const char* who) {
  Layout l;
  l.nsys = nsys;
  for (const auto& t : ts) {
    TORCH_CHECK(t.numel() % nsys == 0, who, ": a tensor of ", t.numel(), " elements does not split into ", nsys,
                " systems");
    const int64_t n = t.numel() / nsys;
    l.n.push_back(n);
    l.first.push_back(l.per_sys);
    l.chunks.push_back((n + kChunk - 1) / kChunk);
    l.per_sys += l.chunks.back();
  }
  return l;
}

void check_vectors(const std::vector<std::vector<at::Tensor>*>& lists, const at::Tensor& like, const char* who) {
  const size_t count = lists.front()->size();
  for (const auto* ts : lists) {
    TORCH_CHECK(ts->size() == count, who, ": the vector arguments must hold the same number of tensors");
    for (size_t i = 0; i < count; ++i) {
      const auto& t = (*ts)[i];
      TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), who, ": vectors must be contiguous CPU tensors");
      TORCH_CHECK(t.scalar_type() == like.scalar_type(), who, ": vectors must have the scalars' dtype ",
                  like.scalar_type(), ", got ", t.scalar_type());
      TORCH_CHECK(t.numel() == (*lists.front())[i].numel(), who, ": tensor ", i, " differs in size across vectors");
    }
  }
}

void check_scalars(const std::vector<const at::Tensor*>& ts, const at::Tensor& rr, const char* who) {
  for (const auto* t : ts) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->numel() == rr.numel(), who,
                ": per-system scalars must be contiguous CPU tensors with ", rr.numel(), " elements");
  }
}

template <typename scalar_t>
inline bool active(scalar_t rr, int32_t status, scalar_t tol2) {
  return rr > tol2 && status >= 0;
}

template <typename scalar_t>
void step_impl(std::vector<at::Tensor>& x, std::vector<at::Tensor>& r, const std::vector<at::Tensor>& p,
               const std::vector<at::Tensor>& ap, const at::Tensor& rr_t, const at::Tensor& pap_t, at::Tensor& rr_new_t,
               at::Tensor& iters_t, at::Tensor& status_t, scalar_t tol2) {
  const int64_t nsys = rr_t.numel();
  const Layout l = make_layout(x, nsys, "cg_step_cpu_");
  const scalar_t* rr = rr_t.data_ptr<scalar_t>();
  const scalar_t* pap = pap_t.data_ptr<scalar_t>();
  const int32_t* status = status_t.data_ptr<int32_t>();
  std::vector<scalar_t> alpha(nsys);
  std::vector<char> on(nsys);
  for (int64_t s = 0; s < nsys; ++s) {
    on[s] = active<scalar_t>(rr[s], status[s], tol2);
    alpha[s] = on[s] ? rr[s] / pap[s] : scalar_t(0);
  }
  // Phase 1: one task per (system, tensor, chunk); each writes its partial sum of r^2.
  std::vector<double> partial(static_cast<size_t>(nsys * l.per_sys), 0.0);
  at::parallel_for(0, nsys * l.per_sys, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / l.per_sys, c = task % l.per_sys;
      if (!on[s]) continue;
      size_t i = 0;
      while (i + 1 < l.first.size() && l.first[i + 1] <= c) ++i;
      const int64_t n = l.n[i];
      const int64_t lo = s * n + (c - l.first[i]) * kChunk;
      const int64_t len = std::min<int64_t>(kChunk, s * n + n - lo);
      scalar_t* xp = x[i].data_ptr<scalar_t>() + lo;
      scalar_t* rp = r[i].data_ptr<scalar_t>() + lo;
      const scalar_t* pp = p[i].data_ptr<scalar_t>() + lo;
      const scalar_t* app = ap[i].data_ptr<scalar_t>() + lo;
      const scalar_t a = alpha[s];
      scalar_t acc[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= len; j += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
          xp[j + k] += a * pp[j + k];
          const scalar_t v = rp[j + k] - a * app[j + k];
          rp[j + k] = v;
          acc[k] += v * v;
        }
      }
      for (; j < len; ++j) {
        xp[j] += a * pp[j];
        const scalar_t v = rp[j] - a * app[j];
        rp[j] = v;
        acc[0] += v * v;
      }
      double sum = 0.0;
      for (int k = 0; k < kLanes; ++k) sum += static_cast<double>(acc[k]);
      partial[task] = sum;
    }
  });
  // Phase 2: per system, the partials in chunk order (deterministic), then the mask and status bookkeeping.
  scalar_t* rr_new = rr_new_t.data_ptr<scalar_t>();
  int32_t* iters = iters_t.data_ptr<int32_t>();
  int32_t* st = status_t.data_ptr<int32_t>();
  for (int64_t s = 0; s < nsys; ++s) {
    if (!on[s]) {
      rr_new[s] = rr[s];
      continue;
    }
    double sum = 0.0;
    for (int64_t c = 0; c < l.per_sys; ++c) sum += partial[s * l.per_sys + c];
    const scalar_t total = static_cast<scalar_t>(sum);
    rr_new[s] = total;
    const int32_t it = ++iters[s];
    if (!std::isfinite(total) || !std::isfinite(pap[s])) {
      st[s] = -it;  // frozen: nothing after a NaN/Inf is meaningful
    } else if (pap[s] <= scalar_t(0) && st[s] == 0) {
      st[s] = it;  // first non-positive curvature: recorded, iteration goes on (as hypertorch's CG does)
    }
  }
}

template <typename scalar_t>
void direction_impl(std::vector<at::Tensor>& p, const std::vector<at::Tensor>& r, const at::Tensor& rr_t,
                    const at::Tensor& rr_new_t, const at::Tensor& status_t, scalar_t tol2) {
  const int64_t nsys = rr_t.numel();
  const Layout l = make_layout(p, nsys, "cg_direction_cpu_");
  const scalar_t* rr = rr_t.data_ptr<scalar_t>();
  const scalar_t* rr_new = rr_new_t.data_ptr<scalar_t>();
  const int32_t* status = status_t.data_ptr<int32_t>();
  std::vector<scalar_t> beta(nsys);
  std::vector<char> on(nsys);
  for (int64_t s = 0; s < nsys; ++s) {
    on[s] = active<scalar_t>(rr[s], status[s], tol2);
    beta[s] = on[s] ? rr_new[s] / rr[s] : scalar_t(0);
  }
  at::parallel_for(0, nsys * l.per_sys, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / l.per_sys, c = task % l.per_sys;
      if (!on[s]) continue;
      size_t i = 0;
      while (i + 1 < l.first.size() && l.first[i + 1] <= c) ++i;
      const int64_t n = l.n[i];
      const int64_t lo = s * n + (c - l.first[i]) * kChunk;
      const int64_t len = std::min<int64_t>(kChunk, s * n + n - lo);
      scalar_t* pp = p[i].data_ptr<scalar_t>() + lo;
      const scalar_t* rp = r[i].data_ptr<scalar_t>() + lo;
      const scalar_t b = beta[s];
      for (int64_t j = 0; j < len; ++j) pp[j] = rp[j] + b * pp[j];
    }
  });
}

}  // namespace

void cg_step_cpu_(std::vector<at::Tensor> x, std::vector<at::Tensor> r, const std::vector<at::Tensor>& p,
                  const std::vector<at::Tensor>& ap, const at::Tensor& rr, const at::Tensor& pap, at::Tensor rr_new,
                  at::Tensor iters, at::Tensor status, double tol2) {
  const char* who = "cg_step_cpu_";
  TORCH_CHECK(!x.empty(), who, ": empty vector list");
  TORCH_CHECK(rr.scalar_type() == at::kFloat || rr.scalar_type() == at::kDouble, who, ": dtype must be float32 or float64");
  TORCH_CHECK(pap.scalar_type() == rr.scalar_type() && rr_new.scalar_type() == rr.scalar_type(), who,
              ": rr, pap and rr_new must share a dtype");
  TORCH_CHECK(iters.scalar_type() == at::kInt && status.scalar_type() == at::kInt, who, ": iters and status must be int32");
  check_scalars({&rr, &pap, &rr_new, &iters, &status}, rr, who);
  std::vector<at::Tensor> pc = p, apc = ap;
  check_vectors({&x, &r, &pc, &apc}, rr, who);
  AT_DISPATCH_FLOATING_TYPES(rr.scalar_type(), "cg_cpu", [&] {
    step_impl<scalar_t>(x, r, p, ap, rr, pap, rr_new, iters, status, static_cast<scalar_t>(tol2));
  });
}

void cg_direction_cpu_(std::vector<at::Tensor> p, const std::vector<at::Tensor>& r, const at::Tensor& rr,
                       const at::Tensor& rr_new, const at::Tensor& status, double tol2) {
  const char* who = "cg_direction_cpu_";
  TORCH_CHECK(!p.empty(), who, ": empty vector list");
  TORCH_CHECK(rr.scalar_type() == at::kFloat || rr.scalar_type() == at::kDouble, who, ": dtype must be float32 or float64");
  TORCH_CHECK(rr_new.scalar_type() == rr.scalar_type() && status.scalar_type() == at::kInt, who,
              ": rr_new must have rr's dtype and status must be int32");
  check_scalars({&rr, &rr_new, &status}, rr, who);
  std::vector<at::Tensor> rc = r;
  check_vectors({&p, &rc}, rr, who);
  AT_DISPATCH_FLOATING_TYPES(rr.scalar_type(), "cg_cpu", [&] {
    direction_impl<scalar_t>(p, r, rr, rr_new, status, static_cast<scalar_t>(tol2));
  });
}

}  // namespace fastpurify
