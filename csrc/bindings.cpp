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
#ifdef FASTPURIFY_WITH_CUDA
// csrc/cuda/pgd_bind.cpp
void pgd_update_cuda_(at::Tensor delta, const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                      const c10::optional<at::Tensor>& out_x, const c10::optional<at::Tensor>& mean,
                      const c10::optional<at::Tensor>& std, double step, double eps, c10::optional<double> lower,
                      c10::optional<double> upper, bool descend, const std::string& norm,
                      const c10::optional<std::vector<int64_t>>& out_strides);
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
#ifdef FASTPURIFY_WITH_CUDA
  m.def("pgd_update_cuda_", &fastpurify::pgd_update_cuda_, "PGD update (linf/l2/l1), in place, optional model input (CUDA)",
        py::arg("delta"), py::arg("grad"), py::arg("x"), py::arg("out_x"), py::arg("mean"), py::arg("std"),
        py::arg("step"), py::arg("eps"), py::arg("lower"), py::arg("upper"), py::arg("descend"), py::arg("norm"),
        py::arg("out_strides"));
#endif
}
