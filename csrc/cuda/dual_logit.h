// Torch-free interface of the CUDA kernels of SAU's dual-logit loss (csrc/cuda/dual_logit.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

namespace fastpurify {

// Forward (contract: fastpurify/ops/dual_logit.py): contiguous (B, C) logits z, z0 of `dtype`, (B,) int64 labels;
// writes the (B,) masks a, a0, s as 0/1 bytes, the (B, 2) per-row terms `terms` and the 0-d `loss` (both in the
// accumulation type: double for kFloat64, else float).
struct DualLogitArgs {
  DType dtype = DType::kFloat32;
  const void* z = nullptr;
  const void* z0 = nullptr;
  const int64_t* y = nullptr;
  const int64_t* yhat = nullptr;
  const int64_t* yhat0 = nullptr;
  uint8_t* a = nullptr;
  uint8_t* a0 = nullptr;
  uint8_t* s = nullptr;
  void* terms = nullptr;
  void* loss = nullptr;
  int64_t b = 0, c = 0;
  double beta1 = 0.01, beta2 = 1.0;
};

// Backward: dz, dz0 (B, C) in `dtype` from the saved masks and the 0-d upstream gradient `gout` (accumulation
// type, read on the device).
struct DualLogitBackwardArgs {
  DType dtype = DType::kFloat32;
  const void* z = nullptr;
  const void* z0 = nullptr;
  const int64_t* y = nullptr;
  const uint8_t* a = nullptr;
  const uint8_t* a0 = nullptr;
  const uint8_t* s = nullptr;
  const void* gout = nullptr;
  void* dz = nullptr;
  void* dz0 = nullptr;
  int64_t b = 0, c = 0;
  double beta1 = 0.01, beta2 = 1.0;
};

// Queue the kernels on `stream` (no host synchronisation); return the launch error.
cudaError_t dual_logit_loss_cuda_launch(const DualLogitArgs& args, cudaStream_t stream);
cudaError_t dual_logit_loss_backward_cuda_launch(const DualLogitBackwardArgs& args, cudaStream_t stream);

}  // namespace fastpurify
