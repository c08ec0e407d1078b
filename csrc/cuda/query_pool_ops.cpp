// CUDA entry points of query_pool and its backward (kernels in query_pool.cu): the
// argument checks shared with the CPU kernels (pool_args.h), the device checks,
// allocation and the launch on the current stream of the input's device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda_checks.h"
#include "hiera_kernels/pool_args.h"
#include "launch.h"

namespace hiera_kernels {
namespace {

// check_pool_args (check_float_dtype) has admitted exactly these dtypes.
PoolType pool_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return PoolType::kFloat32;
    case at::kHalf: return PoolType::kFloat16;
    case at::kBFloat16: return PoolType::kBFloat16;
    case at::kDouble: return PoolType::kFloat64;
    default: TORCH_INTERNAL_ASSERT(false, "query_pool: check_pool_args let dtype ", t, " through");
  }
}

std::tuple<at::Tensor, at::Tensor> query_pool_cuda(const at::Tensor& input, int64_t stride) {
  check_query_pool_args(input, stride);
  check_cuda_tensor("hiera_kernels::query_pool", "x", input);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const int64_t batch = x.size(0), pooled = x.size(1) / stride, channels = x.size(2);
  at::Tensor out = at::empty({batch, pooled, channels}, x.options());
  at::Tensor argmax = at::empty({batch, pooled, channels}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, argmax};
  launch_query_pool(pool_type(x.scalar_type()), x.const_data_ptr(), out.mutable_data_ptr(),
                    argmax.mutable_data_ptr<uint8_t>(), batch, stride, pooled * channels,
                    c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, argmax};
}

at::Tensor query_pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& argmax, int64_t stride) {
  constexpr const char* op = "hiera_kernels::query_pool_backward";
  check_query_pool_backward_args(grad_out, argmax, stride);
  check_cuda_tensor(op, "grad_out", grad_out);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor a = argmax.contiguous();
  const int64_t batch = g.size(0), pooled = g.size(1), channels = g.size(2);
  at::Tensor grad_in = at::empty({batch, pooled * stride, channels}, g.options());
  if (grad_in.numel() == 0) return grad_in;
  launch_query_pool_backward(pool_type(g.scalar_type()), g.const_data_ptr(), a.const_data_ptr<uint8_t>(),
                             grad_in.mutable_data_ptr(), batch, stride, pooled * channels,
                             c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CUDA, m) {
  m.impl("query_pool", &query_pool_cuda);
  m.impl("query_pool_backward", &query_pool_backward_cuda);
}

}  // namespace hiera_kernels
