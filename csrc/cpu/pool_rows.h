// The max over candidate rows with PyTorch's max(dim) semantics (first maximum wins
// ties, first NaN wins), shared by the query_pool and mask_unit_attention CPU kernels.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "hiera_kernels/token_order.h"  // pool_takes

namespace hiera_kernels {

// Widen n elements to the accumulation type. c10::Half's scalar conversion does not
// vectorise, so fp16 uses F16C where the build has it.
template <typename scalar_t, typename acc_t>
inline void load_as_acc(const scalar_t* src, acc_t* dst, int64_t n) {
  int64_t k = 0;
#if defined(__F16C__)
  if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    for (; k + 8 <= n; k += 8) {
      const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
      _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(half));
    }
  }
#endif
  for (; k < n; ++k) dst[k] = static_cast<acc_t>(src[k]);
}

constexpr int64_t kPoolRowBlock = 256;  // elements per call: the accumulators stay in L1

// best[k] = max over s < rows of first[s * row_stride + k], arg[k] = that s, for
// k < n <= kPoolRowBlock. Block-local buffers keep the loop vectorisable (stores
// through uint8_t* may alias anything).
template <typename scalar_t, typename acc_t>
inline void max_over_rows(const scalar_t* first, int64_t row_stride, int64_t rows, int64_t n, acc_t* best,
                          uint8_t* arg) {
  acc_t value[kPoolRowBlock];
  uint8_t best_s[kPoolRowBlock];
  load_as_acc(first, best, n);
  std::memset(best_s, 0, n);
  for (int64_t s = 1; s < rows; ++s) {
    load_as_acc(first + s * row_stride, value, n);
    for (int64_t k = 0; k < n; ++k) {
      const bool take = pool_takes<acc_t>(value[k], best[k]);
      best[k] = take ? value[k] : best[k];
      best_s[k] = take ? static_cast<uint8_t>(s) : best_s[k];
    }
  }
  std::memcpy(arg, best_s, n);
}

}  // namespace hiera_kernels
