// CPU entry points of LayerNorm over the last dim: ATen's native_layer_norm contract
// (y in x's dtype; mean and rstd [..., 1] in x's dtype, as ATen's CPU kernel returns
// them, so that aten::native_layer_norm_backward takes them too), and its backward from
// those mean and rstd, with training's two fusions (y recomputed in the same pass, a skip
// gradient added with its column sums: hiera_kernels/library.py). The rows are the chosen
// build's layer_norm and layer_norm_backward (cpu_kernels.h).
#include <ATen/Dispatch.h>
#include <c10/util/accumulate.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "column_sums.h"
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
  const int64_t bytes = layer_norm_workspace(C) * c10::elementSize(accumulation_type(dtype));
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

// (grad_x, grad_weight, grad_bias, y, grad_skip_sum): the first three where output_mask
// says so, else an empty [0] tensor (a schema cannot return undefined tensors). Where eps
// is given, y is the forward's output recomputed: the forward kernel runs over each chunk
// of rows just before the backward does, so x comes from memory once for both and y has
// the forward's bits (bias: the forward's, read only for y). Where grad_skip is given
// (needs grad_x), grad_x is LayerNorm's plus grad_skip, rounded once, and grad_skip_sum
// its column sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const std::optional<at::Tensor>& weight, std::array<bool, 3> output_mask, const std::optional<at::Tensor>& bias,
    std::optional<double> eps, const std::optional<at::Tensor>& grad_skip_in) {
  constexpr const char* op = "hiera_kernels::layer_norm_backward";
  TORCH_CHECK(x_in.dim() >= 1, op, ": x must have at least one dim (the channels), got a scalar");
  check_float_dtype(op, "x", x_in);
  const CpuDtype dtype = cpu_dtype(op, x_in.scalar_type());
  check_same_device(op, "grad_y", grad_y_in, "x", x_in);
  check_dtype(op, "grad_y", grad_y_in, x_in.scalar_type(), " (like x)");
  check_shape(op, "grad_y", grad_y_in, x_in.sizes());
  // rows: x's leading dims (the forward's mean and rstd count); with no channels there is
  // nothing to walk.
  const int64_t C = x_in.size(-1);
  const int64_t x_rows = c10::multiply_integers(x_in.sizes().begin(), x_in.sizes().end() - 1);
  const int64_t rows = C == 0 ? 0 : x_rows;
  for (const auto& [name, stat] : {std::pair<const char*, const at::Tensor&>{"mean", mean_in}, {"rstd", rstd_in}}) {
    check_same_device(op, name, stat, "x", x_in);
    check_dtype(op, name, stat, x_in.scalar_type(), " (like x: the forward's)");
    TORCH_CHECK(stat.numel() == x_rows, op, ": ", name, " must have one value per row of x (", x_rows, "), got ",
                stat.numel());
  }
  at::Tensor w, b;
  const void* w_ptr = affine_ptr(op, "weight", weight, x_in, w);
  TORCH_CHECK(eps.has_value() || !bias.has_value(), op,
              ": bias is read only to recompute y, which needs the forward's eps: got a bias and no eps");
  TORCH_CHECK(!eps.has_value() || (std::isfinite(*eps) && *eps >= 0), op, ": eps must be finite and >= 0, got ", *eps);
  const void* b_ptr = affine_ptr(op, "bias", bias, x_in, b);
  at::Tensor grad_skip;
  if (grad_skip_in.has_value()) {
    TORCH_CHECK(output_mask[0], op, ": grad_skip is added to grad_x, which output_mask[0] does not ask for");
    check_same_device(op, "grad_skip", *grad_skip_in, "x", x_in);
    check_dtype(op, "grad_skip", *grad_skip_in, x_in.scalar_type(), " (like x)");
    check_shape(op, "grad_skip", *grad_skip_in, x_in.sizes());
    grad_skip = grad_skip_in->contiguous();
  }
  const at::Tensor x = x_in.contiguous(), grad_y = grad_y_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = output_mask[0] ? at::empty(x.sizes(), x.options()) : empty();
  at::Tensor y = eps.has_value() ? at::empty(x.sizes(), x.options()) : empty();
  // Each chunk's column sums (grad_weight's and grad_bias's, computed whatever the mask
  // says: see the kernel; grad_skip's third).
  const int64_t sum_rows = grad_skip.defined() ? 3 : 2;
  const RowChunks chunks(rows, C, kLayerNormGrain);
  at::Tensor partials = chunks.partials(sum_rows * C, dtype, x.options());
  if (rows > 0) {
    const int64_t workspace = std::max(layer_norm_backward_workspace(C), eps ? layer_norm_workspace(C) : 0);
    const int64_t bytes = workspace * c10::elementSize(accumulation_type(dtype));
    // The recomputed forward's own mean and rstd (its bits; the backward reads the saved ones).
    at::Tensor forward_mean = eps ? at::empty({rows}, x.options()) : empty();
    at::Tensor forward_rstd = eps ? at::empty({rows}, x.options()) : empty();
    void* y_out = eps ? y.mutable_data_ptr() : nullptr;
    void* fm = forward_mean.mutable_data_ptr();
    void* fr = forward_rstd.mutable_data_ptr();
    const void* dy = grad_y.const_data_ptr();
    const void* src = x.const_data_ptr();
    const void* m = mean.const_data_ptr();
    const void* r = rstd.const_data_ptr();
    const void* skip = grad_skip.defined() ? grad_skip.const_data_ptr() : nullptr;
    void* dx = output_mask[0] ? grad_x.mutable_data_ptr() : nullptr;
    const CpuKernels& kernels = cpu_kernels();
    chunks.run(partials, bytes, [&](int64_t first, int64_t last, void* sums, void* scratch) {
      if (y_out != nullptr) kernels.layer_norm(dtype, src, w_ptr, b_ptr, *eps, C, y_out, fm, fr, first, last, scratch);
      kernels.layer_norm_backward(dtype, dy, src, m, r, w_ptr, C, skip, dx, sums, first, last, scratch);
    });
  }
  at::Tensor grad_weight = at::empty({output_mask[1] ? C : 0}, x.options());
  at::Tensor grad_bias = at::empty({output_mask[2] ? C : 0}, x.options());
  at::Tensor grad_skip_sum = at::empty({grad_skip.defined() ? C : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    if (output_mask[1]) add_up_chunks<scalar_t>(partials, 0, C, grad_weight);
    if (output_mask[2]) add_up_chunks<scalar_t>(partials, C, C, grad_bias);
    if (grad_skip.defined()) add_up_chunks<scalar_t>(partials, 2 * C, C, grad_skip_sum);
  });
  return {grad_x, grad_weight, grad_bias, y, grad_skip_sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CPU, m) {
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

}  // namespace hiera_kernels
