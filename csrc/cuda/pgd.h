// Torch-free interface of the CUDA PGD kernels (csrc/cuda/pgd.cu).
#pragma once

#include <cuda_runtime.h>

#include "common.h"

namespace fastpurify {

// L-inf PGD update in place: d = clamp(d + step*sign(g), -eps, eps); if has_box:
// d = clamp(x + d, lo, hi) - x with x[i % nx]. step already carries the descent sign.
// All pointers are device pointers to contiguous arrays of `dtype`; n elements (nx for x).
// Returns the launch error (cudaSuccess when the kernel was queued on `stream`).
cudaError_t pgd_update_linf_cuda_launch(DType dtype, void* delta, const void* grad, const void* x, int64_t n,
                                        int64_t nx, double step, double eps, double lo, double hi, bool has_box,
                                        cudaStream_t stream);

}  // namespace fastpurify
