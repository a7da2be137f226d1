// Torch-facing launcher of the CUDA PGD kernels (built only with a CUDA torch): checks, dtype mapping and the
// current stream, then one call into the torch-free csrc/cuda/pgd.cu. Contract: fastpurify/ops/pgd.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <string>
#include <vector>

#include "cuda/pgd.h"

namespace fastpurify {

static DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fastpurify CUDA kernels: unsupported dtype ", t);
  }
}

void pgd_update_cuda_(at::Tensor delta, const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                      const c10::optional<at::Tensor>& out_x, const c10::optional<at::Tensor>& mean,
                      const c10::optional<at::Tensor>& std, double step, double eps, c10::optional<double> lower,
                      c10::optional<double> upper, bool descend, const std::string& norm,
                      const c10::optional<std::vector<int64_t>>& out_strides) {
  TORCH_CHECK(delta.is_cuda() && grad.is_cuda(), "pgd_update_cuda_: tensors must be CUDA tensors");
  TORCH_CHECK(delta.is_contiguous() && grad.is_contiguous(), "pgd_update_cuda_: delta and grad must be contiguous");
  TORCH_CHECK(grad.numel() == delta.numel() && grad.scalar_type() == delta.scalar_type(),
              "pgd_update_cuda_: grad must match delta in size and dtype");
  PgdArgs a;
  if (norm == "linf") a.norm = PgdNorm::kLinf;
  else if (norm == "l2") a.norm = PgdNorm::kL2;
  else if (norm == "l1") a.norm = PgdNorm::kL1;
  else TORCH_CHECK(false, "pgd_update_cuda_: unknown norm '", norm, "' (valid: linf, l2, l1)");
  a.n = delta.numel();
  a.nx = a.n;
  if (x.has_value()) {
    TORCH_CHECK(x->is_cuda() && x->is_contiguous() && x->scalar_type() == delta.scalar_type(),
                "pgd_update_cuda_: x must be a contiguous CUDA tensor of delta's dtype");
    a.nx = x->numel();
    TORCH_CHECK(a.nx > 0 && a.n % a.nx == 0, "pgd_update_cuda_: x.numel() must divide delta.numel()");
    a.x = x->data_ptr();
  }
  // (M, C, H, W) view: the sample spans the last min(3, ndim - 1) dims.
  const int64_t nd = delta.dim();
  const int64_t ns = nd <= 1 ? nd : std::min<int64_t>(3, nd - 1);
  int64_t chw[3] = {1, 1, 1};
  for (int64_t i = 0; i < ns; ++i) chw[3 - ns + i] = delta.size(nd - ns + i);
  a.c = chw[0];
  a.h = chw[1];
  a.w = chw[2];
  a.m = a.n == 0 ? 0 : a.n / (a.c * a.h * a.w);
  if (out_x.has_value()) {
    TORCH_CHECK(x.has_value(), "pgd_update_cuda_: out_x needs x");
    TORCH_CHECK(out_x->is_cuda() && out_x->numel() == a.n, "pgd_update_cuda_: out_x must be a CUDA tensor like delta");
    TORCH_CHECK(out_strides.has_value() && out_strides->size() == 4, "pgd_update_cuda_: out_strides must hold 4 ints");
    a.out = out_x->data_ptr();
    a.out_dtype = to_dtype(out_x->scalar_type());
    for (int k = 0; k < 4; ++k) a.so[k] = (*out_strides)[k];
  }
  if (mean.has_value() || std.has_value()) {
    TORCH_CHECK(mean.has_value() && std.has_value(), "pgd_update_cuda_: give both mean and std");
    for (const auto* t : {&mean, &std}) {
      TORCH_CHECK((*t)->is_cuda() && (*t)->is_contiguous() && (*t)->scalar_type() == at::kFloat && (*t)->numel() == a.c,
                  "pgd_update_cuda_: mean/std must be contiguous float32 CUDA tensors with one value per channel");
    }
    a.mean = mean->data_ptr<float>();
    a.std = std->data_ptr<float>();
  }
  const double inf = std::numeric_limits<double>::infinity();
  a.dtype = to_dtype(delta.scalar_type());
  a.delta = delta.data_ptr();
  a.grad = grad.data_ptr();
  a.step = descend ? -step : step;
  a.eps = eps;
  a.lo = lower.value_or(-inf);
  a.hi = upper.value_or(inf);
  a.has_box = x.has_value() && (lower.has_value() || upper.has_value());
  const c10::cuda::CUDAGuard guard(delta.device());
  C10_CUDA_CHECK(pgd_update_cuda_launch(a, at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace fastpurify
