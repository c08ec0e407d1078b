// Launchers of the CUDA kernels, called by the torch-facing entry points (*_ops.cpp).
// Plain C++ (raw pointers, int64 sizes, the stream to launch on) so that the .cu files
// compile without torch headers. The caller has checked the arguments, made the tensors
// contiguous, skipped empty ones, and checks the launch with C10_CUDA_KERNEL_LAUNCH_CHECK.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "hiera_kernels/token_order.h"  // TokenGeometry

namespace hiera_kernels {

// With s(n) = unit_offset(w) + in_unit_offset(t) the spatial row of unrolled token
// n = t * num_units + w (token_order.h), on x and out of [batch, tokens, row_bytes] bytes:
enum class PermuteDirection {
  kToUnrolled,  // unroll, a gather:  out[b, n] = x[b, s(n)]
  kToSpatial,   // reroll, a scatter: out[b, s(n)] = x[b, n]
};
void launch_permute_tokens(PermuteDirection direction, const void* x, void* out, int64_t batch,
                           int64_t tokens, int64_t row_bytes, const TokenGeometry& geometry,
                           cudaStream_t stream);

enum class PoolType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// x [batch, stride, slab] elements -> out and argmax [batch, slab]: the max over the
// stride slabs and the first slab holding it (slab = N / stride * C).
void launch_query_pool(PoolType type, const void* x, void* out, uint8_t* argmax, int64_t batch,
                       int64_t stride, int64_t slab, cudaStream_t stream);

// grad_out and argmax [batch, slab] -> grad_in [batch, stride, slab]: grad_out where the
// argmax names the slab, +0.0 elsewhere (raw bits move: one kernel per element size).
void launch_query_pool_backward(PoolType type, const void* grad_out, const uint8_t* argmax,
                                void* grad_in, int64_t batch, int64_t stride, int64_t slab,
                                cudaStream_t stream);

}  // namespace hiera_kernels
