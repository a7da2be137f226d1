// Torch-facing launcher of the CUDA PGD kernel (built only with a CUDA torch): checks, dtype mapping and
// the current stream, then one call into the torch-free csrc/cuda/pgd.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

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

void pgd_update_linf_cuda_(at::Tensor delta, const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                           double step, double eps, c10::optional<double> lower, c10::optional<double> upper,
                           bool descend) {
  TORCH_CHECK(delta.is_cuda() && grad.is_cuda(), "pgd_update_linf_cuda_: tensors must be CUDA tensors");
  TORCH_CHECK(delta.is_contiguous() && grad.is_contiguous(), "pgd_update_linf_cuda_: delta and grad must be contiguous");
  TORCH_CHECK(grad.numel() == delta.numel() && grad.scalar_type() == delta.scalar_type(),
              "pgd_update_linf_cuda_: grad must match delta in size and dtype");
  const bool box = x.has_value() && (lower.has_value() || upper.has_value());
  const int64_t n = delta.numel();
  int64_t nx = n;
  if (box) {
    TORCH_CHECK(x->is_cuda() && x->is_contiguous() && x->scalar_type() == delta.scalar_type(),
                "pgd_update_linf_cuda_: x must be a contiguous CUDA tensor of delta's dtype");
    nx = x->numel();
    TORCH_CHECK(nx > 0 && n % nx == 0, "pgd_update_linf_cuda_: x.numel() must divide delta.numel()");
  }
  const c10::cuda::CUDAGuard guard(delta.device());
  const double inf = std::numeric_limits<double>::infinity();
  C10_CUDA_CHECK(pgd_update_linf_cuda_launch(
      to_dtype(delta.scalar_type()), delta.data_ptr(), grad.data_ptr(), box ? x->data_ptr() : nullptr, n, nx,
      descend ? -step : step, eps, lower.value_or(-inf), upper.value_or(inf), box,
      at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace fastpurify
