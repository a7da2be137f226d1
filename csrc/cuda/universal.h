// Torch-free interface of the CUDA universal-perturbation kernels (csrc/cuda/universal.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace fastpurify {

enum class UniversalNorm : int { kNone = 0, kL2 = 1, kL1 = 2, kLinf = 3 };

// One universal update in place (contract: fastpurify/ops/universal.py): `delta` holds K perturbations of S
// contiguous elements, `grad` K batches of B rows of S. `step` carries the descent sign; `wd2` = 2·weight_decay
// (used when has_wd); `mean` divides the batch sum by B.
struct UniversalArgs {
  DType dtype = DType::kFloat32;
  UniversalNorm norm = UniversalNorm::kNone;
  void* delta = nullptr;
  const void* grad = nullptr;
  int64_t k = 1, b = 1, s = 0;
  double step = 0.0, wd2 = 0.0, radius = 0.0;
  bool mean = false, has_wd = false;
};

// Bytes of device workspace `universal_update_cuda_launch` needs for these arguments (may be 0).
size_t universal_update_cuda_workspace(const UniversalArgs& args);

// Queues the kernels on `stream` (no host synchronisation); `workspace` points to at least
// universal_update_cuda_workspace(args) bytes of device memory, 256-byte aligned. Returns the launch error.
cudaError_t universal_update_cuda_launch(const UniversalArgs& args, void* workspace, cudaStream_t stream);

}  // namespace fastpurify
