// CPU kernels for query pooling: out[b, i, c] = max_s x[b, s * No + i, c] with a
// one-byte argmax (s) for the backward, which writes every element of the input
// gradient once (the gradient or zero), so no separate zero fill.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "hiera_kernels/token_order.h"

namespace hiera_kernels {
namespace {

void check_pool_args(const char* op, const at::Tensor& x, int64_t stride) {
  TORCH_CHECK(x.dim() == 3, op, ": expected [B, N, C], got ", x.dim(), " dims");
  TORCH_CHECK(stride >= 1 && stride <= kMaxPoolStride, op, ": stride must be in [1, ",
              kMaxPoolStride, "] (one-byte argmax), got ", stride);
}

std::tuple<at::Tensor, at::Tensor> query_pool_cpu(const at::Tensor& input, int64_t stride) {
  check_pool_args("hiera_kernels::query_pool", input, stride);
  TORCH_CHECK(input.size(1) % stride == 0, "hiera_kernels::query_pool: N=", input.size(1),
              " is not divisible by stride=", stride);
  const at::Tensor x = input.contiguous();
  const int64_t batch = x.size(0), pooled = x.size(1) / stride, channels = x.size(2);
  at::Tensor out = at::empty({batch, pooled, channels}, x.options());
  at::Tensor argmax = at::empty({batch, pooled, channels}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "query_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    uint8_t* arg = argmax.mutable_data_ptr<uint8_t>();
    const int64_t slice = pooled * channels;  // elements between the stride slices
    at::parallel_for(0, batch * pooled, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / pooled, i = row - b * pooled;
        const scalar_t* in = src + b * stride * slice + i * channels;
        scalar_t* o = dst + row * channels;
        uint8_t* a = arg + row * channels;
        for (int64_t c = 0; c < channels; ++c) {
          o[c] = in[c];
          a[c] = 0;
        }
        for (int64_t s = 1; s < stride; ++s) {
          const scalar_t* in_s = in + s * slice;
          for (int64_t c = 0; c < channels; ++c) {
            if (pool_takes<acc_t>(in_s[c], o[c])) {
              o[c] = in_s[c];
              a[c] = static_cast<uint8_t>(s);
            }
          }
        }
      }
    });
  });
  return {out, argmax};
}

at::Tensor query_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& argmax,
                                   int64_t stride) {
  check_pool_args("hiera_kernels::query_pool_backward", grad_out, stride);
  TORCH_CHECK(argmax.sizes() == grad_out.sizes() && argmax.scalar_type() == at::kByte,
              "hiera_kernels::query_pool_backward: argmax must be uint8 of shape ",
              grad_out.sizes(), ", got ", argmax.scalar_type(), argmax.sizes());
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor a = argmax.contiguous();
  const int64_t batch = g.size(0), pooled = g.size(1), channels = g.size(2);
  at::Tensor grad_in = at::empty({batch, pooled * stride, channels}, g.options());
  if (grad_in.numel() == 0) return grad_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "query_pool_backward_cpu", [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    const uint8_t* arg = a.const_data_ptr<uint8_t>();
    scalar_t* dst = grad_in.mutable_data_ptr<scalar_t>();
    const int64_t slice = pooled * channels;
    at::parallel_for(0, batch * pooled, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / pooled, i = row - b * pooled;
        const scalar_t* go = src + row * channels;
        const uint8_t* ar = arg + row * channels;
        scalar_t* gi = dst + b * stride * slice + i * channels;
        for (int64_t s = 0; s < stride; ++s) {
          scalar_t* gi_s = gi + s * slice;
          for (int64_t c = 0; c < channels; ++c) {
            gi_s[c] = ar[c] == s ? go[c] : scalar_t(0);
          }
        }
      }
    });
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CPU, m) {
  m.impl("query_pool", &query_pool_cpu);
  m.impl("query_pool_backward", &query_pool_backward_cpu);
}

}  // namespace hiera_kernels
