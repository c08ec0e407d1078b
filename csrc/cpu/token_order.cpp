// CPU entry points of unroll and reroll: one pass over the tokens, each token's C
// channels moved as one contiguous block, the source/destination token found by the
// index arithmetic of token_order.h (no per-token index tensor). The loop itself is
// the chosen build's permute_tokens (cpu_kernels.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_dispatch.h"
#include "hiera_kernels/geometry.h"

namespace hiera_kernels {
namespace {

at::Tensor permute_tokens(const char* op, bool to_unrolled, const at::Tensor& input, at::IntArrayRef size,
                          at::IntArrayRef strides, bool windowed) {
  const TokenGeometry g = make_token_geometry(op, input, size, strides, windowed);
  const at::Tensor x = input.contiguous();
  if (g.steps == 0 || x.numel() == 0) return x.clone();  // the identity permutation
  at::Tensor out = at::empty_like(x);
  const int64_t batch = x.size(0), tokens = x.size(1);
  const int64_t row_bytes = x.size(2) * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());

  std::vector<int64_t> unit_base(g.num_units);  // num_units = N / unit_size entries, not N
  for (int64_t w = 0; w < g.num_units; ++w) unit_base[w] = unit_offset(g, w);
  const int64_t task_bytes = g.num_units * row_bytes;
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(task_bytes, 1));
  const CpuKernels& kernels = cpu_kernels();
  at::parallel_for(0, batch * g.unit_size, grain, [&](int64_t begin, int64_t end) {
    kernels.permute_tokens(to_unrolled, g, unit_base.data(), src, dst, tokens, row_bytes, begin, end);
  });
  return out;
}

at::Tensor unroll_cpu(const at::Tensor& x, at::IntArrayRef size, at::IntArrayRef strides, bool windowed) {
  return permute_tokens("hiera_kernels::unroll", true, x, size, strides, windowed);
}

at::Tensor reroll_cpu(const at::Tensor& x, at::IntArrayRef size, at::IntArrayRef strides, bool windowed) {
  return permute_tokens("hiera_kernels::reroll", false, x, size, strides, windowed);
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CPU, m) {
  m.impl("unroll", &unroll_cpu);
  m.impl("reroll", &reroll_cpu);
}

}  // namespace hiera_kernels
