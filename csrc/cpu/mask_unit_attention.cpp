// CPU mask-unit attention with fused query pooling, forward and backward.
//
// One task is one (image, window, head) -- and, in the forward, one block of at
// most kQueryBlock pooled queries. It reads q, k and v straight out of the qkv
// Linear's output (attention_layout.h: no permute copies), max-pools q while
// loading it (a one-byte argmax per element for the backward), runs flash-style
// online-softmax attention over blocks of kKeyBlock keys in fp32 (so no score
// matrix larger than one block), and writes the output in token order for proj,
// with the float32 log-sum-exp the backward recomputes from.
//
// Operands are widened to tiles of the accumulation type (fp32; fp64 for float64
// inputs) padded with zeros to whole vectors, and every product goes through one
// register-blocked micro-kernel, gemm_rows().
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "hiera_kernels/attention_checks.h"
#include "hiera_kernels/attention_layout.h"
#include "pool_rows.h"

namespace hiera_kernels {
namespace {

constexpr int64_t kQueryBlock = 64;   // queries per block when a window's keys span several key blocks
constexpr int64_t kKeyBlock = 256;    // a window's keys, or a global block, in one score tile
// One 64-byte vector of T (an AVX-512 register; two AVX2 registers elsewhere).
template <typename T>
struct Simd {
  static constexpr int64_t kLanes = 64 / sizeof(T);
  typedef T Vec __attribute__((vector_size(64), aligned(alignof(T))));
  static Vec load(const T* p) {
    Vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(T* p, Vec v) { std::memcpy(p, &v, sizeof v); }
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C[m, n] += sum_k A(m, k) * B[k, n] for a tile of MR rows and NV vectors of
// columns, accumulated in registers. A(m, k) = a[m * a_row + k * a_col], so a
// transposed A costs nothing.
template <typename T, int MR, int NV>
void gemm_tile(int64_t K, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c, int64_t ldc,
               bool accumulate) {
  using S = Simd<T>;
  typename S::Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? S::load(c + r * ldc + v * S::kLanes) : typename S::Vec{};
  for (int64_t k = 0; k < K; ++k) {
    typename S::Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = S::load(b + k * ldb + v * S::kLanes);
    for (int r = 0; r < MR; ++r) {
      const T av = a[r * a_row + k * a_col];
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) S::store(c + r * ldc + v * S::kLanes, acc[r][v]);
}

template <typename T, int MR>
void gemm_row_tile(int64_t K, int64_t nv, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c,
                   int64_t ldc, bool accumulate) {
  switch (nv) {
    case 1: return gemm_tile<T, MR, 1>(K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
    case 2: return gemm_tile<T, MR, 2>(K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
    case 3: return gemm_tile<T, MR, 3>(K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
    default: return gemm_tile<T, MR, 4>(K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  }
}

// C[M, N] (+)= A(M, K) . B[K, N], N a whole number of vectors, row-major; without
// accumulate, C is overwritten (so it needs no zero fill).
template <typename T>
void gemm_rows(int64_t M, int64_t K, int64_t N, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
               T* c, int64_t ldc, bool accumulate = true) {
  constexpr int64_t lanes = Simd<T>::kLanes;
  for (int64_t n0 = 0; n0 < N; n0 += 4 * lanes) {
    const int64_t nv = std::min<int64_t>(4, (N - n0) / lanes);
    int64_t m0 = 0;
    for (; m0 + 6 <= M; m0 += 6)
      gemm_row_tile<T, 6>(K, nv, a + m0 * a_row, a_row, a_col, b + n0, ldb, c + m0 * ldc + n0, ldc, accumulate);
    for (; m0 + 4 <= M; m0 += 4)
      gemm_row_tile<T, 4>(K, nv, a + m0 * a_row, a_row, a_col, b + n0, ldb, c + m0 * ldc + n0, ldc, accumulate);
    for (; m0 < M; ++m0)
      gemm_row_tile<T, 1>(K, nv, a + m0 * a_row, a_row, a_col, b + n0, ldb, c + m0 * ldc + n0, ldc, accumulate);
  }
}

typedef int32_t ivec16 __attribute__((vector_size(64)));
using vec16 = Simd<float>::Vec;

// exp(x) for 16 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6
// polynomial (~1 ulp), 2^n by the exponent bits. Inputs below -87.3 give ~1e-38
// instead of a denormal or 0; NaN stays NaN. (glibc's vector expf would need
// -ffast-math, which would also break the NaN rules of the pooling.)
inline vec16 exp16(vec16 x) {
  const vec16 lo = vec16{} - 87.3f, hi = vec16{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const vec16 n = (x * 1.44269504f + magic) - magic;
  const vec16 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 split in two
  vec16 p = vec16{} + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const ivec16 bits = (__builtin_convertvector(n, ivec16) + 127) << 23;
  vec16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// exp of every lane: the polynomial for fp32, libm for fp64 (gradcheck).
inline Simd<float>::Vec exp_vec(Simd<float>::Vec x) { return exp16(x); }
inline Simd<double>::Vec exp_vec(Simd<double>::Vec x) {
  for (int64_t l = 0; l < Simd<double>::kLanes; ++l) x[l] = std::exp(x[l]);
  return x;
}

template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

// Rows [j0, j0 + n) of k or v (which) of (b, h, w), widened into rows [n, hd_pad],
// zero-padded: contiguous copies, no transposes.
template <typename scalar_t, typename acc_t>
void load_rows(const AttentionLayout& L, const scalar_t* qkv, int which, int64_t b, int64_t h, int64_t w,
               int64_t j0, int64_t n, int64_t hd_pad, acc_t* rows) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* src = qkv + L.qkv_offset(b, which, h, j0 + j, w);
    acc_t* dst = rows + j * hd_pad;
    for (int64_t d = 0; d < L.head_dim; ++d) dst[d] = static_cast<acc_t>(src[d]);
    std::fill(dst + L.head_dim, dst + hd_pad, acc_t(0));
  }
}

// cols [hd, n_pad] = rows [n, hd_pad] transposed, columns n..n_pad zero.
template <typename acc_t>
void transpose_rows(const acc_t* rows, int64_t n, int64_t hd, int64_t hd_pad, acc_t* cols, int64_t n_pad) {
  for (int64_t d = 0; d < hd; ++d) {
    acc_t* col = cols + d * n_pad;
    for (int64_t i = 0; i < n; ++i) col[i] = rows[i * hd_pad + d];
    std::fill(col + n, col + n_pad, acc_t(0));
  }
}

// Pooled, pre-scaled queries [i0, i0 + mq) of (b, h, w) into q [mq, hd_pad]. The
// forward takes the max (PyTorch's max(dim): first max wins ties, first NaN wins)
// and records its argmax; the backward re-reads the recorded argmax.
// kPool: take the max and write argmax_out; otherwise gather the rows argmax_in names.
template <typename scalar_t, bool kPool, typename acc_t>
void load_queries(const AttentionLayout& L, const scalar_t* qkv, const uint8_t* argmax_in, uint8_t* argmax_out,
                  int64_t b, int64_t h, int64_t w, int64_t i0, int64_t mq, int64_t hd_pad, acc_t* q) {
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(L.head_dim));
  std::fill(q, q + mq * hd_pad, acc_t(0));
  for (int64_t i = 0; i < mq; ++i) {
    acc_t* qi = q + i * hd_pad;
    const int64_t arg_offset = L.out_offset(b, h, i0 + i, w);
    const scalar_t* first = qkv + L.qkv_offset(b, AttentionLayout::kQuery, h, L.pooled_position(0, i0 + i), w);
    if (L.q_stride == 1) {
      for (int64_t d = 0; d < L.head_dim; ++d) qi[d] = static_cast<acc_t>(first[d]) * scale;
      continue;
    }
    const int64_t s_stride = L.queries * L.qkv_position_stride();  // from candidate s to s + 1
    if constexpr (kPool) {
      for (int64_t d0 = 0; d0 < L.head_dim; d0 += kPoolRowBlock) {
        const int64_t n = std::min(kPoolRowBlock, L.head_dim - d0);
        max_over_rows(first + d0, s_stride, L.q_stride, n, qi + d0, argmax_out + arg_offset + d0);
      }
      for (int64_t d = 0; d < L.head_dim; ++d) qi[d] *= scale;
    } else {
      for (int64_t d = 0; d < L.head_dim; ++d)
        qi[d] = static_cast<acc_t>(first[argmax_in[arg_offset + d] * s_stride + d]) * scale;
    }
  }
}

// The products run in transposed space: scores^T [keys, queries] = K . Q^T, so K and
// V are plain row copies, only the (small) query block is transposed, and the
// softmax over keys is a reduction down columns: vectorised across queries.
template <typename acc_t>
struct ForwardTiles {
  int64_t hd_pad, q_pad;
  std::vector<acc_t> q_rows, q_cols, o, k_rows, v_rows, scores, col_max, col_sum, rescale;
  ForwardTiles(const AttentionLayout& L, int64_t queries) {
    constexpr int64_t lanes = Simd<acc_t>::kLanes;
    hd_pad = round_up(L.head_dim, lanes);
    q_pad = round_up(queries, lanes);
    const int64_t kb = std::min(kKeyBlock, L.per_window);
    q_rows.resize(queries * hd_pad);
    q_cols.resize(L.head_dim * q_pad);
    o.resize(queries * hd_pad);
    k_rows.resize(kb * hd_pad);
    v_rows.resize(kb * hd_pad);
    scores.resize(kb * q_pad);
    col_max.resize(q_pad);
    col_sum.resize(q_pad);
    rescale.resize(q_pad);
  }
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void forward_task(const AttentionLayout& L, const scalar_t* qkv, scalar_t* out, acc_t* lse, uint8_t* argmax,
                  int64_t b, int64_t h, int64_t w, int64_t i0, int64_t mq, ForwardTiles<acc_t>& t) {
  using S = Simd<acc_t>;
  using Vec = typename S::Vec;
  const int64_t hd = L.head_dim, hdp = t.hd_pad, mqp = round_up(mq, S::kLanes);
  load_queries<scalar_t, true, acc_t>(L, qkv, nullptr, argmax, b, h, w, i0, mq, hdp, t.q_rows.data());
  transpose_rows(t.q_rows.data(), mq, hd, hdp, t.q_cols.data(), mqp);
  std::fill(t.o.begin(), t.o.begin() + mq * hdp, acc_t(0));
  std::fill(t.col_max.begin(), t.col_max.begin() + mqp, -std::numeric_limits<acc_t>::infinity());
  std::fill(t.col_sum.begin(), t.col_sum.begin() + mqp, acc_t(0));
  acc_t* st = t.scores.data();
  for (int64_t j0 = 0; j0 < L.per_window; j0 += kKeyBlock) {
    const int64_t kb = std::min(kKeyBlock, L.per_window - j0);
    load_rows(L, qkv, AttentionLayout::kKey, b, h, w, j0, kb, hdp, t.k_rows.data());
    load_rows(L, qkv, AttentionLayout::kValue, b, h, w, j0, kb, hdp, t.v_rows.data());
    gemm_rows(kb, hd, mqp, t.k_rows.data(), hdp, 1, t.q_cols.data(), mqp, st, mqp, false);  // scores^T
    for (int64_t c = 0; c < mqp; c += S::kLanes) {  // online softmax, S::kLanes queries at a time
      Vec block_max = S::load(st + c);
      for (int64_t j = 1; j < kb; ++j) block_max = vmax(block_max, S::load(st + j * mqp + c));
      const Vec old_max = S::load(t.col_max.data() + c);
      const Vec new_max = vmax(old_max, block_max);
      Vec sum = Vec{};
      for (int64_t j = 0; j < kb; ++j) {
        const Vec p = exp_vec(S::load(st + j * mqp + c) - new_max);
        S::store(st + j * mqp + c, p);
        sum += p;
      }
      const Vec rescale = exp_vec(old_max - new_max);  // 0 (or ~1e-38) on the first block
      S::store(t.col_sum.data() + c, S::load(t.col_sum.data() + c) * rescale + sum);
      S::store(t.col_max.data() + c, new_max);
      S::store(t.rescale.data() + c, rescale);
    }
    if (j0 > 0)
      for (int64_t i = 0; i < mq; ++i)
        for (int64_t d = 0; d < hdp; ++d) t.o[i * hdp + d] *= t.rescale[i];
    gemm_rows(mq, kb, hdp, st, 1, mqp, t.v_rows.data(), hdp, t.o.data(), hdp);  // o += p . v
  }
  for (int64_t i = 0; i < mq; ++i) {
    const acc_t inv = acc_t(1) / t.col_sum[i];
    scalar_t* dst = out + L.out_offset(b, h, i0 + i, w);
    for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<scalar_t>(t.o[i * hdp + d] * inv);
    lse[L.lse_offset(b, h, w, i0 + i)] = t.col_max[i] + std::log(t.col_sum[i]);
  }
}

template <typename acc_t>
struct BackwardTiles {
  int64_t hd_pad, q_pad;
  std::vector<acc_t> q_rows, q_cols, d_out_rows, d_out_cols, dq, k_rows, v_rows, dk, dv, p, ds, lse, delta;
  explicit BackwardTiles(const AttentionLayout& L) {
    constexpr int64_t lanes = Simd<acc_t>::kLanes;
    hd_pad = round_up(L.head_dim, lanes);
    q_pad = round_up(L.queries, lanes);
    const int64_t kb = std::min(kKeyBlock, L.per_window);
    q_rows.resize(L.queries * hd_pad);
    d_out_rows.resize(L.queries * hd_pad);
    dq.resize(L.queries * hd_pad);
    q_cols.resize(L.head_dim * q_pad);
    d_out_cols.resize(L.head_dim * q_pad);
    k_rows.resize(kb * hd_pad);
    v_rows.resize(kb * hd_pad);
    dk.resize(kb * hd_pad);
    dv.resize(kb * hd_pad);
    p.resize(kb * kQueryBlock);
    ds.resize(kb * kQueryBlock);
    lse.resize(q_pad);
    delta.resize(q_pad);
  }
};

// dq, dk and dv of one (b, h, w): recompute p = exp(s - lse) block by block.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_task(const AttentionLayout& L, const scalar_t* grad_out, const scalar_t* qkv, const scalar_t* out,
                   const acc_t* lse, const uint8_t* argmax, scalar_t* grad_qkv, int64_t b, int64_t h, int64_t w,
                   BackwardTiles<acc_t>& t) {
  using S = Simd<acc_t>;
  using Vec = typename S::Vec;
  static_assert(kQueryBlock % S::kLanes == 0, "query blocks must start on whole vectors");
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(L.head_dim));
  const int64_t hd = L.head_dim, hdp = t.hd_pad, nq = L.queries, nqp = t.q_pad;
  load_queries<scalar_t, false, acc_t>(L, qkv, argmax, nullptr, b, h, w, 0, nq, hdp, t.q_rows.data());
  transpose_rows(t.q_rows.data(), nq, hd, hdp, t.q_cols.data(), nqp);
  std::fill(t.lse.begin(), t.lse.end(), acc_t(0));
  std::fill(t.delta.begin(), t.delta.end(), acc_t(0));
  for (int64_t i = 0; i < nq; ++i) {
    const scalar_t* go = grad_out + L.out_offset(b, h, i, w);
    const scalar_t* oi = out + L.out_offset(b, h, i, w);
    acc_t* dOi = t.d_out_rows.data() + i * hdp;
    acc_t delta = 0;  // rowsum(dO * O): the softmax backward's correction
    for (int64_t d = 0; d < hd; ++d) {
      dOi[d] = static_cast<acc_t>(go[d]);
      delta += dOi[d] * static_cast<acc_t>(oi[d]);
    }
    std::fill(dOi + hd, dOi + hdp, acc_t(0));
    t.delta[i] = delta;
    t.lse[i] = lse[L.lse_offset(b, h, w, i)];
  }
  transpose_rows(t.d_out_rows.data(), nq, hd, hdp, t.d_out_cols.data(), nqp);
  std::fill(t.dq.begin(), t.dq.begin() + nq * hdp, acc_t(0));
  for (int64_t j0 = 0; j0 < L.per_window; j0 += kKeyBlock) {
    const int64_t kb = std::min(kKeyBlock, L.per_window - j0);
    load_rows(L, qkv, AttentionLayout::kKey, b, h, w, j0, kb, hdp, t.k_rows.data());
    load_rows(L, qkv, AttentionLayout::kValue, b, h, w, j0, kb, hdp, t.v_rows.data());
    std::fill(t.dk.begin(), t.dk.begin() + kb * hdp, acc_t(0));
    std::fill(t.dv.begin(), t.dv.begin() + kb * hdp, acc_t(0));
    for (int64_t i0 = 0; i0 < nq; i0 += kQueryBlock) {
      const int64_t mq = std::min(kQueryBlock, nq - i0), mqp = round_up(mq, S::kLanes);
      acc_t* pt = t.p.data();
      acc_t* dst = t.ds.data();
      gemm_rows(kb, hd, mqp, t.k_rows.data(), hdp, 1, t.q_cols.data() + i0, nqp, pt, mqp, false);       // s^T
      gemm_rows(kb, hd, mqp, t.v_rows.data(), hdp, 1, t.d_out_cols.data() + i0, nqp, dst, mqp, false);  // dp^T
      for (int64_t j = 0; j < kb; ++j) {
        for (int64_t c = 0; c < mqp; c += S::kLanes) {
          const Vec p = exp_vec(S::load(pt + j * mqp + c) - S::load(t.lse.data() + i0 + c));
          S::store(pt + j * mqp + c, p);
          S::store(dst + j * mqp + c, p * (S::load(dst + j * mqp + c) - S::load(t.delta.data() + i0 + c)));
        }
      }
      // dv += p^T . dO ; dk += ds^T . q (q pre-scaled) ; dq += ds . k (scaled at the end)
      gemm_rows(kb, mq, hdp, pt, mqp, 1, t.d_out_rows.data() + i0 * hdp, hdp, t.dv.data(), hdp);
      gemm_rows(kb, mq, hdp, dst, mqp, 1, t.q_rows.data() + i0 * hdp, hdp, t.dk.data(), hdp);
      gemm_rows(mq, kb, hdp, dst, 1, mqp, t.k_rows.data(), hdp, t.dq.data() + i0 * hdp, hdp);
    }
    for (int64_t j = 0; j < kb; ++j) {
      scalar_t* gk = grad_qkv + L.qkv_offset(b, AttentionLayout::kKey, h, j0 + j, w);
      scalar_t* gv = grad_qkv + L.qkv_offset(b, AttentionLayout::kValue, h, j0 + j, w);
      for (int64_t d = 0; d < hd; ++d) {
        gk[d] = static_cast<scalar_t>(t.dk[j * hdp + d]);
        gv[d] = static_cast<scalar_t>(t.dv[j * hdp + d]);
      }
    }
  }
  // Route dq through the pooling argmax: every q candidate row gets its gradient or 0.
  const int64_t s_stride = L.queries * L.qkv_position_stride();
  for (int64_t i = 0; i < nq; ++i) {
    scalar_t* first = grad_qkv + L.qkv_offset(b, AttentionLayout::kQuery, h, L.pooled_position(0, i), w);
    const uint8_t* arg = L.q_stride > 1 ? argmax + L.out_offset(b, h, i, w) : nullptr;
    for (int64_t s = 0; s < L.q_stride; ++s) {
      scalar_t* row = first + s * s_stride;
      for (int64_t d = 0; d < hd; ++d) {
        const bool chosen = arg == nullptr || arg[d] == s;
        row[d] = static_cast<scalar_t>(chosen ? t.dq[i * hdp + d] * scale : acc_t(0));
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_unit_attention_cpu(const at::Tensor& qkv_in, int64_t heads,
                                                                       int64_t q_stride, int64_t windows) {
  const AttentionLayout L = make_attention_layout("hiera_kernels::mask_unit_attention", qkv_in, heads, q_stride, windows);
  const at::Tensor qkv = qkv_in.contiguous();
  at::Tensor out = at::empty({L.batch, L.queries * L.windows, L.dim}, qkv.options());
  at::Tensor lse = at::empty({L.batch, L.heads, L.windows, L.queries},
                             qkv.options().dtype(attention_lse_dtype(qkv.scalar_type())));
  at::Tensor argmax = q_stride > 1 ? at::empty({L.batch, L.queries * L.windows, L.dim}, qkv.options().dtype(at::kByte))
                                   : at::empty({0}, qkv.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, lse, argmax};
  // Keys that fit one block are loaded once for all of a window's queries; longer
  // sequences split the queries into blocks (more tasks, keys re-read per block).
  const int64_t block_rows = L.per_window <= kKeyBlock ? L.queries : kQueryBlock;
  const int64_t query_blocks = (L.queries + block_rows - 1) / block_rows;
  const int64_t tasks = L.batch * L.heads * L.windows * query_blocks;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "mask_unit_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      ForwardTiles<acc_t> tiles(L, block_rows);
      for (int64_t task = begin; task < end; ++task) {
        int64_t rest = task;
        const int64_t block = rest % query_blocks;
        rest /= query_blocks;
        const int64_t w = rest % L.windows;
        rest /= L.windows;
        const int64_t h = rest % L.heads, b = rest / L.heads;
        const int64_t i0 = block * block_rows;
        forward_task<scalar_t>(L, qkv.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                               lse.mutable_data_ptr<acc_t>(), argmax.mutable_data_ptr<uint8_t>(), b, h, w, i0,
                               std::min(block_rows, L.queries - i0), tiles);
      }
    });
  });
  return {out, lse, argmax};
}

at::Tensor mask_unit_attention_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& qkv_in,
                                            const at::Tensor& out_in, const at::Tensor& lse_in,
                                            const at::Tensor& argmax_in, int64_t heads, int64_t q_stride,
                                            int64_t windows) {
  const char* op = "hiera_kernels::mask_unit_attention_backward";
  const AttentionLayout L =
      check_attention_backward_args(op, grad_out_in, qkv_in, out_in, lse_in, argmax_in, heads, q_stride, windows);
  const at::Tensor qkv = qkv_in.contiguous(), grad_out = grad_out_in.contiguous().to(qkv.scalar_type());
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous(), argmax = argmax_in.contiguous();
  at::Tensor grad_qkv = at::empty_like(qkv);  // every element is written once
  if (grad_qkv.numel() == 0) return grad_qkv;
  const int64_t tasks = L.batch * L.heads * L.windows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "mask_unit_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      BackwardTiles<acc_t> tiles(L);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t w = task % L.windows, h = (task / L.windows) % L.heads, b = task / (L.windows * L.heads);
        backward_task<scalar_t>(L, grad_out.const_data_ptr<scalar_t>(), qkv.const_data_ptr<scalar_t>(),
                                out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
                                argmax.const_data_ptr<uint8_t>(), grad_qkv.mutable_data_ptr<scalar_t>(), b, h, w,
                                tiles);
      }
    });
  });
  return grad_qkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CPU, m) {
  m.impl("mask_unit_attention", &mask_unit_attention_cpu);
  m.impl("mask_unit_attention_backward", &mask_unit_attention_backward_cpu);
}

}  // namespace hiera_kernels
