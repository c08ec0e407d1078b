// Where mask-unit attention finds its operands, as index arithmetic shared by the
// CPU and CUDA kernels (spec §6).
//
// qkv is the qkv Linear's output [B, N, 3 * C] with features [which][head][hd];
// token n = t * windows + w is in-window position t of window w. Query pooling
// takes the max over the q_stride positions t = s * queries + i (the leading
// digit of t), giving pooled query i. The output [B, queries * windows, C] holds
// query i of window w at token i * windows + w, channels [head][hd]: ready for proj.
#pragma once

#include <cstdint>

#include "hiera_kernels/token_order.h"  // HK_HOST_DEVICE

namespace hiera_kernels {

struct AttentionLayout {
  int64_t batch = 0;
  int64_t tokens = 0;      // N
  int64_t dim = 0;         // C = dim_out = heads * head_dim
  int64_t heads = 0;
  int64_t head_dim = 0;
  int64_t q_stride = 1;
  int64_t windows = 1;     // 1 for global attention
  int64_t per_window = 0;  // keys per window: N / windows
  int64_t queries = 0;     // pooled queries per window: per_window / q_stride

  enum Which { kQuery = 0, kKey = 1, kValue = 2 };

  // Offset of (b, which, head h, in-window position t, window w)'s first channel in qkv.
  HK_HOST_DEVICE int64_t qkv_offset(int64_t b, int which, int64_t h, int64_t t, int64_t w) const {
    return ((b * tokens + t * windows + w) * 3 + which) * dim + h * head_dim;
  }
  // Elements between consecutive positions t of one window in qkv.
  HK_HOST_DEVICE int64_t qkv_position_stride() const { return windows * 3 * dim; }
  // Offset of pooled query i of window w, head h, in out (and in the q argmax).
  HK_HOST_DEVICE int64_t out_offset(int64_t b, int64_t h, int64_t i, int64_t w) const {
    return ((b * queries + i) * windows + w) * dim + h * head_dim;
  }
  // In-window position of pooled query i's s-th candidate.
  HK_HOST_DEVICE int64_t pooled_position(int64_t s, int64_t i) const { return s * queries + i; }
  // Offset of (b, h, w, i) in the log-sum-exp [B, heads, windows, queries].
  HK_HOST_DEVICE int64_t lse_offset(int64_t b, int64_t h, int64_t w, int64_t i) const {
    return ((b * heads + h) * windows + w) * queries + i;
  }

  // The interface the CUDA kernels share with WindowLayout (they are generic over the
  // layout): no key is padding, no query is cropped.
  static constexpr bool kPadded = false;
  // The q pool's rule: official Hiera's max(dim) (first NaN wins).
  template <typename T>
  HK_HOST_DEVICE static bool pool_takes(T candidate, T best) { return hiera_kernels::pool_takes(candidate, best); }
  HK_HOST_DEVICE int64_t candidate_count() const { return q_stride; }
  // Offset of key (or value) position j of window w.
  HK_HOST_DEVICE int64_t key_offset(int64_t b, int which, int64_t h, int64_t j, int64_t w) const {
    return qkv_offset(b, which, h, j, w);
  }
  // Offset of candidate c of pooled query i of window w.
  HK_HOST_DEVICE int64_t candidate_offset(int64_t b, int64_t h, int64_t i, int64_t w, int64_t c) const {
    return qkv_offset(b, kQuery, h, pooled_position(c, i), w);
  }
};

}  // namespace hiera_kernels
