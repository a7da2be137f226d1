// Torch-free device queries shared by the CUDA kernels (csrc/cuda/*.cu); included by .cu files only.
#pragma once

#include <cuda_runtime.h>

namespace fastpurify {

// Streaming multiprocessors of the current device, queried once per process (cheap, but not free on every
// launch of a kernel that takes microseconds). Grid-stride kernels size their grids from it.
inline int num_sms() {
  static int sms = [] {
    int device = 0, count = 132;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    return count;
  }();
  return sms;
}

}  // namespace fastpurify
