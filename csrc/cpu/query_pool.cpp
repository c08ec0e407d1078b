// CPU entry points of query pooling: out[b, i, c] = max_s x[b, s * No + i, c] with a
// one-byte argmax (s) for the backward. The loops are the chosen build's
// query_pool / query_pool_backward (cpu_kernels.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "cpu_dispatch.h"
#include "hiera_kernels/pool_args.h"

namespace hiera_kernels {
namespace {

constexpr int64_t kPoolGrain = 16 << 10;  // elements per task

std::tuple<at::Tensor, at::Tensor> query_pool_cpu(const at::Tensor& input, int64_t stride) {
  constexpr const char* op = "hiera_kernels::query_pool";
  check_query_pool_args(input, stride);
  const at::Tensor x = input.contiguous();
  const int64_t batch = x.size(0), pooled = x.size(1) / stride, channels = x.size(2);
  at::Tensor out = at::empty({batch, pooled, channels}, x.options());
  at::Tensor argmax = at::empty({batch, pooled, channels}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, argmax};
  const int64_t slab = pooled * channels;
  const CpuDtype dtype = cpu_dtype(op, x.scalar_type());
  const void* src = x.const_data_ptr();
  void* dst = out.mutable_data_ptr();
  uint8_t* arg = argmax.mutable_data_ptr<uint8_t>();
  const CpuKernels& kernels = cpu_kernels();
  at::parallel_for(0, batch * slab, kPoolGrain, [&](int64_t begin, int64_t end) {
    kernels.query_pool(dtype, src, dst, arg, stride, slab, begin, end);
  });
  return {out, argmax};
}

at::Tensor query_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& argmax, int64_t stride) {
  check_query_pool_backward_args(grad_out, argmax, stride);
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor a = argmax.contiguous();
  const int64_t batch = g.size(0), pooled = g.size(1), channels = g.size(2);
  at::Tensor grad_in = at::empty({batch, pooled * stride, channels}, g.options());
  if (grad_in.numel() == 0) return grad_in;
  const int64_t slab = pooled * channels, element_size = g.element_size();
  const void* src = g.const_data_ptr();
  const uint8_t* arg = a.const_data_ptr<uint8_t>();
  void* dst = grad_in.mutable_data_ptr();
  const CpuKernels& kernels = cpu_kernels();
  at::parallel_for(0, batch * slab, kPoolGrain, [&](int64_t begin, int64_t end) {
    kernels.query_pool_backward(element_size, src, arg, dst, stride, slab, begin, end);
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CPU, m) {
  m.impl("query_pool", &query_pool_cpu);
  m.impl("query_pool_backward", &query_pool_backward_cpu);
}

}  // namespace hiera_kernels
