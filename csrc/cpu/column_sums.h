// Column sums of a reduction over rows that a CPU entry point split into fixed chunks
// of rows (LayerNorm's weight and bias gradients, fc1's bias gradient in the GELU
// backward): each chunk's partial sums come from the kernels, and the entry point adds
// them up here, chunk by chunk in order, so that the sums do not depend on how many
// threads ran the chunks. Baseline code.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace hiera_kernels {

// partials [chunks, n] in the accumulation type; columns [first, first + count) summed
// over the chunks into out [count] of scalar_t, each rounded once.
template <typename scalar_t>
void add_up_chunks(const at::Tensor& partials, int64_t first, int64_t count, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunks = partials.size(0), n = partials.size(1);
  const acc_t* partial = partials.const_data_ptr<acc_t>() + first;
  std::vector<acc_t> total(count, acc_t(0));
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t k = 0; k < count; ++k) total[k] += partial[chunk * n + k];
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<scalar_t>(total[k]);
}

}  // namespace hiera_kernels
