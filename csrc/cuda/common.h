// Torch-free declarations shared by the CUDA kernels (csrc/cuda/*.cu) and their launchers
// (csrc/cuda/*_bind.cpp). Nothing here includes a torch header, so `nvcc -c` compiles every .cu file on a
// machine whose torch has no CUDA headers (the CI compile check).
#pragma once

#include <cstdint>

namespace fastpurify {

// Element types a kernel is instantiated for; the launcher maps at::ScalarType onto these.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

}  // namespace fastpurify
