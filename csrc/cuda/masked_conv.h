// Torch-free interface of the CUDA mask-weighted-convolution kernels (csrc/cuda/masked_conv.cu).
//
// The convolutions themselves are cuDNN's (called from masked_conv_bind.cpp); these kernels are the passes
// around them: W_eff = weight * mask, the backward epilogue dL/dmask = dW_eff * weight (and dL/dweight =
// dW_eff * mask), the same products over every layer in one launch, and AWM's Adam + clamp mask step.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

namespace fastpurify {

// out = a * b (and, when out2 is given, out2 = a * c) over n contiguous elements, in one pass.
cudaError_t masked_mul_cuda_launch(DType dtype, const void* a, const void* b, void* out, const void* c, void* out2,
                                   int64_t n, cudaStream_t stream);

// One layer of a multi-tensor product: out[i] = a[i] * b[i] for i < n; `first_block` is the index of the first
// block of this layer in the launch (layers are laid out back to back, kMultiBlock elements per block).
struct MultiMulEntry {
  const void* a;
  const void* b;
  void* out;
  int64_t n;
  int64_t first_block;
};

constexpr int64_t kMultiBlock = 2048;  // elements per block of the multi-tensor kernels (256 threads x 8)

// `table`: device array of `count` entries; `blocks`: total blocks (the last entry's first_block + its blocks).
cudaError_t multi_mul_cuda_launch(DType dtype, const MultiMulEntry* table, int64_t count, int64_t blocks,
                                  cudaStream_t stream);

// One layer of AWM's mask step (fp32 or fp64 tensors, contiguous).
struct AdamEntry {
  void* mask;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  int64_t n;
  int64_t first_block;
};

// Scalars as torch.optim.Adam derives them from its hyper-parameters (in double; rounded once to the dtype).
struct AdamScalars {
  double w1;        // 1 - beta1 (lerp weight)
  double beta2;
  double w2;        // 1 - beta2
  double bc2_sqrt;  // sqrt(1 - beta2^step)
  double eps;
  double neg_step;  // -lr / (1 - beta1^step)
  double l1;
};

cudaError_t masked_adam_clamp_cuda_launch(DType dtype, const AdamEntry* table, int64_t count, int64_t blocks,
                                          const AdamScalars& s, cudaStream_t stream);

}  // namespace fastpurify
