// Where SAM 2's window attention finds its operands, as index arithmetic shared by the
// CPU and CUDA kernels (hiera_kernels.reference.window_attention is the oracle; its
// window_grid() holds the same geometry in Python).
//
// qkv is the qkv Linear's output over the unpadded map, [B, H, W, 3 * C] with features
// [which][head][hd]. Keys: window w = wy * windows_x + wx covers positions
// (wy * window_h + j / window_w, wx * window_w + j % window_w), j < per_window; the map
// is padded to whole windows, and a position past H or W reads `pad` [3 * C] (the qkv
// Linear's bias: SAM 2 pads before the Linear). Queries: pooled position i of window w
// is the max over its s x s candidates c = dy * s + dx at (wy * window_h + (i / pooled_w)
// * s + dy, wx * window_w + (i % pooled_w) * s + dx) (MaxPool2d's scan order). The output
// [B, out_h, out_w, C] holds query i of window w at (wy * pooled_h + i / pooled_w,
// wx * pooled_w + i % pooled_w), when that is inside the out_h x out_w map
// (window_unpartition's crop); a query outside it is computed (its log-sum-exp is
// saved) but not stored. Global attention is one window of the whole map (no padding,
// no crop; the pooled map is MaxPool2d's floor). Every candidate of a stored query is
// inside the map, so only keys (and unstored queries) ever read pad.
#pragma once

#include <cstdint>

#include "hiera_kernels/token_order.h"  // HK_HOST_DEVICE

namespace hiera_kernels {

struct WindowLayout {
  int64_t batch = 0, height = 0, width = 0;
  int64_t dim = 0;  // C = heads * head_dim
  int64_t heads = 0, head_dim = 0;
  int64_t q_stride = 1;                 // s: queries pooled s x s
  int64_t window_h = 0, window_w = 0;   // key positions per window side
  int64_t windows_y = 0, windows_x = 0, windows = 0;
  int64_t per_window = 0;               // keys per window: window_h * window_w
  int64_t pooled_h = 0, pooled_w = 0;   // pooled window: window / s (floor)
  int64_t queries = 0;                  // pooled_h * pooled_w
  int64_t candidates = 1;               // s * s
  int64_t out_h = 0, out_w = 0;         // the output map: height / s, width / s (floor)

  enum Which { kQuery = 0, kKey = 1, kValue = 2 };

  // window_size 0: global attention.
  static WindowLayout make(int64_t batch, int64_t height, int64_t width, int64_t dim, int64_t heads,
                           int64_t window_size, int64_t q_stride) {
    WindowLayout L;
    L.batch = batch;
    L.height = height;
    L.width = width;
    L.dim = dim;
    L.heads = heads;
    L.head_dim = dim / heads;
    L.q_stride = q_stride;
    L.window_h = window_size > 0 ? window_size : height;
    L.window_w = window_size > 0 ? window_size : width;
    L.windows_y = (height + L.window_h - 1) / L.window_h;
    L.windows_x = (width + L.window_w - 1) / L.window_w;
    L.windows = L.windows_y * L.windows_x;
    L.per_window = L.window_h * L.window_w;
    L.pooled_h = L.window_h / q_stride;
    L.pooled_w = L.window_w / q_stride;
    L.queries = L.pooled_h * L.pooled_w;
    L.candidates = q_stride * q_stride;
    L.out_h = height / q_stride;
    L.out_w = width / q_stride;
    return L;
  }

  // Offset of (b, which, head h) at map position (y, x) in qkv, or -1 past the map (pad).
  HK_HOST_DEVICE int64_t token_offset(int64_t b, int which, int64_t h, int64_t y, int64_t x) const {
    if (y >= height || x >= width) return -1;
    return (((b * height + y) * width + x) * 3 + which) * dim + h * head_dim;
  }
  // Offset of (which, head h) in pad.
  HK_HOST_DEVICE int64_t pad_offset(int which, int64_t h) const { return which * dim + h * head_dim; }
  // Key (or value) position j of window w, or -1 where it is padding.
  HK_HOST_DEVICE int64_t key_offset(int64_t b, int which, int64_t h, int64_t j, int64_t w) const {
    return token_offset(b, which, h, (w / windows_x) * window_h + j / window_w, (w % windows_x) * window_w + j % window_w);
  }
  // Candidate c (= dy * s + dx) of pooled query i of window w, or -1 where it is padding.
  HK_HOST_DEVICE int64_t candidate_offset(int64_t b, int64_t h, int64_t i, int64_t w, int64_t c) const {
    const int64_t y = (w / windows_x) * window_h + (i / pooled_w) * q_stride + c / q_stride;
    const int64_t x = (w % windows_x) * window_w + (i % pooled_w) * q_stride + c % q_stride;
    return token_offset(b, kQuery, h, y, x);
  }
  // Offset of pooled query i of window w, head h, in out (and the q argmax), or -1 when
  // the crop drops it.
  HK_HOST_DEVICE int64_t out_offset(int64_t b, int64_t h, int64_t i, int64_t w) const {
    const int64_t y = (w / windows_x) * pooled_h + i / pooled_w;
    const int64_t x = (w % windows_x) * pooled_w + i % pooled_w;
    if (y >= out_h || x >= out_w) return -1;
    return ((b * out_h + y) * out_w + x) * dim + h * head_dim;
  }
  // Offset of (b, h, w, i) in the log-sum-exp [B, heads, windows, queries].
  HK_HOST_DEVICE int64_t lse_offset(int64_t b, int64_t h, int64_t w, int64_t i) const {
    return ((b * heads + h) * windows + w) * queries + i;
  }

  // The interface the CUDA kernels share with AttentionLayout: key_offset and
  // candidate_offset may be -1 (read pad), out_offset -1 (cropped).
  static constexpr bool kPadded = true;
  // The q pool's rule: SAM 2's MaxPool2d (last NaN wins), candidates in its scan order.
  template <typename T>
  HK_HOST_DEVICE static bool pool_takes(T candidate, T best) { return max_pool2d_takes(candidate, best); }
  HK_HOST_DEVICE int64_t candidate_count() const { return candidates; }
  // Whether the windows reach past the map, so that some keys read pad.
  HK_HOST_DEVICE bool has_padding() const { return windows_y * window_h != height || windows_x * window_w != width; }
  // Whether every map position is a candidate of some pooled query: not so for global
  // attention over a map that s does not divide (MaxPool2d's floor drops the last rows
  // or columns), whose q gradient there is 0.
  HK_HOST_DEVICE bool pools_every_position() const {
    return windows_y * pooled_h * q_stride >= height && windows_x * pooled_w * q_stride >= width;
  }
};

}  // namespace hiera_kernels
