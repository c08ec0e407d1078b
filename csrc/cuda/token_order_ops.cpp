// CUDA entry points of unroll and reroll (kernels in token_order.cu): the geometry
// checks shared with the CPU kernels (geometry.h), the device check, allocation and the
// launch on the current stream of x's device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_checks.h"
#include "hiera_kernels/geometry.h"
#include "launch.h"

namespace hiera_kernels {
namespace {

at::Tensor permute_tokens_cuda(const char* op, PermuteDirection direction, const at::Tensor& input,
                               at::IntArrayRef size, at::IntArrayRef strides, bool windowed) {
  const TokenGeometry g = make_token_geometry(op, input, size, strides, windowed);
  check_cuda_tensor(op, "x", input);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  if (g.steps == 0 || x.numel() == 0) return x.clone();  // the identity permutation, or nothing to move
  at::Tensor out = at::empty_like(x);
  launch_permute_tokens(direction, x.const_data_ptr(), out.mutable_data_ptr(), x.size(0), x.size(1),
                        x.size(2) * x.element_size(), g, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unroll_cuda(const at::Tensor& x, at::IntArrayRef size, at::IntArrayRef strides, bool windowed) {
  return permute_tokens_cuda("hiera_kernels::unroll", PermuteDirection::kToUnrolled, x, size, strides, windowed);
}

at::Tensor reroll_cuda(const at::Tensor& x, at::IntArrayRef size, at::IntArrayRef strides, bool windowed) {
  return permute_tokens_cuda("hiera_kernels::reroll", PermuteDirection::kToSpatial, x, size, strides, windowed);
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CUDA, m) {
  m.impl("unroll", &unroll_cuda);
  m.impl("reroll", &reroll_cuda);
}

}  // namespace hiera_kernels
