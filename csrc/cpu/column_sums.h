// Column sums of a reduction over rows that a CPU entry point splits into fixed chunks
// of rows (LayerNorm's weight and bias gradients, fc1's bias gradient in the GELU
// backward): RowChunks runs the chunks, each kernel call writing its chunk's partial
// sums, and add_up_chunks adds them up chunk by chunk in order, so that the sums do not
// depend on how many threads ran the chunks. Baseline code.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_dispatch.h"

namespace hiera_kernels {

// Rows [0, rows) in fixed chunks of max(1, grain / width) rows each (the same chunks on
// any number of threads), each chunk with its own row of partial column sums.
struct RowChunks {
  int64_t rows, rows_per_chunk, count;

  RowChunks(int64_t rows, int64_t width, int64_t grain)
      : rows(rows),
        rows_per_chunk(std::max<int64_t>(1, grain / std::max<int64_t>(width, 1))),
        count((rows + rows_per_chunk - 1) / rows_per_chunk) {}

  // partials [count, n] in dtype's accumulation type, uninitialised (the kernels zero
  // their own chunk's row).
  at::Tensor partials(int64_t n, CpuDtype dtype, const at::TensorOptions& options) const {
    return at::empty({count, n}, options.dtype(accumulation_type(dtype)));
  }

  // fn(first, last, sums, scratch) for every chunk's rows [first, last), in parallel:
  // sums its row of partials, scratch scratch_bytes for the thread's chunks.
  template <typename Fn>
  void run(at::Tensor& partials, int64_t scratch_bytes, const Fn& fn) const {
    auto* base = static_cast<unsigned char*>(partials.mutable_data_ptr());
    const int64_t row_bytes = partials.stride(0) * partials.element_size();
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      const auto scratch = workspace(scratch_bytes);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t first = chunk * rows_per_chunk;
        fn(first, std::min(rows, first + rows_per_chunk), base + chunk * row_bytes, scratch.get());
      }
    });
  }
};

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
