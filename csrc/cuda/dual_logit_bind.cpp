// Torch-facing launchers of the CUDA kernels of SAU's dual-logit loss (built only with a CUDA torch): checks,
// output allocation, dtype mapping and the current stream, then one call into the torch-free
// csrc/cuda/dual_logit.cu. Contract: fastpurify/ops/dual_logit.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <tuple>

#include "cuda/dual_logit.h"

namespace fastpurify {

static DType dual_logit_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fastpurify CUDA kernels: unsupported dtype ", t);
  }
}

static void check_logits(const char* fn, const at::Tensor& z, const at::Tensor& z0,
                         std::initializer_list<const at::Tensor*> rows) {
  TORCH_CHECK(z.is_cuda() && z0.is_cuda(), fn, ": tensors must be CUDA tensors");
  TORCH_CHECK(z.dim() == 2 && z.sizes() == z0.sizes() && z.is_contiguous() && z0.is_contiguous() &&
                  z.scalar_type() == z0.scalar_type(),
              fn, ": z and z0 must be contiguous (B, C) tensors of one dtype");
  for (const auto* t : rows) {
    TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->dim() == 1 && t->size(0) == z.size(0), fn,
                ": label and mask tensors must be contiguous (B,) CUDA tensors");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_logit_loss_cuda(
    const at::Tensor& z, const at::Tensor& z0, const at::Tensor& y, const at::Tensor& yhat, const at::Tensor& yhat0,
    double beta1, double beta2) {
  check_logits("dual_logit_loss_cuda", z, z0, {&y, &yhat, &yhat0});
  for (const auto* t : {&y, &yhat, &yhat0}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, "dual_logit_loss_cuda: labels must be int64");
  }
  const int64_t b = z.size(0), c = z.size(1);
  TORCH_CHECK(b > 0 && c > 0, "dual_logit_loss_cuda: z must have at least one row and one class");
  const c10::cuda::CUDAGuard guard(z.device());
  const auto acc = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({}, z.options().dtype(acc));
  at::Tensor terms = at::empty({b, 2}, z.options().dtype(acc));
  at::Tensor a = at::empty({b}, z.options().dtype(at::kBool));
  at::Tensor a0 = at::empty({b}, z.options().dtype(at::kBool));
  at::Tensor s = at::empty({b}, z.options().dtype(at::kBool));
  DualLogitArgs args;
  args.dtype = dual_logit_dtype(z.scalar_type());
  args.z = z.data_ptr();
  args.z0 = z0.data_ptr();
  args.y = y.data_ptr<int64_t>();
  args.yhat = yhat.data_ptr<int64_t>();
  args.yhat0 = yhat0.data_ptr<int64_t>();
  args.a = static_cast<uint8_t*>(a.data_ptr());  // bool is one byte holding 0 or 1
  args.a0 = static_cast<uint8_t*>(a0.data_ptr());
  args.s = static_cast<uint8_t*>(s.data_ptr());
  args.terms = terms.data_ptr();
  args.loss = loss.data_ptr();
  args.b = b;
  args.c = c;
  args.beta1 = beta1;
  args.beta2 = beta2;
  C10_CUDA_CHECK(dual_logit_loss_cuda_launch(args, at::cuda::getCurrentCUDAStream().stream()));
  return {loss, a, a0, s};
}

std::tuple<at::Tensor, at::Tensor> dual_logit_loss_backward_cuda(const at::Tensor& z, const at::Tensor& z0,
                                                                  const at::Tensor& y, const at::Tensor& a,
                                                                  const at::Tensor& a0, const at::Tensor& s,
                                                                  const at::Tensor& gout, double beta1, double beta2) {
  check_logits("dual_logit_loss_backward_cuda", z, z0, {&y, &a, &a0, &s});
  TORCH_CHECK(y.scalar_type() == at::kLong, "dual_logit_loss_backward_cuda: labels must be int64");
  for (const auto* t : {&a, &a0, &s}) {
    TORCH_CHECK(t->scalar_type() == at::kBool, "dual_logit_loss_backward_cuda: masks must be bool");
  }
  TORCH_CHECK(gout.is_cuda() && gout.numel() == 1, "dual_logit_loss_backward_cuda: gout must be a one-element CUDA "
              "tensor");
  const c10::cuda::CUDAGuard guard(z.device());
  const auto acc = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = gout.to(acc).contiguous();  // stays on the device: read by the kernel
  at::Tensor dz = at::empty_like(z), dz0 = at::empty_like(z0);
  DualLogitBackwardArgs args;
  args.dtype = dual_logit_dtype(z.scalar_type());
  args.z = z.data_ptr();
  args.z0 = z0.data_ptr();
  args.y = y.data_ptr<int64_t>();
  args.a = static_cast<const uint8_t*>(a.data_ptr());
  args.a0 = static_cast<const uint8_t*>(a0.data_ptr());
  args.s = static_cast<const uint8_t*>(s.data_ptr());
  args.gout = g.data_ptr();
  args.dz = dz.data_ptr();
  args.dz0 = dz0.data_ptr();
  args.b = z.size(0);
  args.c = z.size(1);
  args.beta1 = beta1;
  args.beta2 = beta2;
  C10_CUDA_CHECK(dual_logit_loss_backward_cuda_launch(args, at::cuda::getCurrentCUDAStream().stream()));
  return {dz, dz0};
}

}  // namespace fastpurify
