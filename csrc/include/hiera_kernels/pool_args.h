// Host-side checks of query_pool's arguments, shared by the CPU and CUDA entry points
// (as geometry.h is for unroll/reroll). The Python op layer has already given friendly
// errors; these checks keep direct torch.ops calls from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "hiera_kernels/tensor_checks.h"
#include "hiera_kernels/token_order.h"  // kMaxPoolStride

namespace hiera_kernels {

// x (or grad_out) is [B, N, C] in a float type the kernels compare in, and stride
// fits the one-byte argmax.
inline void check_pool_args(const char* op, const char* name, const at::Tensor& x, int64_t stride) {
  check_dims(op, name, x, 3, "[B, N, C]");
  TORCH_CHECK(stride >= 1 && stride <= kMaxPoolStride, op, ": stride must be in [1, ",
              kMaxPoolStride, "] (one-byte argmax), got ", stride);
  check_float_dtype(op, name, x);
}

// query_pool(x [B, N, C], stride): N splits into stride slabs of N / stride tokens.
inline void check_query_pool_args(const at::Tensor& x, int64_t stride) {
  constexpr const char* op = "hiera_kernels::query_pool";
  check_pool_args(op, "x", x, stride);
  TORCH_CHECK(x.size(1) % stride == 0, op, ": N=", x.size(1), " is not divisible by stride=", stride);
}

// query_pool_backward(grad_out [B, N / stride, C], argmax, stride): argmax is the
// forward's uint8 output, the same shape as grad_out, on its device.
inline void check_query_pool_backward_args(const at::Tensor& grad_out, const at::Tensor& argmax,
                                           int64_t stride) {
  constexpr const char* op = "hiera_kernels::query_pool_backward";
  check_pool_args(op, "grad_out", grad_out, stride);
  check_dtype(op, "argmax", argmax, at::kByte, " (query_pool's argmax)");
  check_shape(op, "argmax", argmax, grad_out.sizes());
  check_same_device(op, "argmax", argmax, "grad_out", grad_out);
}

}  // namespace hiera_kernels
