// The single pybind11 module fastpurify._C: C++ CPU kernels always, CUDA launchers when built with CUDA.
// Ops are registered with torch.library on the Python side (fastpurify/ops/); this module only exposes
// the raw launchers, which the backend selector (fastpurify/backend.py) hands to them.
#include <torch/extension.h>

namespace fastpurify {
// csrc/cpu/pgd.cpp
void pgd_update_cpu_(at::Tensor delta, const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                     const c10::optional<at::Tensor>& out_x, const c10::optional<at::Tensor>& mean,
                     const c10::optional<at::Tensor>& std, double step, double eps, c10::optional<double> lower,
                     c10::optional<double> upper, bool descend, const std::string& norm,
                     const c10::optional<std::vector<int64_t>>& out_strides);
// csrc/cpu/universal.cpp
void universal_update_cpu_(at::Tensor delta, const at::Tensor& grad, int64_t k, int64_t b, double step, bool mean,
                           double weight_decay, const std::string& norm, double radius, bool descend);
// csrc/cpu/dual_logit.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_logit_loss_cpu(
    const at::Tensor& z, const at::Tensor& z0, const at::Tensor& y, const at::Tensor& yhat, const at::Tensor& yhat0,
    double beta1, double beta2);
std::tuple<at::Tensor, at::Tensor> dual_logit_loss_backward_cpu(const at::Tensor& z, const at::Tensor& z0,
                                                                 const at::Tensor& y, const at::Tensor& a,
                                                                 const at::Tensor& a0, const at::Tensor& s,
                                                                 const at::Tensor& gout, double beta1, double beta2);
// csrc/cpu/cg.cpp
void cg_step_cpu_(std::vector<at::Tensor> x, std::vector<at::Tensor> r, const std::vector<at::Tensor>& p,
                  const std::vector<at::Tensor>& ap, const at::Tensor& rr, const at::Tensor& pap, at::Tensor rr_new,
                  at::Tensor iters, at::Tensor status, double tol2);
void cg_direction_cpu_(std::vector<at::Tensor> p, const std::vector<at::Tensor>& r, const at::Tensor& rr,
                       const at::Tensor& rr_new, const at::Tensor& status, double tol2);
// csrc/cpu/masked_conv.cpp
at::Tensor masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                             const c10::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                             std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& gout, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
    bool need_x, bool need_mask, bool need_weight, bool need_bias);
void build_masked_weights_cpu_(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& masks,
                               std::vector<at::Tensor> outs);
void mask_grads_cpu_(const std::vector<at::Tensor>& grad_weffs, const std::vector<at::Tensor>& weights,
                     std::vector<at::Tensor> out_grads);
void masked_adam_clamp_cpu_(std::vector<at::Tensor> masks, const std::vector<at::Tensor>& grads,
                            std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs, double lr,
                            double beta1, double beta2, double eps, double l1, int64_t step);
#ifdef FASTPURIFY_WITH_CUDA
// csrc/cuda/pgd_bind.cpp
void pgd_update_cuda_(at::Tensor delta, const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                      const c10::optional<at::Tensor>& out_x, const c10::optional<at::Tensor>& mean,
                      const c10::optional<at::Tensor>& std, double step, double eps, c10::optional<double> lower,
                      c10::optional<double> upper, bool descend, const std::string& norm,
                      const c10::optional<std::vector<int64_t>>& out_strides);
// csrc/cuda/universal_bind.cpp
void universal_update_cuda_(at::Tensor delta, const at::Tensor& grad, int64_t k, int64_t b, double step, bool mean,
                            double weight_decay, const std::string& norm, double radius, bool descend);
// csrc/cuda/dual_logit_bind.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_logit_loss_cuda(
    const at::Tensor& z, const at::Tensor& z0, const at::Tensor& y, const at::Tensor& yhat, const at::Tensor& yhat0,
    double beta1, double beta2);
std::tuple<at::Tensor, at::Tensor> dual_logit_loss_backward_cuda(const at::Tensor& z, const at::Tensor& z0,
                                                                  const at::Tensor& y, const at::Tensor& a,
                                                                  const at::Tensor& a0, const at::Tensor& s,
                                                                  const at::Tensor& gout, double beta1, double beta2);
// csrc/cuda/masked_conv_bind.cpp
at::Tensor masked_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                             const c10::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                             std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cuda(
    const at::Tensor& gout, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
    bool need_x, bool need_mask, bool need_weight, bool need_bias);
void build_masked_weights_cuda_(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& masks,
                               std::vector<at::Tensor> outs);
void mask_grads_cuda_(const std::vector<at::Tensor>& grad_weffs, const std::vector<at::Tensor>& weights,
                     std::vector<at::Tensor> out_grads);
void masked_adam_clamp_cuda_(std::vector<at::Tensor> masks, const std::vector<at::Tensor>& grads,
                            std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs, double lr,
                            double beta1, double beta2, double eps, double l1, int64_t step);
// csrc/cuda/cg_bind.cpp
void cg_step_cuda_(std::vector<at::Tensor> x, std::vector<at::Tensor> r, const std::vector<at::Tensor>& p,
                   const std::vector<at::Tensor>& ap, const at::Tensor& rr, const at::Tensor& pap, at::Tensor rr_new,
                   at::Tensor iters, at::Tensor status, double tol2);
void cg_direction_cuda_(std::vector<at::Tensor> p, const std::vector<at::Tensor>& r, const at::Tensor& rr,
                        const at::Tensor& rr_new, const at::Tensor& status, double tol2);
#endif
}  // namespace fastpurify

static bool has_cuda() {
#ifdef FASTPURIFY_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpurify compiled kernels (C++ CPU; CUDA when built with it)";
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
  m.def("num_threads", &at::get_num_threads, "ATen intra-op threads the CPU kernels use");
  m.def("pgd_update_cpu_", &fastpurify::pgd_update_cpu_, "PGD update (linf/l2/l1), in place, optional model input (CPU)",
        py::arg("delta"), py::arg("grad"), py::arg("x"), py::arg("out_x"), py::arg("mean"), py::arg("std"),
        py::arg("step"), py::arg("eps"), py::arg("lower"), py::arg("upper"), py::arg("descend"), py::arg("norm"),
        py::arg("out_strides"));
  m.def("universal_update_cpu_", &fastpurify::universal_update_cpu_,
        "universal perturbation update (batch reduction + penalty + step + ball), in place (CPU)", py::arg("delta"),
        py::arg("grad"), py::arg("k"), py::arg("b"), py::arg("step"), py::arg("mean"), py::arg("weight_decay"),
        py::arg("norm"), py::arg("radius"), py::arg("descend"));
  m.def("dual_logit_loss_cpu", &fastpurify::dual_logit_loss_cpu, "SAU dual-logit loss and masks (CPU)", py::arg("z"),
        py::arg("z0"), py::arg("y"), py::arg("yhat"), py::arg("yhat0"), py::arg("beta1"), py::arg("beta2"));
  m.def("dual_logit_loss_backward_cpu", &fastpurify::dual_logit_loss_backward_cpu,
        "SAU dual-logit loss: dL/dz and dL/dz0 (CPU)", py::arg("z"), py::arg("z0"), py::arg("y"), py::arg("a"),
        py::arg("a0"), py::arg("s"), py::arg("gout"), py::arg("beta1"), py::arg("beta2"));
  m.def("cg_step_cpu_", &fastpurify::cg_step_cpu_,
        "CG update x += a p, r -= a Ap, rr_new = |r|^2 per system, masked, in place (CPU)", py::arg("x"), py::arg("r"),
        py::arg("p"), py::arg("ap"), py::arg("rr"), py::arg("pap"), py::arg("rr_new"), py::arg("iters"),
        py::arg("status"), py::arg("tol2"));
  m.def("cg_direction_cpu_", &fastpurify::cg_direction_cpu_, "CG direction p = r + (rr_new/rr) p per system, in place (CPU)",
        py::arg("p"), py::arg("r"), py::arg("rr"), py::arg("rr_new"), py::arg("status"), py::arg("tol2"));
  m.def("masked_conv2d_cpu", &fastpurify::masked_conv2d_cpu, "conv2d(x, weight*mask), W_eff built in one pass (CPU)",
        py::arg("x"), py::arg("weight"), py::arg("mask"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"));
  m.def("masked_conv2d_backward_cpu", &fastpurify::masked_conv2d_backward_cpu,
        "masked conv2d backward: dx, dmask = dW_eff*weight, dweight = dW_eff*mask, dbias, as needed (CPU)",
        py::arg("gout"), py::arg("x"), py::arg("weight"), py::arg("mask"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"), py::arg("need_x"), py::arg("need_mask"), py::arg("need_weight"),
        py::arg("need_bias"));
  m.def("build_masked_weights_cpu_", &fastpurify::build_masked_weights_cpu_, "outs[i] = weights[i]*masks[i], all layers (CPU)",
        py::arg("weights"), py::arg("masks"), py::arg("outs"));
  m.def("mask_grads_cpu_", &fastpurify::mask_grads_cpu_, "out_grads[i] = grad_weffs[i]*weights[i], all layers (CPU)",
        py::arg("grad_weffs"), py::arg("weights"), py::arg("out_grads"));
  m.def("masked_adam_clamp_cpu_", &fastpurify::masked_adam_clamp_cpu_,
        "AWM mask step: L1 subgradient + Adam + clamp to [0, 1], all layers, in place (CPU)", py::arg("masks"),
        py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("l1"), py::arg("step"));
#ifdef FASTPURIFY_WITH_CUDA
  m.def("pgd_update_cuda_", &fastpurify::pgd_update_cuda_, "PGD update (linf/l2/l1), in place, optional model input (CUDA)",
        py::arg("delta"), py::arg("grad"), py::arg("x"), py::arg("out_x"), py::arg("mean"), py::arg("std"),
        py::arg("step"), py::arg("eps"), py::arg("lower"), py::arg("upper"), py::arg("descend"), py::arg("norm"),
        py::arg("out_strides"));
  m.def("universal_update_cuda_", &fastpurify::universal_update_cuda_,
        "universal perturbation update (batch reduction + penalty + step + ball), in place (CUDA)", py::arg("delta"),
        py::arg("grad"), py::arg("k"), py::arg("b"), py::arg("step"), py::arg("mean"), py::arg("weight_decay"),
        py::arg("norm"), py::arg("radius"), py::arg("descend"));
  m.def("dual_logit_loss_cuda", &fastpurify::dual_logit_loss_cuda, "SAU dual-logit loss and masks (CUDA)",
        py::arg("z"), py::arg("z0"), py::arg("y"), py::arg("yhat"), py::arg("yhat0"), py::arg("beta1"),
        py::arg("beta2"));
  m.def("dual_logit_loss_backward_cuda", &fastpurify::dual_logit_loss_backward_cuda,
        "SAU dual-logit loss: dL/dz and dL/dz0 (CUDA)", py::arg("z"), py::arg("z0"), py::arg("y"), py::arg("a"),
        py::arg("a0"), py::arg("s"), py::arg("gout"), py::arg("beta1"), py::arg("beta2"));
  m.def("masked_conv2d_cuda", &fastpurify::masked_conv2d_cuda, "conv2d(x, weight*mask), W_eff built in one pass (CUDA)",
        py::arg("x"), py::arg("weight"), py::arg("mask"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"));
  m.def("masked_conv2d_backward_cuda", &fastpurify::masked_conv2d_backward_cuda,
        "masked conv2d backward: dx, dmask = dW_eff*weight, dweight = dW_eff*mask, dbias, as needed (CUDA)",
        py::arg("gout"), py::arg("x"), py::arg("weight"), py::arg("mask"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"), py::arg("need_x"), py::arg("need_mask"), py::arg("need_weight"),
        py::arg("need_bias"));
  m.def("build_masked_weights_cuda_", &fastpurify::build_masked_weights_cuda_, "outs[i] = weights[i]*masks[i], all layers (CUDA)",
        py::arg("weights"), py::arg("masks"), py::arg("outs"));
  m.def("mask_grads_cuda_", &fastpurify::mask_grads_cuda_, "out_grads[i] = grad_weffs[i]*weights[i], all layers (CUDA)",
        py::arg("grad_weffs"), py::arg("weights"), py::arg("out_grads"));
  m.def("masked_adam_clamp_cuda_", &fastpurify::masked_adam_clamp_cuda_,
        "AWM mask step: L1 subgradient + Adam + clamp to [0, 1], all layers, in place (CUDA)", py::arg("masks"),
        py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("l1"), py::arg("step"));
  m.def("cg_step_cuda_", &fastpurify::cg_step_cuda_,
        "CG update x += a p, r -= a Ap, rr_new = |r|^2 per system, masked, in place (CUDA)", py::arg("x"), py::arg("r"),
        py::arg("p"), py::arg("ap"), py::arg("rr"), py::arg("pap"), py::arg("rr_new"), py::arg("iters"),
        py::arg("status"), py::arg("tol2"));
  m.def("cg_direction_cuda_", &fastpurify::cg_direction_cuda_,
        "CG direction p = r + (rr_new/rr) p per system, in place (CUDA)", py::arg("p"), py::arg("r"), py::arg("rr"),
        py::arg("rr_new"), py::arg("status"), py::arg("tol2"));
#endif
}
