// CPU kernels for query pooling: out[b, i, c] = max_s x[b, s * No + i, c] with a
// one-byte argmax (s) for the backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <cstring>
#include <tuple>


#include "hiera_kernels/pool_args.h"
#include "pool_rows.h"

namespace hiera_kernels {
namespace {

// In [B, N, C] with N = stride * No, the stride slices of one image are `stride`
// contiguous slabs of No * C elements, so pooling is an elementwise max across
// slabs: a branch-free loop the compiler vectorises.
constexpr int64_t kPoolGrain = 16 << 10;  // elements per task

std::tuple<at::Tensor, at::Tensor> query_pool_cpu(const at::Tensor& input, int64_t stride) {
  check_query_pool_args(input, stride);
  const at::Tensor x = input.contiguous();
  const int64_t batch = x.size(0), pooled = x.size(1) / stride, channels = x.size(2);
  at::Tensor out = at::empty({batch, pooled, channels}, x.options());
  at::Tensor argmax = at::empty({batch, pooled, channels}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, argmax};
  const int64_t slab = pooled * channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "query_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    uint8_t* arg = argmax.mutable_data_ptr<uint8_t>();
    at::parallel_for(0, batch * slab, kPoolGrain, [&](int64_t begin, int64_t end) {
      while (begin < end) {  // split [begin, end) at image boundaries
        const int64_t b = begin / slab, j0 = begin - b * slab;
        const int64_t j1 = std::min(slab, j0 + (end - begin));
        const scalar_t* in = src + b * stride * slab;
        for (int64_t k0 = j0; k0 < j1; k0 += kPoolRowBlock) {
          const int64_t n = std::min(kPoolRowBlock, j1 - k0);
          acc_t best[kPoolRowBlock];
          max_over_rows(in + k0, slab, stride, n, best, arg + b * slab + k0);
          scalar_t* out_block = dst + b * slab + k0;
          for (int64_t k = 0; k < n; ++k) out_block[k] = static_cast<scalar_t>(best[k]);
        }
        begin += j1 - j0;
      }
    });
  });
  return {out, argmax};
}

at::Tensor query_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& argmax,
                                   int64_t stride) {
  check_query_pool_backward_args(grad_out, argmax, stride);
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor a = argmax.contiguous();
  const int64_t batch = g.size(0), pooled = g.size(1), channels = g.size(2);
  at::Tensor grad_in = at::empty({batch, pooled * stride, channels}, g.options());
  if (grad_in.numel() == 0) return grad_in;
  const int64_t slab = pooled * channels;
  // A selection, not arithmetic: move raw bits (all-zero bits are +0.0 in every
  // float format), so one loop per element size serves every dtype and vectorises.
  auto scatter = [&](auto bits_tag) {
    using bits_t = decltype(bits_tag);
    const bits_t* src = static_cast<const bits_t*>(g.const_data_ptr());
    const uint8_t* arg = a.const_data_ptr<uint8_t>();
    bits_t* dst = static_cast<bits_t*>(grad_in.mutable_data_ptr());
    at::parallel_for(0, batch * slab, kPoolGrain, [&](int64_t begin, int64_t end) {
      while (begin < end) {
        const int64_t b = begin / slab, j0 = begin - b * slab;
        const int64_t j1 = std::min(slab, j0 + (end - begin));
        const bits_t* __restrict__ go = src + b * slab;
        const uint8_t* __restrict__ ar = arg + b * slab;
        for (int64_t s = 0; s < stride; ++s) {  // every input element written once: no zero fill
          bits_t* __restrict__ gi_s = dst + b * stride * slab + s * slab;
          const uint8_t tag = static_cast<uint8_t>(s);
          for (int64_t j = j0; j < j1; ++j) gi_s[j] = ar[j] == tag ? go[j] : bits_t(0);
        }
        begin += j1 - j0;
      }
    });
  };
  switch (g.element_size()) {
    case 2: scatter(uint16_t{}); break;
    case 4: scatter(uint32_t{}); break;
    case 8: scatter(uint64_t{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "query_pool_backward: check_pool_args let dtype ", g.scalar_type(), " through");
  }
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CPU, m) {
  m.impl("query_pool", &query_pool_cpu);
  m.impl("query_pool_backward", &query_pool_backward_cpu);
}

}  // namespace hiera_kernels
