// Launch geometry and packed accesses shared by the CUDA kernels (.cu files only).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace hiera_kernels {

constexpr int kThreads = 256;  // threads per block

// Grids are [blocks over one image's work, images]: blockIdx.y walks the batch and
// blockIdx.x the image's work, each with a grid-stride loop over int64 indices. So no
// index needs a division by the image size, and any tensor (past 2^31 elements too)
// fits the launch limits: both dims are capped at gridDim.y's 65535.
constexpr int64_t kMaxGridDim = 65535;

inline dim3 image_grid(int64_t items_per_image, int64_t items_per_block, int64_t batch) {
  const int64_t blocks = (items_per_image + items_per_block - 1) / items_per_block;
  return dim3(static_cast<unsigned>(std::min(blocks, kMaxGridDim)),
              static_cast<unsigned>(std::min(batch, kMaxGridDim)));
}

// Whether every address or byte count in `values` is a multiple of `bytes`: the
// condition for moving data in accesses of that width.
inline bool is_aligned(uintptr_t bytes, std::initializer_list<uintptr_t> values) {
  for (uintptr_t v : values) {
    if (v % bytes != 0) return false;
  }
  return true;
}

// kN consecutive elements moved as one access of kN * sizeof(T) bytes (16 on the vector paths).
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T v[kN];
};

}  // namespace hiera_kernels
