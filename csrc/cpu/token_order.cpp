// CPU kernels for unroll and reroll: one pass over the tokens, each token's
// C channels moved as one contiguous block, the source/destination token found
// by the index arithmetic of token_order.h (no index tensor in memory).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstring>

#include "hiera_kernels/geometry.h"

namespace hiera_kernels {
namespace {

// kToUnrolled: out[b, n] = x[b, spatial_index(n)] (unroll, a gather).
// Otherwise:   out[b, spatial_index(n)] = x[b, n] (reroll, a scatter to distinct rows).
template <bool kToUnrolled>
at::Tensor permute_tokens(const char* op, const at::Tensor& input, at::IntArrayRef size,
                          at::IntArrayRef strides, bool windowed) {
  const TokenGeometry g = make_token_geometry(op, input, size, strides, windowed);
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t batch = x.size(0), tokens = x.size(1);
  const int64_t row_bytes = x.size(2) * x.element_size();
  if (x.numel() == 0) return out;
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  // Aim for ~64 KiB of copying per task so small rows still amortise scheduling.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, batch * tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / tokens, n = row - b * tokens;
      const int64_t s = b * tokens + spatial_index(g, n);
      const int64_t from = kToUnrolled ? s : row, to = kToUnrolled ? row : s;
      std::memcpy(dst + to * row_bytes, src + from * row_bytes, row_bytes);
    }
  });
  return out;
}

at::Tensor unroll_cpu(const at::Tensor& x, at::IntArrayRef size, at::IntArrayRef strides,
                      bool windowed) {
  return permute_tokens<true>("hiera_kernels::unroll", x, size, strides, windowed);
}

at::Tensor reroll_cpu(const at::Tensor& x, at::IntArrayRef size, at::IntArrayRef strides,
                      bool windowed) {
  return permute_tokens<false>("hiera_kernels::reroll", x, size, strides, windowed);
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CPU, m) {
  m.impl("unroll", &unroll_cpu);
  m.impl("reroll", &reroll_cpu);
}

}  // namespace hiera_kernels
