// CUDA windowed attention with fused query pooling, forward and backward: the CPU
// kernels' algorithm (csrc/cpu) on the same index math, for two ops through one kernel
// body generic over the layout: Hiera's mask-unit attention (AttentionLayout,
// attention_layout.h) and SAM 2's window attention (WindowLayout, window_layout.h). q, k
// and v are read straight out of the qkv Linear's output; q is max-pooled over its
// candidates while it is loaded (the layout's pool_takes: first max wins ties; the first
// NaN wins for Hiera's max(dim), the last for SAM 2's MaxPool2d),
// recording a one-byte argmax; scores are scaled by head_dim^-0.5 and soft-maxed online
// in fp32; the output is written where the layout puts it (token order, or the
// un-partitioned map) with the fp32 log-sum-exp the backward recomputes P from.
//
// The layout's interface: key_offset and candidate_offset (-1: a padded position, which
// reads the `pad` row, kPadded layouts only), out_offset (-1: a query the crop drops: it
// is computed, its lse saved, but not stored, and it has no gradient), lse_offset,
// candidate_count. The backward sums the gradients of padded keys into grad_pad.
//
// How the work is cut (rows, columns, CTAs) is described in attention_launch.h.
// Each warp owns 16 rows and, per column block, multiplies only the 16-column slices
// that hold its rows' windows; a score whose column belongs to another window is
// masked. fp16/bf16 multiply with WMMA 16x16x16 on tensor cores, fp32 with one lane
// per column (SIMT); both accumulate in fp32 and share every other step. Accumulators
// live in shared memory (fp32 [rows][pad]) because the online softmax rescales O by
// row, and a WMMA accumulator's element-to-row mapping is opaque.
//
// Non-finite values stay in their window, as on the "torch" path. Elementwise, P and dS
// outside a row's window are selected to 0 (never exp(s - lse) or P (dP - D), NaN when
// lse, D or dP is inf/NaN). In the products that is not enough: a warp's 16 rows and a
// 16-column WMMA slice can span several windows (Hiera's 4-query windows), so P @ V
// multiplies one row's masked zeros by other windows' v, and 0 * inf = NaN. A window
// that needs those v rows keeps them, so zeroing operands cannot help; instead each
// column block notes while it is loaded whether the summed-over operand (v; k for dq; q
// and dO for dk/dv) holds an inf or NaN (one compare per loaded element, OR-ed by the
// barrier that already follows the load), and only such blocks are multiplied row by
// row over each row's own window's columns (warp_accumulate_own_window, SIMT). Finite
// blocks keep the WMMA/SIMT product unchanged: 0 * finite = 0 exactly.
//
// Backward: three kernels (four with padding), deterministic and without atomics.
//   delta:  D = rowsum(dO * O) per pooled query, into a [B, heads, windows, queries] scratch.
//   dq:     per query tile, stream the keys: P = exp(s - lse), dP = dO V^T,
//           dS = P (dP - D), dq = scale * dS K; the epilogue routes dq through the
//           pooling argmax (every q candidate gets its gradient or 0).
//   dk, dv: per key tile, stream the pooled queries (re-gathered through the argmax):
//           dv = P^T dO, dk = scale * dS^T q; a padded key's go into its CTA's sums.
//   grad_pad (kPadded layouts): the CTAs' sums added up per head in a fixed order.
// Splitting dq from dk/dv recomputes S and dP once more (FlashAttention-2 instead adds
// dq with fp32 atomics into a [B, N / q_stride, C] scratch). Hiera's attention is
// memory-bound (windows of 4 to 64 queries), so the extra products are cheap, while
// the split needs no scratch besides D, has no atomic contention, gives bitwise
// reproducible gradients, and fuses the argmax routing into the dq epilogue.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "attention_launch.h"
#include "hiera_kernels/attention_layout.h"
#include "hiera_kernels/token_order.h"  // pool_takes
#include "hiera_kernels/window_layout.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the attention kernels need sm_80 or newer (bf16 tensor cores); set HIERA_KERNELS_CUDA_ARCHS"
#endif

namespace hiera_kernels {
namespace cuda_attention {

// torch builds with __CUDA_NO_HALF_CONVERSIONS__: convert explicitly.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
constexpr Dtype dtype_of() {
  return std::is_same<T, float>::value ? Dtype::kFloat32 : std::is_same<T, __half>::value ? Dtype::kFloat16 : Dtype::kBFloat16;
}

constexpr float kNegInf = -__builtin_huge_valf();

// Compile-time tiles of one pass for scalar_t and the instantiated head dim.
template <typename scalar_t, int kHeadDim, Pass kPass>
struct Config {
  static constexpr TileShape kT = tile_shape(kPass, dtype_of<scalar_t>(), kHeadDim);
  static constexpr SmemLayout kS = smem_layout(kPass, kT);
  static constexpr bool kTC = kT.tensor_cores;
  static constexpr int kWarps = kT.warps, kRows = kT.rows(), kThreads = kT.threads(), kCols = kT.cols;
  static constexpr int kPad = kT.pad, kLd = kT.ld, kScoreLd = kT.score_ld, kProbLd = kT.prob_ld, kAccLd = kT.acc_ld;
  using prob_t = typename std::conditional<kTC, scalar_t, float>::type;
  // The head dim: the instantiation's, or the layout's for the generic one.
  template <typename Layout>
  static __device__ __forceinline__ int head_dim(const Layout& L) {
    return kHeadDim != 0 ? kHeadDim : static_cast<int>(L.head_dim);
  }
};

// The rows one CTA owns and the columns they attend over (launch header). Columns are
// counted from the first column of window w_lo; row r's window w holds columns
// [(w - w_lo) * cols_per_window, +cols_per_window).
struct Span {
  int64_t b, h;
  int64_t row0;             // first row of the CTA in the (b, h) row space
  int rows;                 // rows that exist, from row0
  int64_t w_lo;             // window of the first row
  int64_t cols;             // columns streamed: whole windows w_lo .. (window of the last row)
  int64_t rows_per_window, cols_per_window;
  __device__ int64_t window_of_row(int r) const { return (row0 + r) / rows_per_window; }
  __device__ int64_t position_of_row(int r) const { return (row0 + r) % rows_per_window; }
  __device__ int64_t window_of_col(int64_t c) const { return w_lo + c / cols_per_window; }
  __device__ int64_t position_of_col(int64_t c) const { return c % cols_per_window; }
  __device__ int64_t first_col_of_row(int r) const { return (window_of_row(r) - w_lo) * cols_per_window; }
};

template <typename Layout>
__device__ inline Span make_span(const Layout& L, int64_t rows_per_window, int64_t cols_per_window, int cta_rows) {
  const int64_t total_rows = L.windows * rows_per_window;
  const int64_t tiles = (total_rows + cta_rows - 1) / cta_rows;
  const int64_t cta = blockIdx.x;
  const int64_t bh = cta / tiles;
  Span s;
  s.b = bh / L.heads;
  s.h = bh % L.heads;
  s.row0 = (cta % tiles) * cta_rows;
  s.rows = static_cast<int>(total_rows - s.row0 < cta_rows ? total_rows - s.row0 : cta_rows);
  s.rows_per_window = rows_per_window;
  s.cols_per_window = cols_per_window;
  s.w_lo = s.row0 / rows_per_window;
  s.cols = ((s.row0 + s.rows - 1) / rows_per_window - s.w_lo + 1) * cols_per_window;
  return s;
}

// The columns [lo, hi) of block [c0, c0 + kCols) that warp `warp`'s rows attend to,
// widened to whole 16-column slices (the masked extras cost nothing but MMA work).
// Empty when the warp has no rows or its windows are not in the block.
struct WarpRange {
  int lo, hi;
};
template <int kCols>
__device__ inline WarpRange warp_range(const Span& s, int warp, int64_t c0) {
  const int first = 16 * warp, last = min(16 * warp + 15, s.rows - 1);
  if (first > last) return {0, 0};
  const int64_t lo = s.first_col_of_row(first) - c0;
  const int64_t hi = s.first_col_of_row(last) + s.cols_per_window - c0;
  const int l = static_cast<int>(lo < 0 ? 0 : lo > kCols ? kCols : lo);
  const int h = static_cast<int>(hi < 0 ? 0 : hi > kCols ? kCols : hi);
  if (l >= h) return {0, 0};
  return {l / 16 * 16, (h + 15) / 16 * 16};
}

__device__ __forceinline__ bool is_nonfinite(float x) { return !(fabsf(x) < __builtin_huge_valf()); }  // inf or NaN

// Copies `count` rows of head_dim elements into tile [capacity][kLd], one warp per row
// (lanes over contiguous channels), zero-filling channels [hd, kPad) and rows without
// a source (row_ptr returns null) so padded products add nothing. Returns whether this
// thread loaded an inf or NaN (dead code where the caller ignores it).
template <typename C, typename T, typename RowPtr>
__device__ inline bool load_rows(T* tile, int capacity, int hd, RowPtr row_ptr) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  bool nonfinite = false;
  for (int r = warp; r < capacity; r += C::kWarps) {
    const T* src = row_ptr(r);
    for (int d = lane; d < C::kPad; d += 32) {
      const T x = src != nullptr && d < hd ? src[d] : from_float<T>(0.f);
      nonfinite |= is_nonfinite(to_float(x));
      tile[r * C::kLd + d] = x;
    }
  }
  return nonfinite;
}

// The row of (which, head h) at qkv offset `offset`, or pad's where the offset is -1 (a
// padded position; only kPadded layouts have them).
template <typename Layout, typename T>
__device__ __forceinline__ const T* row_or_pad(const Layout& L, const T* qkv, const T* pad, int64_t offset, int which,
                                               int64_t h) {
  if constexpr (Layout::kPadded) {
    if (offset < 0) return pad + L.pad_offset(which, h);
  }
  return qkv + offset;
}

// Keys and values of the span's column block [c0, c0 + kCols) into k and v [kCols][kLd]
// (columns past the span are zero-filled). Returns which of them this thread found an
// inf or NaN in.
struct NonFinite {
  bool k, v;
};
template <typename C, typename Layout, typename T>
__device__ inline NonFinite load_key_block(T* k, T* v, const T* qkv, const T* pad, const Layout& L, const Span& span,
                                           int64_t c0, int hd) {
  const auto key_row = [&](int which) {
    return [&, which](int c) -> const T* {
      if (c0 + c >= span.cols) return nullptr;
      const int64_t j = span.position_of_col(c0 + c), w = span.window_of_col(c0 + c);
      return row_or_pad(L, qkv, pad, L.key_offset(span.b, which, span.h, j, w), which, span.h);
    };
  };
  const bool k_nonfinite = load_rows<C>(k, C::kCols, hd, key_row(Layout::kKey));
  return {k_nonfinite, load_rows<C>(v, C::kCols, hd, key_row(Layout::kValue))};
}

// Pooled query rows into tile [capacity][kLd]: row r is pooled query i of window w, as
// source(r, w, i) says, or zeros where it returns false. kPool takes the max over the
// candidates and records the argmax where the query is stored (forward; a cropped
// query's candidates may be padding); otherwise the candidate the argmax names is
// gathered (backward: stored queries only, whose candidates are all in qkv). Each lane
// holds channels lane + 32 * k, so a candidate's offset is computed once per row.
// Returns whether this thread loaded an inf or NaN.
template <typename C, bool kPool, typename Layout, typename T, typename RowSource>
__device__ inline bool load_queries(T* tile, int capacity, const Layout& L, const T* qkv, const T* pad, int64_t b,
                                    int64_t h, RowSource source, uint8_t* argmax_out, const uint8_t* argmax_in) {
  constexpr int kPerLane = (C::kPad + 31) / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, hd = C::head_dim(L);
  const int64_t candidates = L.candidate_count();
  bool nonfinite = false;
  for (int r = warp; r < capacity; r += C::kWarps) {
    int64_t w, i;
    const bool exists = source(r, w, i);
    T value[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) value[k] = from_float<T>(0.f);
    if (exists && kPool) {
      float best[kPerLane] = {};
      uint8_t best_c[kPerLane] = {};
      for (int64_t c = 0; c < candidates; ++c) {
        const T* src = row_or_pad(L, qkv, pad, L.candidate_offset(b, h, i, w, c), Layout::kQuery, h);
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          const int d = lane + 32 * k;
          if (d >= hd) continue;
          const T x = src[d];
          const float f = to_float(x);
          if (c == 0 || Layout::pool_takes(f, best[k])) best[k] = f, best_c[k] = static_cast<uint8_t>(c), value[k] = x;
        }
      }
      const int64_t out = L.out_offset(b, h, i, w);
      if (candidates > 1 && out >= 0) {
#pragma unroll
        for (int k = 0; k < kPerLane; ++k)
          if (lane + 32 * k < hd) argmax_out[out + lane + 32 * k] = best_c[k];
      }
    } else if (exists) {
      const int64_t out = L.out_offset(b, h, i, w);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int d = lane + 32 * k;
        if (d >= hd) continue;
        const int64_t c = candidates > 1 ? argmax_in[out + d] : 0;
        // A byte past the candidates (a q_argmax the forward did not make; the CPU entry
        // points refuse it) would read another row or past qkv: it stays 0 instead.
        if (c < candidates) value[k] = qkv[L.candidate_offset(b, h, i, w, c) + d];
      }
    }
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int d = lane + 32 * k;
      if (d >= C::kPad) continue;
      nonfinite |= is_nonfinite(to_float(value[k]));
      tile[r * C::kLd + d] = value[k];
    }
  }
  return nonfinite;
}

// S[16][c] = sum_d A[r][d] * B[c][d] for the warp's 16 rows of A (row tile) against
// columns [lo, hi) of B (column block): fp32 scores.
template <typename C, typename T>
__device__ inline void warp_scores(const T* A, const T* B, float* S, WarpRange range, int hd) {
  if constexpr (C::kTC) {
    using namespace nvcuda;
    for (int n = range.lo / 16; n < range.hi / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int k = 0; k < C::kPad / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // B^T: (d, c) at B[c][d]
        wmma::load_matrix_sync(a, A + k * 16, C::kLd);
        wmma::load_matrix_sync(b, B + n * 16 * C::kLd + k * 16, C::kLd);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(S + n * 16, acc, C::kScoreLd, wmma::mem_row_major);
    }
  } else {
    const int lane = threadIdx.x % 32;
    for (int c = range.lo + lane; c < range.hi; c += 32) {
      float acc[16] = {};
      const T* col = B + c * C::kLd;
      for (int d = 0; d < hd; ++d) {
        const float bv = to_float(col[d]);
#pragma unroll
        for (int r = 0; r < 16; ++r) acc[r] += to_float(A[r * C::kLd + d]) * bv;
      }
#pragma unroll
      for (int r = 0; r < 16; ++r) S[r * C::kScoreLd + c] = acc[r];
    }
  }
}

// Acc[16][d] += sum_c P[r][c] * B[c][d] over columns [lo, hi): the warp's 16 fp32
// accumulator rows (O, dq, dk or dv) plus a probability-like tile times a column block.
template <typename C, typename T>
__device__ inline void warp_accumulate(float* Acc, const typename C::prob_t* P, const T* B, WarpRange range, int hd) {
  if constexpr (C::kTC) {
    using namespace nvcuda;
    for (int n = 0; n < C::kPad / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, Acc + n * 16, C::kAccLd, wmma::mem_row_major);
      for (int k = range.lo / 16; k < range.hi / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, P + k * 16, C::kProbLd);
        wmma::load_matrix_sync(b, B + k * 16 * C::kLd + n * 16, C::kLd);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(Acc + n * 16, acc, C::kAccLd, wmma::mem_row_major);
    }
  } else {
    const int lane = threadIdx.x % 32;
    for (int d = lane; d < hd; d += 32) {
      float acc[16];
#pragma unroll
      for (int r = 0; r < 16; ++r) acc[r] = Acc[r * C::kAccLd + d];
      for (int c = range.lo; c < range.hi; ++c) {
        const float bv = to_float(B[c * C::kLd + d]);
#pragma unroll
        for (int r = 0; r < 16; ++r) acc[r] += P[r * C::kProbLd + c] * bv;
      }
#pragma unroll
      for (int r = 0; r < 16; ++r) Acc[r * C::kAccLd + d] = acc[r];
    }
  }
}

// warp_accumulate restricted to each row's own window: Acc[r][d] += sum_c P[r][c] * B[c][d]
// over the columns c of [lo, hi) in row r's window, on the SIMT lanes (one (r, d) per
// lane), for column blocks whose B holds an inf or NaN (see the top of this file).
template <typename C, typename T>
__device__ inline void warp_accumulate_own_window(float* Acc, const typename C::prob_t* P, const T* B, WarpRange range,
                                                  int hd, const Span& span, int warp, int64_t c0) {
  const int lane = threadIdx.x % 32;
  for (int e = lane; e < 16 * hd; e += 32) {
    const int r = e / hd, d = e % hd, row = 16 * warp + r;
    if (row >= span.rows) continue;
    const int64_t own_lo = span.first_col_of_row(row) - c0;
    const int lo = static_cast<int>(own_lo > range.lo ? own_lo : range.lo);
    const int hi = static_cast<int>(own_lo + span.cols_per_window < range.hi ? own_lo + span.cols_per_window : range.hi);
    float acc = Acc[r * C::kAccLd + d];
    for (int c = lo; c < hi; ++c) acc += to_float(P[r * C::kProbLd + c]) * to_float(B[c * C::kLd + d]);
    Acc[r * C::kAccLd + d] = acc;
  }
}

// The product of a column block: own-window only when B (the summed-over operand) holds
// an inf or NaN anywhere in the block, the plain one otherwise.
template <typename C, typename T>
__device__ inline void warp_accumulate_windows(bool nonfinite, float* Acc, const typename C::prob_t* P, const T* B,
                                               WarpRange range, int hd, const Span& span, int warp, int64_t c0) {
  if (nonfinite) {
    warp_accumulate_own_window<C>(Acc, P, B, range, hd, span, warp, c0);
  } else {
    warp_accumulate<C>(Acc, P, B, range, hd);
  }
}

template <typename C>
__device__ inline void zero_fill(float* p, int64_t count) {
  for (int64_t e = threadIdx.x; e < count; e += C::kThreads) p[e] = 0.f;
}

__device__ __forceinline__ float softmax_scale(int hd) { return 1.f / sqrtf(static_cast<float>(hd)); }

// Every pass declares one CTA per SM as its minimum: shared memory (48 to 158 KB per
// CTA) bounds occupancy anyway, and without the hint ptxas caps registers at 56 to
// 72 and spills (sm_90).

// ---------------------------------------------------------------------------- forward
// One CTA: 16 * kWarps pooled queries of one (image, head), against the keys of their
// windows, in blocks of kCols keys.
template <typename Layout, typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(Config<scalar_t, kHeadDim, Pass::kForward>::kThreads, 1)
    forward_kernel(const Layout L, const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ pad,
                   scalar_t* __restrict__ out, float* __restrict__ lse, uint8_t* __restrict__ argmax) {
  using C = Config<scalar_t, kHeadDim, Pass::kForward>;
  using prob_t = typename C::prob_t;
  extern __shared__ __align__(128) unsigned char smem[];
  scalar_t* q = reinterpret_cast<scalar_t*>(smem + C::kS.row_tile[0]);   // [kRows][kLd]
  scalar_t* k = reinterpret_cast<scalar_t*>(smem + C::kS.col_tile[0]);   // [kCols][kLd]
  scalar_t* v = reinterpret_cast<scalar_t*>(smem + C::kS.col_tile[1]);   // [kCols][kLd]
  float* scores = reinterpret_cast<float*>(smem + C::kS.score[0]);      // [kRows][kScoreLd]
  prob_t* probs = reinterpret_cast<prob_t*>(smem + C::kS.prob);         // [kRows][kProbLd]
  float* o = reinterpret_cast<float*>(smem + C::kS.acc[0]);             // [kRows][kAccLd]
  float* row_max = reinterpret_cast<float*>(smem + C::kS.stats);        // [kRows], scaled units
  float* row_sum = row_max + C::kRows;                                  // [kRows]
  float* rescale = row_sum + C::kRows;                                  // [kRows]

  const int hd = C::head_dim(L), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale = softmax_scale(hd);
  const Span span = make_span(L, L.queries, L.per_window, C::kRows);
  load_queries<C, true>(q, C::kRows, L, qkv, pad, span.b, span.h,
                        [&](int r, int64_t& w, int64_t& i) {
                          w = span.window_of_row(r), i = span.position_of_row(r);
                          return r < span.rows;
                        },
                        argmax, nullptr);
  zero_fill<C>(o, int64_t{C::kRows} * C::kAccLd);
  for (int r = threadIdx.x; r < C::kRows; r += C::kThreads) row_max[r] = kNegInf, row_sum[r] = 0.f;

  const int r = lane / 2, half = lane % 2;  // softmax: lanes 2r and 2r + 1 share row r
  const int row = 16 * warp + r;
  const bool row_exists = row < span.rows;
  for (int64_t c0 = 0; c0 < span.cols; c0 += C::kCols) {
    __syncthreads();  // the previous block's k and v are consumed (and q, o, stats are ready)
    const bool v_nonfinite = __syncthreads_or(load_key_block<C>(k, v, qkv, pad, L, span, c0, hd).v);
    const WarpRange range = warp_range<C::kCols>(span, warp, c0);
    if (range.lo == range.hi) continue;
    float* s_w = scores + 16 * warp * C::kScoreLd;
    prob_t* p_w = probs + 16 * warp * C::kProbLd;
    float* o_w = o + 16 * warp * C::kAccLd;
    warp_scores<C>(q + 16 * warp * C::kLd, k, s_w, range, hd);
    __syncwarp();
    // Online softmax over this block's columns of row r's window.
    const int64_t own_lo = row_exists ? span.first_col_of_row(row) - c0 : 0;
    const int64_t own_hi = row_exists ? own_lo + span.cols_per_window : 0;
    float block_max = kNegInf;
    for (int c = range.lo + half; c < range.hi; c += 2)
      if (c >= own_lo && c < own_hi) block_max = fmaxf(block_max, s_w[r * C::kScoreLd + c] * scale);
    block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
    const float old_max = row_exists ? row_max[row] : kNegInf;
    const float new_max = fmaxf(old_max, block_max);
    const bool any = new_max != kNegInf;  // false until the row has met one of its keys
    float sum = 0.f;
    for (int c = range.lo + half; c < range.hi; c += 2) {
      const float p = any && c >= own_lo && c < own_hi ? expf(s_w[r * C::kScoreLd + c] * scale - new_max) : 0.f;
      p_w[r * C::kProbLd + c] = from_float<prob_t>(p);
      sum += p;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    if (row_exists && half == 0) {
      const float alpha = any ? expf(old_max - new_max) : 1.f;  // 0 on the row's first keys
      row_max[row] = new_max;
      row_sum[row] = row_sum[row] * alpha + sum;
      rescale[row] = alpha;
    } else if (!row_exists && half == 0) {
      rescale[row] = 1.f;
    }
    __syncwarp();
    for (int e = lane; e < 16 * hd; e += 32) o_w[(e / hd) * C::kAccLd + e % hd] *= rescale[16 * warp + e / hd];
    __syncwarp();
    warp_accumulate_windows<C>(v_nonfinite, o_w, p_w, v, range, hd, span, warp, c0);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < span.rows * hd; e += C::kThreads) {
    const int rr = e / hd, d = e % hd;
    const int64_t w = span.window_of_row(rr), i = span.position_of_row(rr);
    const int64_t offset = L.out_offset(span.b, span.h, i, w);  // -1: cropped, the lse only
    if (offset >= 0) out[offset + d] = from_float<scalar_t>(o[rr * C::kAccLd + d] / row_sum[rr]);
    if (d == 0) lse[L.lse_offset(span.b, span.h, w, i)] = row_max[rr] + logf(row_sum[rr]);
  }
}

// --------------------------------------------------------------------------- backward
// D = rowsum(dO * O) for every pooled query, one warp per query and head (0 for a
// cropped one: it has no gradient, and the passes below skip it).
template <typename Layout, typename scalar_t>
__global__ void __launch_bounds__(256) delta_kernel(const Layout L, const scalar_t* __restrict__ grad_out,
                                                    const scalar_t* __restrict__ out, float* __restrict__ delta) {
  const int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;  // lse layout [B, heads, windows, queries]
  const int lane = threadIdx.x % 32;
  if (row >= L.batch * L.heads * L.windows * L.queries) return;
  const int64_t i = row % L.queries, w = row / L.queries % L.windows, h = row / (L.queries * L.windows) % L.heads;
  const int64_t b = row / (L.queries * L.windows * L.heads);
  const int64_t offset = L.out_offset(b, h, i, w);
  float acc = 0.f;
  for (int64_t d = lane; offset >= 0 && d < L.head_dim; d += 32) acc += to_float(grad_out[offset + d]) * to_float(out[offset + d]);
  for (int m = 16; m > 0; m /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  if (lane == 0) delta[row] = acc;
}

// dq for 16 * kWarps pooled queries of one (image, head), streaming their windows' keys.
// A cropped query is not live: its rows load zeros, its dS is 0, and its candidates get 0.
template <typename Layout, typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(Config<scalar_t, kHeadDim, Pass::kBackwardDq>::kThreads, 1)
    dq_kernel(const Layout L, const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ qkv,
              const scalar_t* __restrict__ pad, const float* __restrict__ lse, const float* __restrict__ delta,
              const uint8_t* __restrict__ argmax, scalar_t* __restrict__ grad_qkv) {
  using C = Config<scalar_t, kHeadDim, Pass::kBackwardDq>;
  using prob_t = typename C::prob_t;
  extern __shared__ __align__(128) unsigned char smem[];
  scalar_t* q = reinterpret_cast<scalar_t*>(smem + C::kS.row_tile[0]);    // [kRows][kLd]
  scalar_t* d_out = reinterpret_cast<scalar_t*>(smem + C::kS.row_tile[1]);  // [kRows][kLd]
  scalar_t* k = reinterpret_cast<scalar_t*>(smem + C::kS.col_tile[0]);    // [kCols][kLd]
  scalar_t* v = reinterpret_cast<scalar_t*>(smem + C::kS.col_tile[1]);    // [kCols][kLd]
  float* scores = reinterpret_cast<float*>(smem + C::kS.score[0]);       // [kRows][kScoreLd]
  float* d_probs = reinterpret_cast<float*>(smem + C::kS.score[1]);      // [kRows][kScoreLd]
  prob_t* d_scores = reinterpret_cast<prob_t*>(smem + C::kS.prob);       // [kRows][kProbLd]
  float* dq = reinterpret_cast<float*>(smem + C::kS.acc[0]);             // [kRows][kAccLd]
  float* row_lse = reinterpret_cast<float*>(smem + C::kS.stats);         // [kRows]
  float* row_delta = row_lse + C::kRows;                                 // [kRows]
  int* row_live = reinterpret_cast<int*>(row_delta + C::kRows);          // [kRows]

  const int hd = C::head_dim(L), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale = softmax_scale(hd);
  const Span span = make_span(L, L.queries, L.per_window, C::kRows);
  const auto query = [&](int r, int64_t& w, int64_t& i) {  // whether row r is a live query
    w = span.window_of_row(r), i = span.position_of_row(r);
    return r < span.rows && L.out_offset(span.b, span.h, i, w) >= 0;
  };
  load_queries<C, false>(q, C::kRows, L, qkv, pad, span.b, span.h, query, nullptr, argmax);
  load_rows<C>(d_out, C::kRows, hd, [&](int r) -> const scalar_t* {
    int64_t w, i;
    return query(r, w, i) ? grad_out + L.out_offset(span.b, span.h, i, w) : nullptr;
  });
  zero_fill<C>(dq, int64_t{C::kRows} * C::kAccLd);
  for (int r = threadIdx.x; r < C::kRows; r += C::kThreads) {
    int64_t w, i;
    const bool exists = query(r, w, i);
    row_lse[r] = exists ? lse[L.lse_offset(span.b, span.h, w, i)] : 0.f;
    row_delta[r] = exists ? delta[L.lse_offset(span.b, span.h, w, i)] : 0.f;
    row_live[r] = exists;
  }

  for (int64_t c0 = 0; c0 < span.cols; c0 += C::kCols) {
    __syncthreads();
    const bool k_nonfinite = __syncthreads_or(load_key_block<C>(k, v, qkv, pad, L, span, c0, hd).k);
    const WarpRange range = warp_range<C::kCols>(span, warp, c0);
    if (range.lo == range.hi) continue;
    float* s_w = scores + 16 * warp * C::kScoreLd;
    float* dp_w = d_probs + 16 * warp * C::kScoreLd;
    prob_t* ds_w = d_scores + 16 * warp * C::kProbLd;
    warp_scores<C>(q + 16 * warp * C::kLd, k, s_w, range, hd);
    warp_scores<C>(d_out + 16 * warp * C::kLd, v, dp_w, range, hd);
    __syncwarp();
    // dS = P (dP - D), P = exp(scale * s - lse); 0 outside the row's window.
    for (int e = lane; e < 16 * (range.hi - range.lo); e += 32) {
      const int r = e / (range.hi - range.lo), c = range.lo + e % (range.hi - range.lo), row = 16 * warp + r;
      float ds = 0.f;
      if (row_live[row]) {
        const int64_t own_lo = span.first_col_of_row(row) - c0;
        if (c >= own_lo && c < own_lo + span.cols_per_window) {
          const float p = expf(s_w[r * C::kScoreLd + c] * scale - row_lse[row]);
          ds = p * (dp_w[r * C::kScoreLd + c] - row_delta[row]);
        }
      }
      ds_w[r * C::kProbLd + c] = from_float<prob_t>(ds);
    }
    __syncwarp();
    warp_accumulate_windows<C>(k_nonfinite, dq + 16 * warp * C::kAccLd, ds_w, k, range, hd, span, warp, c0);
  }
  __syncthreads();
  // Route dq through the pooling argmax: every q candidate in qkv gets its gradient or 0
  // (all of them 0 for a cropped query).
  const int64_t candidates = L.candidate_count();
  for (int e = threadIdx.x; e < span.rows * hd; e += C::kThreads) {
    const int r = e / hd, d = e % hd;
    int64_t w, i;
    const bool live = query(r, w, i);
    const float g = dq[r * C::kAccLd + d] * scale;
    const int64_t chosen = !live ? -1 : candidates > 1 ? argmax[L.out_offset(span.b, span.h, i, w) + d] : 0;
    for (int64_t c = 0; c < candidates; ++c) {
      const int64_t offset = L.candidate_offset(span.b, span.h, i, w, c);
      if (offset >= 0) grad_qkv[offset + d] = from_float<scalar_t>(c == chosen ? g : 0.f);
    }
  }
}

// dk and dv for 16 * kWarps keys of one (image, head), streaming their windows' live
// (stored) pooled queries. A padded key's dk and dv go into the CTA's sum in
// pad_partials [CTA][2][hd] (kPadded layouts, where pad_partials is not null).
template <typename Layout, typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(Config<scalar_t, kHeadDim, Pass::kBackwardDkDv>::kThreads, 1)
    dkdv_kernel(const Layout L, const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ qkv,
                const scalar_t* __restrict__ pad, const float* __restrict__ lse, const float* __restrict__ delta,
                const uint8_t* __restrict__ argmax, scalar_t* __restrict__ grad_qkv, float* __restrict__ pad_partials) {
  using C = Config<scalar_t, kHeadDim, Pass::kBackwardDkDv>;
  using prob_t = typename C::prob_t;
  extern __shared__ __align__(128) unsigned char smem[];
  scalar_t* k = reinterpret_cast<scalar_t*>(smem + C::kS.row_tile[0]);      // [kRows][kLd]
  scalar_t* v = reinterpret_cast<scalar_t*>(smem + C::kS.row_tile[1]);      // [kRows][kLd]
  scalar_t* q = reinterpret_cast<scalar_t*>(smem + C::kS.col_tile[0]);      // [kCols][kLd]
  scalar_t* d_out = reinterpret_cast<scalar_t*>(smem + C::kS.col_tile[1]);  // [kCols][kLd]
  float* scores = reinterpret_cast<float*>(smem + C::kS.score[0]);         // [kRows][kScoreLd]: s^T, then P^T
  float* d_probs = reinterpret_cast<float*>(smem + C::kS.score[1]);        // [kRows][kScoreLd]: dP^T
  prob_t* probs = reinterpret_cast<prob_t*>(smem + C::kS.prob);            // [kRows][kProbLd]: P^T, then dS^T
  float* dk = reinterpret_cast<float*>(smem + C::kS.acc[0]);               // [kRows][kAccLd]
  float* dv = reinterpret_cast<float*>(smem + C::kS.acc[1]);               // [kRows][kAccLd]
  float* col_lse = reinterpret_cast<float*>(smem + C::kS.stats);           // [kCols]
  float* col_delta = col_lse + C::kCols;                                   // [kCols]
  int* col_live = reinterpret_cast<int*>(col_delta + C::kCols);            // [kCols]

  const int hd = C::head_dim(L), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale = softmax_scale(hd);
  const Span span = make_span(L, L.per_window, L.queries, C::kRows);
  const auto key_offset = [&](int which, int r) {  // -1: padding
    return L.key_offset(span.b, which, span.h, span.position_of_row(r), span.window_of_row(r));
  };
  const auto key_row = [&](int which) {
    return [&, which](int r) -> const scalar_t* {
      return r < span.rows ? row_or_pad(L, qkv, pad, key_offset(which, r), which, span.h) : nullptr;
    };
  };
  load_rows<C>(k, C::kRows, hd, key_row(Layout::kKey));
  load_rows<C>(v, C::kRows, hd, key_row(Layout::kValue));
  zero_fill<C>(dk, int64_t{C::kRows} * C::kAccLd);
  zero_fill<C>(dv, int64_t{C::kRows} * C::kAccLd);

  for (int64_t c0 = 0; c0 < span.cols; c0 += C::kCols) {
    __syncthreads();
    const auto query = [&](int c, int64_t& w, int64_t& i) {  // whether column c is a live query
      w = span.window_of_col(c0 + c), i = span.position_of_col(c0 + c);
      return c0 + c < span.cols && L.out_offset(span.b, span.h, i, w) >= 0;
    };
    const bool q_loaded_nonfinite =
        load_queries<C, false>(q, C::kCols, L, qkv, pad, span.b, span.h, query, nullptr, argmax);
    const bool d_out_loaded_nonfinite = load_rows<C>(d_out, C::kCols, hd, [&](int c) -> const scalar_t* {
      int64_t w, i;
      return query(c, w, i) ? grad_out + L.out_offset(span.b, span.h, i, w) : nullptr;
    });
    for (int c = threadIdx.x; c < C::kCols; c += C::kThreads) {
      int64_t w, i;
      const bool exists = query(c, w, i);
      col_lse[c] = exists ? lse[L.lse_offset(span.b, span.h, w, i)] : 0.f;
      col_delta[c] = exists ? delta[L.lse_offset(span.b, span.h, w, i)] : 0.f;
      col_live[c] = exists;
    }
    // One flag for both summed-over operands: one barrier, as before.
    const bool nonfinite = __syncthreads_or(q_loaded_nonfinite || d_out_loaded_nonfinite);
    const WarpRange range = warp_range<C::kCols>(span, warp, c0);
    if (range.lo == range.hi) continue;
    float* s_w = scores + 16 * warp * C::kScoreLd;
    float* dp_w = d_probs + 16 * warp * C::kScoreLd;
    prob_t* p_w = probs + 16 * warp * C::kProbLd;
    float* dk_w = dk + 16 * warp * C::kAccLd;
    float* dv_w = dv + 16 * warp * C::kAccLd;
    warp_scores<C>(k + 16 * warp * C::kLd, q, s_w, range, hd);      // s^T [keys][queries]
    warp_scores<C>(v + 16 * warp * C::kLd, d_out, dp_w, range, hd);  // dP^T
    __syncwarp();
    const int width = range.hi - range.lo;
    for (int e = lane; e < 16 * width; e += 32) {  // P^T = exp(scale * s^T - lse), 0 outside the key's window
      const int r = e / width, c = range.lo + e % width, row = 16 * warp + r;
      float p = 0.f;
      if (row < span.rows && col_live[c]) {
        const int64_t own_lo = span.first_col_of_row(row) - c0;
        if (c >= own_lo && c < own_lo + span.cols_per_window) p = expf(s_w[r * C::kScoreLd + c] * scale - col_lse[c]);
      }
      s_w[r * C::kScoreLd + c] = p;
      p_w[r * C::kProbLd + c] = from_float<prob_t>(p);
    }
    __syncwarp();
    warp_accumulate_windows<C>(nonfinite, dv_w, p_w, d_out, range, hd, span, warp, c0);  // dv += P^T dO
    __syncwarp();
    for (int e = lane; e < 16 * width; e += 32) {  // dS^T = P^T (dP^T - D), 0 outside the key's window
      const int r = e / width, c = range.lo + e % width, row = 16 * warp + r;
      float ds = 0.f;
      if (row < span.rows && col_live[c]) {
        const int64_t own_lo = span.first_col_of_row(row) - c0;
        if (c >= own_lo && c < own_lo + span.cols_per_window) ds = s_w[r * C::kScoreLd + c] * (dp_w[r * C::kScoreLd + c] - col_delta[c]);
      }
      p_w[r * C::kProbLd + c] = from_float<prob_t>(ds);
    }
    __syncwarp();
    warp_accumulate_windows<C>(nonfinite, dk_w, p_w, q, range, hd, span, warp, c0);  // dk += dS^T q (scaled below)
  }
  __syncthreads();
  for (int e = threadIdx.x; e < span.rows * hd; e += C::kThreads) {
    const int r = e / hd, d = e % hd;
    const int64_t k_offset = key_offset(Layout::kKey, r);
    if (k_offset < 0) continue;  // padding: summed below
    grad_qkv[k_offset + d] = from_float<scalar_t>(dk[r * C::kAccLd + d] * scale);
    grad_qkv[key_offset(Layout::kValue, r) + d] = from_float<scalar_t>(dv[r * C::kAccLd + d]);
  }
  if constexpr (Layout::kPadded) {
    if (pad_partials == nullptr) return;
    // This CTA's padded keys' dk and dv, summed in row order (deterministic).
    for (int e = threadIdx.x; e < 2 * hd; e += C::kThreads) {
      const float* acc = e < hd ? dk : dv;
      const int d = e % hd;
      float sum = 0.f;
      for (int r = 0; r < span.rows; ++r)
        if (key_offset(Layout::kKey, r) < 0) sum += acc[r * C::kAccLd + d];
      pad_partials[int64_t{blockIdx.x} * 2 * hd + e] = e < hd ? sum * scale : sum;
    }
  }
}

// grad_pad [3 * C], one thread per element: the q part 0 (a stored query's candidates
// are all in qkv), the k and v parts each head's padded keys' dk and dv, the sum of the
// dk/dv CTAs' partials over images and key tiles in a fixed order. With no padded key
// (pad_partials null) all 0.
template <typename scalar_t>
__global__ void __launch_bounds__(256) pad_grad_kernel(const WindowLayout L, int64_t tiles_per_head,
                                                       const float* __restrict__ pad_partials,
                                                       scalar_t* __restrict__ grad_pad) {
  const int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (e >= 3 * L.dim) return;
  const int64_t which = e / L.dim, h = e % L.dim / L.head_dim, d = e % L.head_dim;
  float sum = 0.f;
  if (which != WindowLayout::kQuery && pad_partials != nullptr) {
    for (int64_t b = 0; b < L.batch; ++b) {
      const float* partial = pad_partials + (b * L.heads + h) * tiles_per_head * 2 * L.head_dim + (which - 1) * L.head_dim + d;
      for (int64_t t = 0; t < tiles_per_head; ++t) sum += partial[t * 2 * L.head_dim];
    }
  }
  grad_pad[e] = from_float<scalar_t>(sum);
}

// -------------------------------------------------------------------------- launchers
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int64_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename Layout, typename scalar_t, int kHeadDim>
cudaError_t launch_forward(const ForwardArgs<Layout>& a, cudaStream_t stream) {
  using C = Config<scalar_t, kHeadDim, Pass::kForward>;
  const auto kernel = forward_kernel<Layout, scalar_t, kHeadDim>;
  if (const cudaError_t err = allow_smem(kernel, C::kS.bytes); err != cudaSuccess) return err;
  const int64_t grid = grid_size(a.layout, Pass::kForward, dtype_of<scalar_t>());
  kernel<<<static_cast<unsigned>(grid), C::kThreads, C::kS.bytes, stream>>>(
      a.layout, static_cast<const scalar_t*>(a.qkv), static_cast<const scalar_t*>(a.pad), static_cast<scalar_t*>(a.out),
      a.lse, a.argmax);
  return cudaGetLastError();
}

template <typename Layout, typename scalar_t, int kHeadDim>
cudaError_t launch_backward(const BackwardArgs<Layout>& a, cudaStream_t stream) {
  using Dq = Config<scalar_t, kHeadDim, Pass::kBackwardDq>;
  using DkDv = Config<scalar_t, kHeadDim, Pass::kBackwardDkDv>;
  const Layout& L = a.layout;
  const auto* grad_out = static_cast<const scalar_t*>(a.grad_out);
  const auto* qkv = static_cast<const scalar_t*>(a.qkv);
  const auto* pad = static_cast<const scalar_t*>(a.pad);
  auto* grad_qkv = static_cast<scalar_t*>(a.grad_qkv);
  const int64_t query_rows = L.batch * L.heads * L.windows * L.queries;
  delta_kernel<Layout, scalar_t><<<static_cast<unsigned>((query_rows + 7) / 8), 256, 0, stream>>>(
      L, grad_out, static_cast<const scalar_t*>(a.out), a.delta);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;

  const auto dq = dq_kernel<Layout, scalar_t, kHeadDim>;
  if (const cudaError_t err = allow_smem(dq, Dq::kS.bytes); err != cudaSuccess) return err;
  dq<<<static_cast<unsigned>(grid_size(L, Pass::kBackwardDq, dtype_of<scalar_t>())), Dq::kThreads, Dq::kS.bytes, stream>>>(
      L, grad_out, qkv, pad, a.lse, a.delta, a.argmax, grad_qkv);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;

  const auto dkdv = dkdv_kernel<Layout, scalar_t, kHeadDim>;
  if (const cudaError_t err = allow_smem(dkdv, DkDv::kS.bytes); err != cudaSuccess) return err;
  const int64_t dkdv_grid = grid_size(L, Pass::kBackwardDkDv, dtype_of<scalar_t>());
  dkdv<<<static_cast<unsigned>(dkdv_grid), DkDv::kThreads, DkDv::kS.bytes, stream>>>(
      L, grad_out, qkv, pad, a.lse, a.delta, a.argmax, grad_qkv, a.pad_partials);
  if constexpr (Layout::kPadded) {
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    pad_grad_kernel<scalar_t><<<static_cast<unsigned>((3 * L.dim + 255) / 256), 256, 0, stream>>>(
        L, dkdv_grid / (L.batch * L.heads), a.pad_partials, static_cast<scalar_t*>(a.grad_pad));
  }
  return cudaGetLastError();
}

template <typename Layout, int kHeadDim>
cudaError_t forward(const ForwardArgs<Layout>& args, Dtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return launch_forward<Layout, float, kHeadDim>(args, stream);
    case Dtype::kFloat16: return launch_forward<Layout, __half, kHeadDim>(args, stream);
    case Dtype::kBFloat16: return launch_forward<Layout, __nv_bfloat16, kHeadDim>(args, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename Layout, int kHeadDim>
cudaError_t backward(const BackwardArgs<Layout>& args, Dtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return launch_backward<Layout, float, kHeadDim>(args, stream);
    case Dtype::kFloat16: return launch_backward<Layout, __half, kHeadDim>(args, stream);
    case Dtype::kBFloat16: return launch_backward<Layout, __nv_bfloat16, kHeadDim>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda_attention
}  // namespace hiera_kernels
