// Torch-free interface of the CUDA conjugate-gradient vector kernels (csrc/cuda/cg.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

namespace fastpurify {

// Elements of one system's row handled by one phase-1 block (and so one partial sum).
constexpr int64_t kCgTile = 4096;

// Phase 1 of cg_step for one tensor (contract: fastpurify/ops/cg.py): rows s = 0..nsys-1 of n elements,
// x += alpha p, r -= alpha Ap with alpha = rr[s] / pap[s] for active systems (rr > tol2, status >= 0), and
// the tile's sum of r^2 written to part[s * per_sys + first + tile]. dtype: kFloat32 or kFloat64 (the
// vectors, rr, pap and part share it).
struct CgStepArgs {
  DType dtype = DType::kFloat32;
  void* x = nullptr;
  void* r = nullptr;
  const void* p = nullptr;
  const void* ap = nullptr;
  const void* rr = nullptr;
  const void* pap = nullptr;
  const int32_t* status = nullptr;
  void* part = nullptr;
  int64_t n = 0, nsys = 1, per_sys = 0, first = 0;
  double tol2 = 0.0;
};

// Phase 2: per system, the partials in tile order (deterministic), then rr_new, iters and status.
struct CgFinalizeArgs {
  DType dtype = DType::kFloat32;
  const void* part = nullptr;
  const void* rr = nullptr;
  const void* pap = nullptr;
  void* rr_new = nullptr;
  int32_t* iters = nullptr;
  int32_t* status = nullptr;
  int64_t nsys = 1, per_sys = 0;
  double tol2 = 0.0;
};

// p = r + (rr_new / rr) p on the rows of active systems.
struct CgDirectionArgs {
  DType dtype = DType::kFloat32;
  void* p = nullptr;
  const void* r = nullptr;
  const void* rr = nullptr;
  const void* rr_new = nullptr;
  const int32_t* status = nullptr;
  int64_t n = 0, nsys = 1;
  double tol2 = 0.0;
};

// Each queues its kernel on `stream` and returns the launch error (cudaSuccess when queued).
cudaError_t cg_step_partial_cuda_launch(const CgStepArgs& args, cudaStream_t stream);
cudaError_t cg_finalize_cuda_launch(const CgFinalizeArgs& args, cudaStream_t stream);
cudaError_t cg_direction_cuda_launch(const CgDirectionArgs& args, cudaStream_t stream);

}  // namespace fastpurify
