// Host-side construction and checking of a TokenGeometry, shared by the CPU and
// CUDA entry points. The Python op layer has already given friendly errors; these
// checks keep direct torch.ops calls from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "hiera_kernels/tensor_checks.h"
#include "hiera_kernels/token_order.h"

namespace hiera_kernels {

inline TokenGeometry make_token_geometry(const char* op, const at::Tensor& x, at::IntArrayRef size,
                                         at::IntArrayRef strides, bool windowed) {
  check_dims(op, "x", x, 3, "[B, N, C]");
  check_float_dtype(op, "x", x);  // the kernels move any element size; the ops are defined on these
  const int64_t dims = static_cast<int64_t>(size.size());
  TORCH_CHECK(dims >= 1 && dims <= kMaxDims, op, ": size must have 1 to ", kMaxDims,
              " dims, got ", dims);
  TORCH_CHECK(strides.size() % dims == 0, op, ": strides has ", strides.size(),
              " entries, not a multiple of the ", dims, " spatial dims");
  const int64_t steps = static_cast<int64_t>(strides.size()) / dims;
  TORCH_CHECK(steps <= kMaxSteps, op, ": at most ", kMaxSteps, " unroll steps, got ", steps);

  TokenGeometry g;
  g.dims = static_cast<int>(dims);
  g.steps = static_cast<int>(steps);
  g.windowed = windowed;
  for (int d = 0; d < dims; ++d) g.unit[d] = 1;
  for (int j = 0; j < steps; ++j) {
    for (int d = 0; d < dims; ++d) {
      const int64_t s = strides[j * dims + d];
      TORCH_CHECK(s >= 1, op, ": strides must be positive, got ", s);
      g.stride[j][d] = s;
      g.unit[d] *= s;
    }
  }
  for (int d = 0; d < dims; ++d) g.unit_size *= g.unit[d];
  const int64_t tokens = x.size(1);
  if (windowed) {
    TORCH_CHECK(tokens % g.unit_size == 0, op, ": N=", tokens,
                " is not a whole number of mask units of ", g.unit_size, " tokens");
    g.num_units = tokens / g.unit_size;
  } else {
    int64_t grid_tokens = 1;
    for (int d = 0; d < dims; ++d) {
      TORCH_CHECK(size[d] % g.unit[d] == 0, op, ": size[", d, "]=", size[d],
                  " is not divisible by the schedule's stride product ", g.unit[d]);
      g.grid[d] = size[d] / g.unit[d];
      g.num_units *= g.grid[d];
      grid_tokens *= size[d];
    }
    TORCH_CHECK(grid_tokens == tokens, op, ": x has N=", tokens, " tokens but size ", size,
                " holds ", grid_tokens);
  }
  int64_t row = 1;  // row-major strides over the spatial side's shape
  for (int d = g.dims - 1; d >= 0; --d) {
    g.spatial_stride[d] = row;
    row *= windowed ? g.unit[d] : g.grid[d] * g.unit[d];
  }
  return g;
}

}  // namespace hiera_kernels
