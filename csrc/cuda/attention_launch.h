// Launchers of the CUDA attention kernels (attention_kernels.cuh), as plain C++ so the
// torch-facing entry points (attention_ops.cpp) can call them without seeing CUDA device
// code, plus the tile shapes and shared-memory sizes both sides need: one copy of each
// formula. The kernels are generic over the layout, the index math of one op:
// AttentionLayout (Hiera's mask-unit attention, attention_layout.h) or WindowLayout
// (SAM 2's window attention, window_layout.h).
//
// Every kernel is one pass over "rows" attending over a stream of "columns": per
// (image, head), rows R = w * rows_per_window + r and columns c = w * cols_per_window + j
// in window-major order, each row meeting only its own window's columns. A CTA owns
// kWarps * 16 consecutive rows (one 16-row WMMA tile per warp), so small windows pack
// several to a CTA and long global sequences tile their queries over the grid; it
// streams the columns of the windows it touches through shared memory in blocks.
//   forward          rows = pooled queries, columns = keys: online softmax, O, lse
//   backward dq      rows = pooled queries, columns = keys: dq, routed to the argmax
//   backward dk, dv  rows = keys, columns = pooled queries: dk and dv
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <utility>

#include "hiera_kernels/attention_layout.h"
#include "hiera_kernels/window_layout.h"

namespace hiera_kernels {
namespace cuda_attention {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };
enum class Pass { kForward, kBackwardDq, kBackwardDkDv };

// Head dims with an instantiation of their own, per layout, each in its own translation
// unit (mask_unit_attention_hd*.cu: Hiera B+ 56, H 64, L 72, T/S/B 96;
// window_attention_hd*.cu: SAM 2's B+ 56, L 72, T/S 96); any other head dim up to
// kMaxHeadDim runs the generic instantiation (head dim 0), padded to kMaxHeadDim and masked.
constexpr int kMaxHeadDim = 128;
template <typename Layout>
struct HeadDims;
template <>
struct HeadDims<AttentionLayout> {
  using type = std::integer_sequence<int, 56, 64, 72, 96>;
};
template <>
struct HeadDims<WindowLayout> {
  using type = std::integer_sequence<int, 56, 72, 96>;
};
template <int... kDims>
constexpr int pick_head_dim(std::integer_sequence<int, kDims...>, int64_t head_dim) {
  int picked = 0;
  ((picked = head_dim == kDims ? kDims : picked), ...);
  return picked;
}
template <typename Layout>
constexpr int instantiated_head_dim(int64_t head_dim) {
  return pick_head_dim(typename HeadDims<Layout>::type{}, head_dim);
}

constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The tiles of one pass. fp16/bf16 multiply on tensor cores (WMMA 16x16x16, fp32
// accumulation): head dims pad to 16 with zeros, and operand rows are skewed by 8
// elements (16 B) so the 16 rows of a fragment load hit different banks. fp32 runs
// SIMT (one lane per column of a product) with an odd row stride, so lanes reading
// the same channel of consecutive rows hit different banks.
//
// The fp32 score and probability tiles [16 * warps][cols] (cols = 32) are read and
// written only by scalar accesses (no WMMA, no vectors: 4-byte alignment is all they
// need), mostly by the softmax pattern "lanes 2r and 2r + 1 take row r": with a row
// stride of 32 floats, lane (r, half) hits bank (c + half) % 32, two banks for 32 lanes
// (16-way conflicts). A stride of 34 (2 mod 4) puts it on bank (2r + half + c) % 32,
// all different; the dS loops' "two rows of 16 columns" pattern stays 2-way, as it was
// at 32. (WMMA tiles keep the +4 / +8 floats that store_matrix_sync/load_matrix_sync
// need: ldm a multiple of 16 bytes.)
struct TileShape {
  bool tensor_cores;
  int op_bytes;    // element size of the operand tiles: the input dtype's
  int prob_bytes;  // element size of the probability tile fed to the second product
  int warps;       // rows per CTA = 16 * warps
  int cols;        // columns per shared-memory block
  int pad;         // head dim padded to a multiple of 16
  int ld;          // row stride of operand tiles [rows or cols][pad], elements
  int score_ld;    // row stride of the fp32 score tiles [16 * warps][cols]
  int prob_ld;     // row stride of the probability tile
  int acc_ld;      // row stride of the fp32 accumulators [16 * warps][pad]
  constexpr int rows() const { return 16 * warps; }
  constexpr int threads() const { return 32 * warps; }
};

constexpr TileShape tile_shape(Pass pass, Dtype dtype, int head_dim_template) {
  const bool tc = dtype != Dtype::kFloat32;
  const int pad = static_cast<int>(round_up(head_dim_template == 0 ? kMaxHeadDim : head_dim_template, 16));
  // The dk/dv pass keeps two accumulators, so it takes half the rows to stay in the
  // shared memory of an sm_80 CTA (163 KB) at the generic head dim in fp32.
  const int warps = pass == Pass::kBackwardDkDv ? 2 : 4;
  // Wider column blocks for the forward on tensor cores: fewer block barriers.
  const int cols = tc && pass == Pass::kForward ? 64 : 32;
  return TileShape{tc,
                   tc ? 2 : 4,
                   tc ? 2 : 4,
                   warps,
                   cols,
                   pad,
                   tc ? pad + 8 : pad + 1,
                   tc ? cols + 4 : cols + 2,
                   tc ? cols + 8 : cols + 2,
                   pad + 4};
}

// Shared-memory carve-up of one pass, in bytes from the (128-byte aligned) base; every
// region starts on 128 bytes (WMMA needs 32).
struct SmemLayout {
  int64_t row_tile[2];  // [rows][ld] operands owned by the CTA's rows (q and dO, or k and v)
  int64_t col_tile[2];  // [cols][ld] operands of the current column block (k and v, or q and dO)
  int64_t score[2];     // fp32 [rows][score_ld]: scores, and dP in the backward
  int64_t prob;         // [rows][prob_ld]: p (forward), dS (dq), p then dS (dk/dv)
  int64_t acc[2];       // fp32 [rows][acc_ld]: O, dq, or dk and dv
  int64_t stats;        // fp32 per-row or per-column statistics (see the kernels)
  int64_t bytes;
};

constexpr int stat_count(Pass pass, const TileShape& t) {
  // forward: m, l, alpha per row; dq: lse, delta, live per row; dk/dv: lse, delta, live
  // per column (live: a stored query, one with a gradient)
  return pass == Pass::kForward ? 3 * t.rows() : pass == Pass::kBackwardDq ? 3 * t.rows() : 3 * t.cols;
}

constexpr SmemLayout smem_layout(Pass pass, const TileShape& t) {
  const bool backward = pass != Pass::kForward;
  const int64_t row_tile = round_up(int64_t{t.rows()} * t.ld * t.op_bytes, 128);
  const int64_t col_tile = round_up(int64_t{t.cols} * t.ld * t.op_bytes, 128);
  const int64_t score = round_up(int64_t{t.rows()} * t.score_ld * 4, 128);
  const int64_t prob = round_up(int64_t{t.rows()} * t.prob_ld * t.prob_bytes, 128);
  const int64_t acc = round_up(int64_t{t.rows()} * t.acc_ld * 4, 128);
  SmemLayout s{};
  int64_t at = 0;
  s.row_tile[0] = at, at += row_tile;
  s.row_tile[1] = at, at += backward ? row_tile : 0;
  s.col_tile[0] = at, at += col_tile;
  s.col_tile[1] = at, at += col_tile;
  s.score[0] = at, at += score;
  s.score[1] = at, at += backward ? score : 0;
  s.prob = at, at += prob;
  s.acc[0] = at, at += acc;
  s.acc[1] = at, at += pass == Pass::kBackwardDkDv ? acc : 0;
  s.stats = at, at += round_up(int64_t{stat_count(pass, t)} * 4, 128);
  s.bytes = at;
  return s;
}

// Dynamic shared memory one CTA of `pass` needs for this dtype and head dim.
template <typename Layout>
constexpr int64_t smem_bytes(Pass pass, Dtype dtype, int64_t head_dim) {
  return smem_layout(pass, tile_shape(pass, dtype, instantiated_head_dim<Layout>(head_dim))).bytes;
}

// CTAs of a pass: one per kWarps * 16 rows of every (image, head), rows of one (image,
// head) on consecutive CTAs (the dk/dv pass's per-CTA sums of padded keys rely on it).
template <typename Layout>
int64_t grid_size(const Layout& L, Pass pass, Dtype dtype) {
  const int64_t rows_per_window = pass == Pass::kBackwardDkDv ? L.per_window : L.queries;
  const int rows = tile_shape(pass, dtype, instantiated_head_dim<Layout>(L.head_dim)).rows();
  return L.batch * L.heads * ((L.windows * rows_per_window + rows - 1) / rows);
}

// The dk/dv pass's scratch for padded keys (WindowLayout with padding): fp32 [CTAs][2][hd],
// each CTA's sums of its padded keys' dk and dv, which a last kernel adds up per head in
// a fixed order into grad_pad (deterministic, no atomics).
template <typename Layout>
int64_t pad_partials_size(const Layout& L, Dtype dtype) {
  return grid_size(L, Pass::kBackwardDkDv, dtype) * 2 * L.head_dim;
}

// Tensors as in the op schemas: mask-unit attention's qkv [B, N, 3 * C] and out
// [B, queries * windows, C]; window attention's qkv [B, H, W, 3 * C] and out
// [B, out_h, out_w, C]. The argmax has out's shape.
template <typename Layout>
struct ForwardArgs {
  Layout layout;
  const void* qkv;
  const void* pad;   // [3 * C]: a padded token's qkv (WindowLayout), or null
  void* out;
  float* lse;        // [B, heads, windows, queries]
  uint8_t* argmax;   // like out, or null with one candidate per query (q_stride 1)
};

template <typename Layout>
struct BackwardArgs {
  Layout layout;
  const void* grad_out;    // like out
  const void* qkv;
  const void* pad;         // [3 * C], or null (AttentionLayout)
  const void* out;
  const float* lse;        // [B, heads, windows, queries]
  const uint8_t* argmax;   // like out, or null with one candidate per query
  float* delta;            // scratch [B, heads, windows, queries]: rowsum(dO * O)
  void* grad_qkv;          // like qkv: every element written once, or zero-filled first by the caller
                           // where some q is no query's candidate (!pools_every_position())
  float* pad_partials;     // scratch of pad_partials_size, or null where no key is padding
  void* grad_pad;          // [3 * C] (WindowLayout; written whole), or null (AttentionLayout)
};

// Defined for each layout's HeadDims and 0 (generic) in mask_unit_attention_hd*.cu and
// window_attention_hd*.cu. They set the kernels' shared-memory limit and launch on
// `stream`, returning the first CUDA error.
template <typename Layout, int kHeadDim>
cudaError_t forward(const ForwardArgs<Layout>& args, Dtype dtype, cudaStream_t stream);
template <typename Layout, int kHeadDim>
cudaError_t backward(const BackwardArgs<Layout>& args, Dtype dtype, cudaStream_t stream);

}  // namespace cuda_attention
}  // namespace hiera_kernels
