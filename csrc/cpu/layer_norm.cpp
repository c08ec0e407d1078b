// CPU entry point of LayerNorm over the last dim: ATen's native_layer_norm contract
// (y in x's dtype; mean and rstd [..., 1] in x's dtype, as ATen's CPU kernel returns
// them, so that aten::native_layer_norm_backward takes them). The rows are the chosen
// build's layer_norm (cpu_kernels.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_dispatch.h"
#include "hiera_kernels/tensor_checks.h"

namespace hiera_kernels {
namespace {

constexpr int64_t kLayerNormGrain = 16 << 10;  // elements per task, at least one row

// weight or bias: absent, or [C] like x (dtype, device).
const void* affine_ptr(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x,
                       at::Tensor& contiguous) {
  if (!t.has_value()) return nullptr;
  check_same_device(op, name, *t, "x", x);
  check_dtype(op, name, *t, x.scalar_type(), " (like x)");
  check_shape(op, name, *t, {x.size(-1)});
  contiguous = t->contiguous();
  return contiguous.const_data_ptr();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(const at::Tensor& input,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "hiera_kernels::layer_norm";
  TORCH_CHECK(input.dim() >= 1, op, ": x must have at least one dim (the channels), got a scalar");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  check_float_dtype(op, "x", input);
  const CpuDtype dtype = cpu_dtype(op, input.scalar_type());
  at::Tensor w, b;
  const void* w_ptr = affine_ptr(op, "weight", weight, input, w);
  const void* b_ptr = affine_ptr(op, "bias", bias, input, b);
  const at::Tensor x = input.contiguous();
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  std::vector<int64_t> stat_shape(x.sizes().begin(), x.sizes().end());
  stat_shape.back() = 1;
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty(stat_shape, x.options());
  at::Tensor rstd = at::empty(stat_shape, x.options());
  if (rows == 0) {
    // No channels: ATen's mean of nothing is 0 and its rstd NaN (1 / sqrt(0 / 0 + eps)).
    mean.zero_();
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, mean, rstd};
  }
  const int64_t bytes = layer_norm_workspace(C) * (dtype == CpuDtype::kFloat64 ? 8 : 4);
  const void* src = x.const_data_ptr();
  void* dst = y.mutable_data_ptr();
  void* m = mean.mutable_data_ptr();
  void* r = rstd.mutable_data_ptr();
  const CpuKernels& kernels = cpu_kernels();
  at::parallel_for(0, rows, std::max<int64_t>(1, kLayerNormGrain / C), [&](int64_t begin, int64_t end) {
    const auto scratch = workspace(bytes);
    kernels.layer_norm(dtype, src, w_ptr, b_ptr, eps, C, dst, m, r, begin, end, scratch.get());
  });
  return {y, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CPU, m) {
  m.impl("layer_norm", &layer_norm_cpu);
}

}  // namespace hiera_kernels
