// Torch-facing launcher of the CUDA universal-perturbation kernels (built only with a CUDA torch): checks,
// dtype mapping, the workspace (from torch's caching allocator) and the current stream, then one call into the
// torch-free csrc/cuda/universal.cu. Contract: fastpurify/ops/universal.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "cuda/universal.h"

namespace fastpurify {

static DType universal_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fastpurify CUDA kernels: unsupported dtype ", t);
  }
}

void universal_update_cuda_(at::Tensor delta, const at::Tensor& grad, int64_t k, int64_t b, double step, bool mean,
                            double weight_decay, const std::string& norm, double radius, bool descend) {
  TORCH_CHECK(delta.is_cuda() && grad.is_cuda(), "universal_update_cuda_: tensors must be CUDA tensors");
  TORCH_CHECK(delta.is_contiguous() && grad.is_contiguous(),
              "universal_update_cuda_: delta and grad must be contiguous");
  TORCH_CHECK(grad.scalar_type() == delta.scalar_type(), "universal_update_cuda_: grad dtype must match delta's");
  TORCH_CHECK(k > 0 && b > 0 && delta.numel() % k == 0, "universal_update_cuda_: bad K=", k, " or B=", b);
  UniversalArgs a;
  if (norm == "none") a.norm = UniversalNorm::kNone;
  else if (norm == "l2") a.norm = UniversalNorm::kL2;
  else if (norm == "l1") a.norm = UniversalNorm::kL1;
  else if (norm == "linf") a.norm = UniversalNorm::kLinf;
  else TORCH_CHECK(false, "universal_update_cuda_: unknown norm '", norm, "' (valid: none, l2, l1, linf)");
  a.dtype = universal_dtype(delta.scalar_type());
  a.delta = delta.data_ptr();
  a.grad = grad.data_ptr();
  a.k = k;
  a.b = b;
  a.s = delta.numel() / k;
  TORCH_CHECK(grad.numel() == k * b * a.s, "universal_update_cuda_: grad must hold K*B*S = ", k * b * a.s,
              " elements, got ", grad.numel());
  a.step = descend ? -step : step;
  a.wd2 = 2.0 * weight_decay;
  a.has_wd = weight_decay != 0.0;
  a.radius = radius;
  a.mean = mean;
  const c10::cuda::CUDAGuard guard(delta.device());
  const size_t bytes = universal_update_cuda_workspace(a);
  // The caching allocator hands back a block without a device sync; it stays alive until the kernels ran
  // because it is freed on this stream.
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, delta.options().dtype(at::kByte));
  C10_CUDA_CHECK(universal_update_cuda_launch(a, ws.data_ptr(), at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace fastpurify
