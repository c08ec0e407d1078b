// Host-side checks of query_pool's arguments, shared by the CPU and CUDA entry points
// (as geometry.h is for unroll/reroll). The Python op layer has already given friendly
// errors; these checks keep direct torch.ops calls from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "hiera_kernels/token_order.h"  // kMaxPoolStride

namespace hiera_kernels {

// x (or grad_out) is [B, N, C] in a float type the kernels compare in, and stride
// fits the one-byte argmax.
inline void check_pool_args(const char* op, const at::Tensor& x, int64_t stride) {
  TORCH_CHECK(x.dim() == 3, op, ": expected [B, N, C], got ", x.dim(), " dims");
  TORCH_CHECK(stride >= 1 && stride <= kMaxPoolStride, op, ": stride must be in [1, ",
              kMaxPoolStride, "] (one-byte argmax), got ", stride);
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, op,
              ": dtype ", t, " is not supported (float32, float16, bfloat16, float64)");
}

// query_pool(x [B, N, C], stride): N splits into stride slabs of N / stride tokens.
inline void check_query_pool_args(const at::Tensor& x, int64_t stride) {
  constexpr const char* op = "hiera_kernels::query_pool";
  check_pool_args(op, x, stride);
  TORCH_CHECK(x.size(1) % stride == 0, op, ": N=", x.size(1), " is not divisible by stride=", stride);
}

// query_pool_backward(grad_out [B, N / stride, C], argmax, stride): argmax is the
// forward's uint8 output, the same shape as grad_out.
inline void check_query_pool_backward_args(const at::Tensor& grad_out, const at::Tensor& argmax,
                                           int64_t stride) {
  constexpr const char* op = "hiera_kernels::query_pool_backward";
  check_pool_args(op, grad_out, stride);
  TORCH_CHECK(argmax.sizes() == grad_out.sizes() && argmax.scalar_type() == at::kByte, op,
              ": argmax must be uint8 of shape ", grad_out.sizes(), ", got ", argmax.scalar_type(),
              argmax.sizes());
}

}  // namespace hiera_kernels
