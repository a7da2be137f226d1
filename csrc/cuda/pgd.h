// Torch-free interface of the CUDA PGD kernels (csrc/cuda/pgd.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

namespace fastpurify {

enum class PgdNorm : int { kLinf = 0, kL2 = 1, kL1 = 2 };

// One PGD update in place (contract: fastpurify/ops/pgd.py). Device pointers to contiguous arrays except
// `out`, addressed through the element strides `so` of its (M, C, H, W) view. `step` carries the descent
// sign; `x` (nullptr: no box, no out) broadcasts with period nx; `mean`/`std`: nullptr or C floats.
struct PgdArgs {
  DType dtype = DType::kFloat32;
  DType out_dtype = DType::kFloat32;
  PgdNorm norm = PgdNorm::kLinf;
  void* delta = nullptr;
  const void* grad = nullptr;
  const void* x = nullptr;
  void* out = nullptr;
  const float* mean = nullptr;
  const float* std = nullptr;
  int64_t n = 0, nx = 0, m = 0, c = 1, h = 1, w = 1;
  int64_t so[4] = {0, 0, 0, 0};
  double step = 0.0, eps = 0.0, lo = 0.0, hi = 0.0;
  bool has_box = false;
};

// Queues the kernel on `stream`; returns the launch error (cudaSuccess when queued).
cudaError_t pgd_update_cuda_launch(const PgdArgs& args, cudaStream_t stream);

}  // namespace fastpurify
