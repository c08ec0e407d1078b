// Hiera's token orders, as index arithmetic shared by the CPU and CUDA kernels.
//
// Unrolled order (spec §4): with a schedule of k strides S_1..S_k over D spatial
// dims, token n = t * num_units + w, where w is the mask unit (window) and the
// in-unit position t is the mixed-radix number [r1_0..r1_{D-1}, ..., rk_0..rk_{D-1}]
// (r1 most significant). The in-unit coordinate is
//   m_d = r1_d + S1_d * (r2_d + S2_d * (... + S{k-1}_d * rk_d)).
// Raster order: p_d = g_d * mu_d + m_d with g the unit's coordinate on the unit
// grid (w in row-major order over it). Windowed order (Reroll with a mask):
// w * unit_size + m in row-major order over the unit shape mu.
//
// Everything is int64: B * N * C can pass 2^31 at high resolution.
#pragma once

#include <cstdint>

// Always inlined, on the host too: the CPU kernels compile these functions once per
// instruction set (csrc/cpu/kernels_impl.h), and an out-of-line copy, having external
// linkage, would be shared by every build (the linker keeps one): an AVX-512 copy
// could then run on an AVX2 CPU.
#if defined(__CUDACC__)
#define HK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HK_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace hiera_kernels {

// The Python copy: library.py's MAX_DIMS and MAX_STEPS.
constexpr int kMaxDims = 4;
constexpr int kMaxSteps = 8;

struct TokenGeometry {
  int dims = 0;            // D spatial dims
  int steps = 0;           // k unroll steps
  bool windowed = false;   // spatial side is windowed order instead of raster
  int64_t stride[kMaxSteps][kMaxDims] = {};  // S_{j+1}_d
  int64_t unit[kMaxDims] = {};               // mu_d = prod_j S_j_d
  int64_t grid[kMaxDims] = {};               // units per dim (raster order only)
  int64_t spatial_stride[kMaxDims] = {};     // token stride of dim d on the spatial side:
                                             // over size (raster) or over mu (windowed)
  int64_t unit_size = 1;                     // prod_d mu_d
  int64_t num_units = 1;                     // windows per image: N / unit_size
};

// Token n = t * num_units + w sits at spatial index
//   unit_offset(g, w) + in_unit_offset(g, t)
// in raster (or windowed) order: the unit's first token plus the position inside it.
// Kernels that walk a unit's tokens compute the unit's part once.

// Spatial offset of in-unit position t (the digits [r1..rk]) from its unit's first token.
HK_HOST_DEVICE int64_t in_unit_offset(const TokenGeometry& g, int64_t t) {
  int64_t m[kMaxDims] = {0, 0, 0, 0};
  // r1 is the most significant digit of t but the least significant of m:
  // peel digits from the least significant end of t (rk_{D-1} first).
  // The dim loops run to kMaxDims (spatial_stride is 0 past g.dims) so that on the GPU
  // they unroll and m stays in registers instead of local memory.
  for (int j = g.steps - 1; j >= 0; --j) {
    for (int d = kMaxDims - 1; d >= 0; --d) {
      if (d >= g.dims) continue;
      const int64_t s = g.stride[j][d];
      m[d] = m[d] * s + t % s;  // Horner: digit r_{j+1} has radix and weight S_{j+1}
      t /= s;
    }
  }
  int64_t offset = 0;
  for (int d = 0; d < kMaxDims; ++d) offset += m[d] * g.spatial_stride[d];
  return offset;
}

// Spatial index of the first token of unit w.
HK_HOST_DEVICE int64_t unit_offset(const TokenGeometry& g, int64_t w) {
  if (g.windowed) return w * g.unit_size;
  int64_t offset = 0;
  for (int d = g.dims - 1; d >= 0; --d) {  // w is row-major over the unit grid
    offset += (w % g.grid[d]) * g.unit[d] * g.spatial_stride[d];
    w /= g.grid[d];
  }
  return offset;
}

// Query pooling (spec §5): output token i of [B, N / stride, C] is the max over
// input tokens s * (N / stride) + i, s = 0..stride-1. The argmax is one byte; SAM 2's
// window attention pools s x s candidates into it. The Python copy: library.py's
// MAX_POOL_STRIDE and MAX_WINDOW_Q_STRIDE.
constexpr int64_t kMaxPoolStride = 256;
constexpr int64_t kMaxWindowQStride = 16;
static_assert(kMaxWindowQStride * kMaxWindowQStride == kMaxPoolStride, "s * s candidates fill the one-byte argmax");

// Max with PyTorch's max(dim) semantics: the first maximum wins ties and the
// first NaN wins over everything.
template <typename acc_t>
HK_HOST_DEVICE bool pool_takes(acc_t candidate, acc_t best) {
  return candidate > best || (candidate != candidate && best == best);
}

// Max with MaxPool2d's semantics (what SAM 2's q pool runs): scanning the window in
// raster order, a candidate replaces the best when bigger or NaN, so the first maximum
// wins ties and the last NaN wins.
template <typename acc_t>
HK_HOST_DEVICE bool max_pool2d_takes(acc_t candidate, acc_t best) {
  return candidate > best || candidate != candidate;
}

}  // namespace hiera_kernels
