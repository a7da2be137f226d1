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
#endif
}
