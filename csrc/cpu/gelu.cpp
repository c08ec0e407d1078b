// CPU entry point of the exact GELU recomputed with its backward (training's recompute
// ops, hiera_kernels/recompute.py): (gelu(h), grad_out * gelu'(h)) in one pass. The
// elements are the chosen build's gelu_recompute_backward (cpu_kernels.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "cpu_dispatch.h"
#include "hiera_kernels/tensor_checks.h"

namespace hiera_kernels {
namespace {

constexpr int64_t kGeluGrain = 32 << 10;  // elements per task

std::tuple<at::Tensor, at::Tensor> gelu_recompute_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& h_in) {
  constexpr const char* op = "hiera_kernels::gelu_recompute_backward";
  check_float_dtype(op, "h", h_in);
  check_same_device(op, "grad_out", grad_out_in, "h", h_in);
  check_dtype(op, "grad_out", grad_out_in, h_in.scalar_type(), " (like h)");
  check_shape(op, "grad_out", grad_out_in, h_in.sizes());
  const CpuDtype dtype = cpu_dtype(op, h_in.scalar_type());
  const at::Tensor h = h_in.contiguous(), grad_out = grad_out_in.contiguous();
  at::Tensor out = at::empty(h.sizes(), h.options());
  at::Tensor grad_h = at::empty(h.sizes(), h.options());
  if (h.numel() == 0) return {out, grad_h};
  const void* g = grad_out.const_data_ptr();
  const void* x = h.const_data_ptr();
  void* o = out.mutable_data_ptr();
  void* gh = grad_h.mutable_data_ptr();
  const CpuKernels& kernels = cpu_kernels();
  at::parallel_for(0, h.numel(), kGeluGrain, [&](int64_t begin, int64_t end) {
    kernels.gelu_recompute_backward(dtype, g, x, o, gh, begin, end);
  });
  return {out, grad_h};
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CPU, m) {
  m.impl("gelu_recompute_backward", &gelu_recompute_backward_cpu);
}

}  // namespace hiera_kernels
