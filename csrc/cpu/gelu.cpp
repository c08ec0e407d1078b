// CPU entry point of the exact GELU recomputed with its backward (training's recompute
// ops, hiera_kernels/recompute.py): (gelu(h), grad_out * gelu'(h)) in one pass, and fc1's
// bias gradient (grad_h's column sums) in the same pass where asked. The rows are the
// chosen build's gelu_recompute_backward (cpu_kernels.h).
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "column_sums.h"
#include "cpu_dispatch.h"
#include "hiera_kernels/tensor_checks.h"

namespace hiera_kernels {
namespace {

constexpr int64_t kGeluGrain = 32 << 10;  // elements per task (whole rows, at least one)

// Writes gelu(h) into out and grad_h into grad_h (contiguous, h's shape; grad_h may be
// grad_out itself: each block of a row is read before it is written); returns grad_bias,
// grad_h summed over every dim but the last (fc1's bias gradient, h its output) where
// bias_grad, else an empty [0] tensor.
at::Tensor gelu_recompute_backward_into(const char* op, const at::Tensor& grad_out, const at::Tensor& h,
                                        bool bias_grad, at::Tensor& out, at::Tensor& grad_h) {
  const CpuDtype dtype = cpu_dtype(op, h.scalar_type());
  const int64_t width = h.dim() == 0 ? 1 : h.size(-1), rows = width == 0 ? 0 : h.numel() / width;
  // Each chunk's column sums of grad_h, added up in order below (the same bits on any
  // number of threads).
  const RowChunks chunks(rows, width, kGeluGrain);
  at::Tensor partials = chunks.partials(bias_grad ? width : 0, dtype, h.options());
  const auto* g = static_cast<const unsigned char*>(grad_out.const_data_ptr());
  const auto* x = static_cast<const unsigned char*>(h.const_data_ptr());
  auto* o = static_cast<unsigned char*>(out.mutable_data_ptr());
  auto* gh = static_cast<unsigned char*>(grad_h.mutable_data_ptr());
  const CpuKernels& kernels = cpu_kernels();
  if (bias_grad && rows > 0) {
    chunks.run(partials, 0, [&](int64_t first, int64_t last, void* sums, void*) {
      kernels.gelu_recompute_backward(dtype, g, x, o, gh, width, sums, first, last);
    });
  } else if (!bias_grad && h.numel() > 0) {
    // No column sums: any split of the elements will do (a range is one "row" of its own
    // length), so a few wide rows or a 1-D h still use every thread.
    const int64_t size = h.element_size();
    at::parallel_for(0, h.numel(), kGeluGrain, [&](int64_t begin, int64_t end) {
      const int64_t at = begin * size;
      kernels.gelu_recompute_backward(dtype, g + at, x + at, o + at, gh + at, end - begin, nullptr, 0, 1);
    });
  }
  at::Tensor grad_bias = at::empty({bias_grad ? width : 0}, h.options());
  if (bias_grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "hiera_kernels::gelu_recompute_backward",
                                    [&] { add_up_chunks<scalar_t>(partials, 0, width, grad_bias); });
  }
  return grad_bias;
}

void check_arguments(const char* op, const at::Tensor& grad_out, const at::Tensor& h, bool bias_grad) {
  check_float_dtype(op, "h", h);
  check_same_device(op, "grad_out", grad_out, "h", h);
  check_dtype(op, "grad_out", grad_out, h.scalar_type(), " (like h)");
  check_shape(op, "grad_out", grad_out, h.sizes());
  TORCH_CHECK(!bias_grad || h.dim() >= 1, op, ": bias_grad needs h with at least one dim (the features), got a scalar");
}

// (gelu(h), grad_h, grad_bias), all new tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_recompute_backward_cpu(const at::Tensor& grad_out_in,
                                                                           const at::Tensor& h_in, bool bias_grad) {
  constexpr const char* op = "hiera_kernels::gelu_recompute_backward";
  check_arguments(op, grad_out_in, h_in, bias_grad);
  const at::Tensor h = h_in.contiguous(), grad_out = grad_out_in.contiguous();
  at::Tensor out = at::empty(h.sizes(), h.options());
  at::Tensor grad_h = at::empty(h.sizes(), h.options());
  at::Tensor grad_bias = gelu_recompute_backward_into(op, grad_out, h, bias_grad, out, grad_h);
  return {out, grad_h, grad_bias};
}

// The same with grad_h written over grad_out: one [rows, hidden] buffer fewer in the
// MLP's backward (grad_out there is fc2's input gradient, a temporary). Returns
// (gelu(h), grad_bias).
std::tuple<at::Tensor, at::Tensor> gelu_recompute_backward_in_place_cpu(at::Tensor& grad_out, const at::Tensor& h_in,
                                                                        bool bias_grad) {
  constexpr const char* op = "hiera_kernels::gelu_recompute_backward_";
  check_arguments(op, grad_out, h_in, bias_grad);
  TORCH_CHECK(grad_out.is_contiguous(), op, ": grad_out must be contiguous (it is overwritten with grad_h), got strides ",
              grad_out.strides());
  at::assert_no_overlap(grad_out, h_in);  // h is read, not written: it must not share memory with grad_out
  const at::Tensor h = h_in.contiguous();
  at::Tensor out = at::empty(h.sizes(), h.options());
  at::Tensor grad_bias = gelu_recompute_backward_into(op, grad_out, h, bias_grad, out, grad_out);
  return {out, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CPU, m) {
  m.impl("gelu_recompute_backward", &gelu_recompute_backward_cpu);
  m.impl("gelu_recompute_backward_", &gelu_recompute_backward_in_place_cpu);
}

}  // namespace hiera_kernels
