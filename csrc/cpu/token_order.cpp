// CPU kernels for unroll and reroll: one pass over the tokens, each token's
// C channels moved as one contiguous block, the source/destination token found
// by the index arithmetic of token_order.h (no per-token index tensor).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "hiera_kernels/geometry.h"

namespace hiera_kernels {
namespace {

// A token's channels: rows are short (192 B for 96 bf16 channels), so inlined
// fixed-size word copies (which the compiler turns into vector moves) beat a
// memcpy call per row.
inline void copy_row(char* dst, const char* src, int64_t bytes) {
  int64_t i = 0;
  for (; i + 32 <= bytes; i += 32) std::memcpy(dst + i, src + i, 32);
  for (; i + 4 <= bytes; i += 4) std::memcpy(dst + i, src + i, 4);
  if (i < bytes) std::memcpy(dst + i, src + i, bytes - i);
}

// With s(n) = unit_offset(w) + in_unit_offset(t) the spatial index of token n = t * nw + w:
// kToUnrolled: out[b, n] = x[b, s(n)] (unroll, a gather).
// Otherwise:   out[b, s(n)] = x[b, n] (reroll, a scatter to distinct rows).
// One task moves the num_units tokens of one in-unit position t of one image: a
// contiguous run on the unrolled side, unit_offset(w) apart on the spatial side.
template <bool kToUnrolled>
at::Tensor permute_tokens(const char* op, const at::Tensor& input, at::IntArrayRef size,
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
  at::parallel_for(0, batch * g.unit_size, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.unit_size, t = task - b * g.unit_size;
      const int64_t unrolled = b * tokens + t * g.num_units;
      const int64_t spatial = b * tokens + in_unit_offset(g, t);
      for (int64_t w = 0; w < g.num_units; ++w) {
        const int64_t u = (unrolled + w) * row_bytes, s = (spatial + unit_base[w]) * row_bytes;
        if constexpr (kToUnrolled) {
          copy_row(dst + u, src + s, row_bytes);
        } else {
          copy_row(dst + s, src + u, row_bytes);
        }
      }
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
