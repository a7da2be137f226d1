// Torch-facing launchers of the CUDA mask-weighted convolution (built only with a CUDA torch): cuDNN's
// convolutions (at::conv2d, at::convolution_backward with an output mask, so no weight gradient is computed
// unless one is needed) around the fused passes of csrc/cuda/masked_conv.cu. Contract: fastpurify/ops/masked_conv.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "cuda/masked_conv.h"

namespace fastpurify {

namespace {

DType mc_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fastpurify CUDA kernels: unsupported dtype ", t);
  }
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), op, ": tensors must be CUDA tensors");
  TORCH_CHECK(a.device() == b.device(), op, ": tensors on ", a.device(), " and ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": dtypes ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": shapes ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), op, ": tensors must be contiguous");
}

at::Tensor weff_of(const at::Tensor& weight, const at::Tensor& mask) {
  check_same(weight, mask, "masked_conv2d_cuda");
  at::Tensor out = at::empty_like(weight, at::MemoryFormat::Contiguous);
  C10_CUDA_CHECK(masked_mul_cuda_launch(mc_dtype(weight.scalar_type()), weight.data_ptr(), mask.data_ptr(),
                                        out.data_ptr(), nullptr, nullptr, weight.numel(),
                                        at::cuda::getCurrentCUDAStream().stream()));
  return out;
}

// Copies a host table of entries into a device buffer from torch's caching allocator (freed on this stream,
// so it stays alive until the kernel ran).
template <typename E>
at::Tensor device_table(const std::vector<E>& entries, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(entries.size() * sizeof(E));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), entries.data(), static_cast<size_t>(bytes));
  return host.to(device, /*non_blocking=*/true);
}

}  // namespace

at::Tensor masked_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                              const c10::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                              std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
  const c10::cuda::CUDAGuard guard(x.device());
  return at::conv2d(x, weff_of(weight, mask), bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cuda(
    const at::Tensor& gout, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
    bool need_x, bool need_mask, bool need_weight, bool need_bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool need_w = need_mask || need_weight;
  at::Tensor weff = weff_of(weight, mask);  // recomputed: one pass over the weights, nothing kept from forward
  std::vector<int64_t> bsz = {weight.size(0)};
  c10::OptionalArrayRef<int64_t> bias_sizes;
  if (need_bias) bias_sizes = bsz;
  at::Tensor gx, gw, gb;
  std::tie(gx, gw, gb) = at::convolution_backward(gout, x, weff, bias_sizes, stride, padding, dilation, false,
                                                  {0, 0}, groups, {need_x, need_w, need_bias});
  at::Tensor gmask, gweight;
  if (need_w) {
    gw = gw.contiguous();
    // Epilogue: dL/dmask = dW_eff * weight and dL/dweight = dW_eff * mask from one read of dW_eff.
    at::Tensor first = at::empty_like(weight, at::MemoryFormat::Contiguous);
    at::Tensor second = need_mask && need_weight ? at::empty_like(weight, at::MemoryFormat::Contiguous) : at::Tensor();
    const void* b = need_mask ? weight.data_ptr() : mask.data_ptr();
    C10_CUDA_CHECK(masked_mul_cuda_launch(mc_dtype(weight.scalar_type()), gw.data_ptr(), b, first.data_ptr(),
                                          second.defined() ? mask.data_ptr() : nullptr,
                                          second.defined() ? second.data_ptr() : nullptr, weight.numel(),
                                          at::cuda::getCurrentCUDAStream().stream()));
    if (need_mask) {
      gmask = first;
      gweight = second;
    } else {
      gweight = first;
    }
  }
  return std::make_tuple(gx, gmask, gweight, gb);
}

static void multi_mul_cuda(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                           std::vector<at::Tensor>& out, const char* op) {
  TORCH_CHECK(a.size() == b.size() && a.size() == out.size(), op, ": lists of different lengths");
  if (a.empty()) return;
  const c10::cuda::CUDAGuard guard(a[0].device());
  std::vector<MultiMulEntry> table;
  int64_t blocks = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    check_same(a[i], b[i], op);
    check_same(a[i], out[i], op);
    TORCH_CHECK(a[i].scalar_type() == a[0].scalar_type() && a[i].device() == a[0].device(), op,
                ": all tensors must share one dtype and device");
    if (a[i].numel() == 0) continue;
    table.push_back({a[i].data_ptr(), b[i].data_ptr(), out[i].data_ptr(), a[i].numel(), blocks});
    blocks += (a[i].numel() + kMultiBlock - 1) / kMultiBlock;
  }
  if (table.empty()) return;
  at::Tensor dev = device_table(table, a[0].device());
  C10_CUDA_CHECK(multi_mul_cuda_launch(mc_dtype(a[0].scalar_type()), static_cast<const MultiMulEntry*>(dev.data_ptr()),
                                       static_cast<int64_t>(table.size()), blocks,
                                       at::cuda::getCurrentCUDAStream().stream()));
}

void build_masked_weights_cuda_(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& masks,
                                std::vector<at::Tensor> outs) {
  multi_mul_cuda(weights, masks, outs, "build_masked_weights_cuda_");
}

void mask_grads_cuda_(const std::vector<at::Tensor>& grad_weffs, const std::vector<at::Tensor>& weights,
                      std::vector<at::Tensor> out_grads) {
  multi_mul_cuda(grad_weffs, weights, out_grads, "mask_grads_cuda_");
}

void masked_adam_clamp_cuda_(std::vector<at::Tensor> masks, const std::vector<at::Tensor>& grads,
                             std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs, double lr,
                             double beta1, double beta2, double eps, double l1, int64_t step) {
  const char* op = "masked_adam_clamp_cuda_";
  TORCH_CHECK(masks.size() == grads.size() && masks.size() == exp_avgs.size() && masks.size() == exp_avg_sqs.size(),
              op, ": lists of different lengths");
  TORCH_CHECK(step >= 1, op, ": step must be >= 1, got ", step);
  if (masks.empty()) return;
  TORCH_CHECK(masks[0].scalar_type() == at::kFloat || masks[0].scalar_type() == at::kDouble, op,
              ": masks must be float32 or float64, got ", masks[0].scalar_type());
  const c10::cuda::CUDAGuard guard(masks[0].device());
  std::vector<AdamEntry> table;
  int64_t blocks = 0;
  for (size_t i = 0; i < masks.size(); ++i) {
    check_same(masks[i], grads[i], op);
    check_same(masks[i], exp_avgs[i], op);
    check_same(masks[i], exp_avg_sqs[i], op);
    TORCH_CHECK(masks[i].scalar_type() == masks[0].scalar_type(), op, ": all tensors must share one dtype");
    if (masks[i].numel() == 0) continue;
    table.push_back({masks[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                     masks[i].numel(), blocks});
    blocks += (masks[i].numel() + kMultiBlock - 1) / kMultiBlock;
  }
  if (table.empty()) return;
  AdamScalars s;
  s.w1 = 1.0 - beta1;
  s.beta2 = beta2;
  s.w2 = 1.0 - beta2;
  s.bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  s.eps = eps;
  s.neg_step = -(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  s.l1 = l1;
  at::Tensor dev = device_table(table, masks[0].device());
  C10_CUDA_CHECK(masked_adam_clamp_cuda_launch(mc_dtype(masks[0].scalar_type()),
                                               static_cast<const AdamEntry*>(dev.data_ptr()),
                                               static_cast<int64_t>(table.size()), blocks, s,
                                               at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace fastpurify
