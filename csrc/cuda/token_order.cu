// CUDA kernels for unroll and reroll: one gather (unroll) or scatter (reroll) pass over
// [B, N, C], each token's C channels moved as one contiguous row of bytes. Row
// n = t * num_units + w of the unrolled side pairs with row unit_offset(w) +
// in_unit_offset(t) of the spatial side: the formulas of token_order.h, which the CPU
// kernels run too. The kernels move bytes, so one instantiation per access width
// serves every dtype.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_utils.cuh"
#include "launch.h"

namespace hiera_kernels {
namespace {

// A block moves tiles of blockDim.y tokens of image blockIdx.y, consecutive in unrolled
// order, with blockDim.x threads along each token's row of row_vecs accesses. A token's
// spatial row costs a dozen integer divisions, more than moving a short row (192 B for
// 96 bf16 channels), so one thread per token computes it and shares it through shared
// memory.
template <typename vec_t, bool kToUnrolled>
__global__ void __launch_bounds__(kThreads)
    permute_tokens_kernel(const vec_t* __restrict__ src, vec_t* __restrict__ dst, int64_t batch,
                          int64_t tokens, int64_t row_vecs, const TokenGeometry g) {
  __shared__ int64_t spatial_row[kThreads];  // [blockDim.y]: the tile's rows on the spatial side
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int64_t grid_tokens = int64_t(gridDim.x) * blockDim.y;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int64_t first = int64_t(blockIdx.x) * blockDim.y; first < tokens; first += grid_tokens) {
      if (tid < blockDim.y && first + tid < tokens) {
        const int64_t n = first + tid;  // unrolled token n = t * num_units + w
        const int64_t t = n / g.num_units, w = n - t * g.num_units;
        spatial_row[tid] = unit_offset(g, w) + in_unit_offset(g, t);
      }
      __syncthreads();
      const int64_t n = first + threadIdx.y;
      if (n < tokens) {
        const int64_t s = spatial_row[threadIdx.y];
        const vec_t* from = src + (b * tokens + (kToUnrolled ? s : n)) * row_vecs;
        vec_t* to = dst + (b * tokens + (kToUnrolled ? n : s)) * row_vecs;
        for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) to[v] = from[v];
      }
      __syncthreads();  // the next tile overwrites spatial_row
    }
  }
}

template <typename vec_t, bool kToUnrolled>
void launch(const void* x, void* out, int64_t batch, int64_t tokens, int64_t row_bytes,
            const TokenGeometry& g, cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const unsigned threads_x = static_cast<unsigned>(std::min<int64_t>(row_vecs, kThreads));
  const dim3 block(threads_x, kThreads / threads_x);  // 12 x 21 for 192-byte rows in 16-byte accesses
  permute_tokens_kernel<vec_t, kToUnrolled><<<image_grid(tokens, block.y, batch), block, 0, stream>>>(
      static_cast<const vec_t*>(x), static_cast<vec_t*>(out), batch, tokens, row_vecs, g);
}

// The widest access (16, 8, 4, 2 or 1 bytes) that divides the row and both base
// addresses, so that every row starts aligned and no row needs a tail.
template <bool kToUnrolled>
void launch_widest(const void* x, void* out, int64_t batch, int64_t tokens, int64_t row_bytes,
                   const TokenGeometry& g, cudaStream_t stream) {
  const auto fits = [&](uintptr_t bytes) {
    return is_aligned(bytes, {reinterpret_cast<uintptr_t>(x), reinterpret_cast<uintptr_t>(out),
                              static_cast<uintptr_t>(row_bytes)});
  };
  if (fits(16)) {
    launch<uint4, kToUnrolled>(x, out, batch, tokens, row_bytes, g, stream);
  } else if (fits(8)) {
    launch<uint2, kToUnrolled>(x, out, batch, tokens, row_bytes, g, stream);
  } else if (fits(4)) {
    launch<uint32_t, kToUnrolled>(x, out, batch, tokens, row_bytes, g, stream);
  } else if (fits(2)) {
    launch<uint16_t, kToUnrolled>(x, out, batch, tokens, row_bytes, g, stream);
  } else {
    launch<uint8_t, kToUnrolled>(x, out, batch, tokens, row_bytes, g, stream);
  }
}

}  // namespace

void launch_permute_tokens(PermuteDirection direction, const void* x, void* out, int64_t batch,
                           int64_t tokens, int64_t row_bytes, const TokenGeometry& geometry,
                           cudaStream_t stream) {
  if (direction == PermuteDirection::kToUnrolled) {
    launch_widest<true>(x, out, batch, tokens, row_bytes, geometry, stream);
  } else {
    launch_widest<false>(x, out, batch, tokens, row_bytes, geometry, stream);
  }
}

}  // namespace hiera_kernels
