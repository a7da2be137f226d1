// Torch-facing launchers of the CUDA conjugate-gradient kernels (built only with a CUDA torch): checks, the
// partial-sum buffer and the current stream, then calls into the torch-free csrc/cuda/cg.cu.
// Contract: fastpurify/ops/cg.py. A list of tensors runs phase 1 once per tensor into disjoint slices of one
// partial buffer, then phase 2 once: one ||r||^2 per system over all pieces, no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "cuda/cg.h"

namespace fastpurify {

namespace {

DType cg_dtype(const at::Tensor& t, const char* who) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, who, ": dtype must be float32 or float64");
  return t.scalar_type() == at::kFloat ? DType::kFloat32 : DType::kFloat64;
}

void check_cuda(const std::vector<at::Tensor>& ts, const at::Tensor& like, const char* who) {
  for (const auto& t : ts) {
    TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
                    t.device() == like.device(),
                who, ": vectors must be contiguous CUDA tensors of the scalars' dtype and device");
    TORCH_CHECK(t.numel() % like.numel() == 0, who, ": a tensor does not split into ", like.numel(), " systems");
  }
}

}  // namespace

void cg_step_cuda_(std::vector<at::Tensor> x, std::vector<at::Tensor> r, const std::vector<at::Tensor>& p,
                   const std::vector<at::Tensor>& ap, const at::Tensor& rr, const at::Tensor& pap, at::Tensor rr_new,
                   at::Tensor iters, at::Tensor status, double tol2) {
  const char* who = "cg_step_cuda_";
  const DType dtype = cg_dtype(rr, who);
  TORCH_CHECK(x.size() == r.size() && x.size() == p.size() && x.size() == ap.size() && !x.empty(), who,
              ": x, r, p and ap must hold the same (non-zero) number of tensors");
  for (const auto* t : {&x, &r}) check_cuda(*t, rr, who);
  check_cuda(p, rr, who);
  check_cuda(ap, rr, who);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&rr, &pap, &rr_new, &iters, &status}) {
    TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->numel() == rr.numel(), who,
                ": per-system scalars must be contiguous CUDA tensors with R elements");
  }
  TORCH_CHECK(iters.scalar_type() == at::kInt && status.scalar_type() == at::kInt, who, ": iters/status must be int32");
  const int64_t nsys = rr.numel();
  int64_t per_sys = 0;
  for (const auto& t : x) per_sys += (t.numel() / nsys + kCgTile - 1) / kCgTile;
  const c10::cuda::CUDAGuard guard(rr.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  at::Tensor part = at::empty({std::max<int64_t>(1, nsys * per_sys)}, rr.options());
  int64_t first = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    TORCH_CHECK(r[i].numel() == x[i].numel() && p[i].numel() == x[i].numel() && ap[i].numel() == x[i].numel(), who,
                ": tensor ", i, " differs in size across x, r, p, ap");
    CgStepArgs a;
    a.dtype = dtype;
    a.x = x[i].data_ptr();
    a.r = r[i].data_ptr();
    a.p = p[i].data_ptr();
    a.ap = ap[i].data_ptr();
    a.rr = rr.data_ptr();
    a.pap = pap.data_ptr();
    a.status = status.data_ptr<int32_t>();
    a.part = part.data_ptr();
    a.n = x[i].numel() / nsys;
    a.nsys = nsys;
    a.per_sys = per_sys;
    a.first = first;
    a.tol2 = tol2;
    C10_CUDA_CHECK(cg_step_partial_cuda_launch(a, stream));
    first += (a.n + kCgTile - 1) / kCgTile;
  }
  CgFinalizeArgs f;
  f.dtype = dtype;
  f.part = part.data_ptr();
  f.rr = rr.data_ptr();
  f.pap = pap.data_ptr();
  f.rr_new = rr_new.data_ptr();
  f.iters = iters.data_ptr<int32_t>();
  f.status = status.data_ptr<int32_t>();
  f.nsys = nsys;
  f.per_sys = per_sys;
  f.tol2 = tol2;
  C10_CUDA_CHECK(cg_finalize_cuda_launch(f, stream));
}

void cg_direction_cuda_(std::vector<at::Tensor> p, const std::vector<at::Tensor>& r, const at::Tensor& rr,
                        const at::Tensor& rr_new, const at::Tensor& status, double tol2) {
  const char* who = "cg_direction_cuda_";
  const DType dtype = cg_dtype(rr, who);
  TORCH_CHECK(p.size() == r.size() && !p.empty(), who, ": p and r must hold the same (non-zero) number of tensors");
  check_cuda(p, rr, who);
  check_cuda(r, rr, who);
  for (const auto* t : {&rr, &rr_new, &status}) {
    TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->numel() == rr.numel(), who,
                ": per-system scalars must be contiguous CUDA tensors with R elements");
  }
  TORCH_CHECK(status.scalar_type() == at::kInt, who, ": status must be int32");
  const c10::cuda::CUDAGuard guard(rr.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  for (size_t i = 0; i < p.size(); ++i) {
    TORCH_CHECK(r[i].numel() == p[i].numel(), who, ": tensor ", i, " differs in size between p and r");
    CgDirectionArgs a;
    a.dtype = dtype;
    a.p = p[i].data_ptr();
    a.r = r[i].data_ptr();
    a.rr = rr.data_ptr();
    a.rr_new = rr_new.data_ptr();
    a.status = status.data_ptr<int32_t>();
    a.nsys = rr.numel();
    a.n = p[i].numel() / a.nsys;
    a.tol2 = tol2;
    C10_CUDA_CHECK(cg_direction_cuda_launch(a, stream));
  }
}

}  // namespace fastpurify
