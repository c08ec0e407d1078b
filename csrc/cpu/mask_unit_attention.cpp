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

#include "hiera_kernels/attention_layout.h"

namespace hiera_kernels {
namespace {

constexpr int64_t kQueryBlock = 64;   // at most; blocks are balanced (196 queries: 4 x 49)
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
void gemm_tile(int64_t K, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c, int64_t ldc) {
  using S = Simd<T>;
  typename S::Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = S::load(c + r * ldc + v * S::kLanes);
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
                   int64_t ldc) {
  switch (nv) {
    case 1: return gemm_tile<T, MR, 1>(K, a, a_row, a_col, b, ldb, c, ldc);
    case 2: return gemm_tile<T, MR, 2>(K, a, a_row, a_col, b, ldb, c, ldc);
    case 3: return gemm_tile<T, MR, 3>(K, a, a_row, a_col, b, ldb, c, ldc);
    default: return gemm_tile<T, MR, 4>(K, a, a_row, a_col, b, ldb, c, ldc);
  }
}

// C[M, N] += A(M, K) . B[K, N], N a whole number of vectors, row-major.
template <typename T>
void gemm_rows(int64_t M, int64_t K, int64_t N, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
               T* c, int64_t ldc) {
  constexpr int64_t lanes = Simd<T>::kLanes;
  for (int64_t n0 = 0; n0 < N; n0 += 4 * lanes) {
    const int64_t nv = std::min<int64_t>(4, (N - n0) / lanes);
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4)
      gemm_row_tile<T, 4>(K, nv, a + m0 * a_row, a_row, a_col, b + n0, ldb, c + m0 * ldc + n0, ldc);
    for (; m0 < M; ++m0) gemm_row_tile<T, 1>(K, nv, a + m0 * a_row, a_row, a_col, b + n0, ldb, c + m0 * ldc + n0, ldc);
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

// x[j] = exp(x[j] - shift) over a row of whole vectors.
inline void exp_row(float* x, int64_t n, float shift) {
  for (int64_t j = 0; j < n; j += Simd<float>::kLanes)
    Simd<float>::store(x + j, exp16(Simd<float>::load(x + j) - shift));
}
inline void exp_row(double* x, int64_t n, double shift) {  // float64: exact libm exp (gradcheck)
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - shift);
}

// Working tiles of one task in the accumulation type, reused across a thread's tasks.
template <typename acc_t>
struct Tiles {
  static constexpr int64_t kLanes = Simd<acc_t>::kLanes;
  int64_t hd_pad = 0;
  std::vector<acc_t> q, o, s, k, kt, v, vt, dq, dk, dv, dp, row_max, row_sum, delta, lse;
  Tiles(const AttentionLayout& L, int64_t query_rows) {
    hd_pad = round_up(L.head_dim, kLanes);
    const int64_t kb = round_up(std::min(kKeyBlock, L.per_window), kLanes);
    q.assign(query_rows * hd_pad, 0);
    o.assign(query_rows * hd_pad, 0);
    s.assign(std::min(query_rows, kQueryBlock) * kb, 0);
    dp.assign(std::min(query_rows, kQueryBlock) * kb, 0);
    k.assign(kb * hd_pad, 0);
    v.assign(kb * hd_pad, 0);
    kt.assign(L.head_dim * kb, 0);
    vt.assign(L.head_dim * kb, 0);
    row_max.assign(query_rows, 0);
    row_sum.assign(query_rows, 0);
  }
};

// Widen rows [j0, j0 + kb) of k or v (which) for (b, h, w) into fp32 tiles: row-major
// [kb_pad, hd_pad] and/or transposed [hd, kb_pad], zero-padded.
template <typename scalar_t, typename acc_t>
void load_keys(const AttentionLayout& L, const scalar_t* qkv, int which, int64_t b, int64_t h, int64_t w,
               int64_t j0, int64_t kb, int64_t kb_pad, int64_t hd_pad, acc_t* rows, acc_t* cols) {
  if (rows) std::fill(rows, rows + kb_pad * hd_pad, acc_t(0));
  if (cols) std::fill(cols, cols + L.head_dim * kb_pad, acc_t(0));
  for (int64_t j = 0; j < kb; ++j) {
    const scalar_t* src = qkv + L.qkv_offset(b, which, h, j0 + j, w);
    for (int64_t d = 0; d < L.head_dim; ++d) {
      const acc_t x = static_cast<acc_t>(src[d]);
      if (rows) rows[j * hd_pad + d] = x;
      if (cols) cols[d * kb_pad + j] = x;
    }
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
    for (int64_t d = 0; d < L.head_dim; ++d) {
      if constexpr (kPool) {
        acc_t best = static_cast<acc_t>(first[d]);
        uint8_t best_s = 0;
        for (int64_t s = 1; s < L.q_stride; ++s) {
          const acc_t x = static_cast<acc_t>(first[s * s_stride + d]);
          if (pool_takes<acc_t>(x, best)) {
            best = x;
            best_s = static_cast<uint8_t>(s);
          }
        }
        argmax_out[arg_offset + d] = best_s;
        qi[d] = best * scale;
      } else {
        qi[d] = static_cast<acc_t>(first[argmax_in[arg_offset + d] * s_stride + d]) * scale;
      }
    }
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void forward_task(const AttentionLayout& L, const scalar_t* qkv, scalar_t* out, acc_t* lse, uint8_t* argmax,
                  int64_t b, int64_t h, int64_t w, int64_t i0, int64_t mq, Tiles<acc_t>& t) {
  constexpr int64_t lanes = Simd<acc_t>::kLanes;
  const int64_t hd = L.head_dim, hdp = t.hd_pad;
  acc_t* q = t.q.data();
  acc_t* o = t.o.data();
  load_queries<scalar_t, true, acc_t>(L, qkv, nullptr, argmax, b, h, w, i0, mq, hdp, q);
  std::fill(o, o + mq * hdp, acc_t(0));
  std::fill(t.row_max.begin(), t.row_max.begin() + mq, -std::numeric_limits<acc_t>::infinity());
  std::fill(t.row_sum.begin(), t.row_sum.begin() + mq, acc_t(0));
  for (int64_t j0 = 0; j0 < L.per_window; j0 += kKeyBlock) {
    const int64_t kb = std::min(kKeyBlock, L.per_window - j0), kbp = round_up(kb, lanes);
    load_keys<scalar_t, acc_t>(L, qkv, AttentionLayout::kKey, b, h, w, j0, kb, kbp, hdp, nullptr, t.kt.data());
    load_keys<scalar_t, acc_t>(L, qkv, AttentionLayout::kValue, b, h, w, j0, kb, kbp, hdp, t.v.data(), nullptr);
    acc_t* s = t.s.data();
    std::fill(s, s + mq * kbp, 0.f);
    gemm_rows(mq, hd, kbp, q, hdp, 1, t.kt.data(), kbp, s, kbp);  // scores [mq, kbp]
    for (int64_t i = 0; i < mq; ++i) {
      acc_t* si = s + i * kbp;
      const acc_t block_max = *std::max_element(si, si + kb);
      const acc_t new_max = std::max(t.row_max[i], block_max);
      const acc_t rescale = std::exp(t.row_max[i] - new_max);
      exp_row(si, kbp, new_max);
      std::fill(si + kb, si + kbp, acc_t(0));
      acc_t sum = 0;
      for (int64_t j = 0; j < kb; ++j) sum += si[j];
      t.row_sum[i] = t.row_sum[i] * rescale + sum;
      t.row_max[i] = new_max;
      if (rescale != acc_t(1))
        for (int64_t d = 0; d < hdp; ++d) o[i * hdp + d] *= rescale;
    }
    gemm_rows(mq, kb, hdp, s, kbp, 1, t.v.data(), hdp, o, hdp);  // o += p . v
  }
  for (int64_t i = 0; i < mq; ++i) {
    const acc_t inv = acc_t(1) / t.row_sum[i];
    scalar_t* dst = out + L.out_offset(b, h, i0 + i, w);
    for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<scalar_t>(o[i * hdp + d] * inv);
    lse[L.lse_offset(b, h, w, i0 + i)] = t.row_max[i] + std::log(t.row_sum[i]);
  }
}

// dq, dk and dv of one (b, h, w): recompute p = exp(s - lse) block by block.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_task(const AttentionLayout& L, const scalar_t* grad_out, const scalar_t* qkv, const scalar_t* out,
                   const acc_t* lse, const uint8_t* argmax, scalar_t* grad_qkv, int64_t b, int64_t h, int64_t w,
                   Tiles<acc_t>& t) {
  constexpr int64_t lanes = Simd<acc_t>::kLanes;
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(L.head_dim));
  const int64_t hd = L.head_dim, hdp = t.hd_pad, nq = L.queries;
  std::vector<acc_t>& q = t.q;     // [nq, hdp], pre-scaled
  std::vector<acc_t>& dO = t.o;    // [nq, hdp]
  t.dq.assign(nq * hdp, acc_t(0));
  t.delta.resize(nq);
  t.lse.resize(nq);
  load_queries<scalar_t, false, acc_t>(L, qkv, argmax, nullptr, b, h, w, 0, nq, hdp, q.data());
  std::fill(dO.begin(), dO.begin() + nq * hdp, acc_t(0));
  for (int64_t i = 0; i < nq; ++i) {
    const scalar_t* go = grad_out + L.out_offset(b, h, i, w);
    const scalar_t* oi = out + L.out_offset(b, h, i, w);
    acc_t delta = 0;  // rowsum(dO * O): the softmax backward's correction
    for (int64_t d = 0; d < hd; ++d) {
      dO[i * hdp + d] = static_cast<acc_t>(go[d]);
      delta += dO[i * hdp + d] * static_cast<acc_t>(oi[d]);
    }
    t.delta[i] = delta;
    t.lse[i] = lse[L.lse_offset(b, h, w, i)];
  }
  for (int64_t j0 = 0; j0 < L.per_window; j0 += kKeyBlock) {
    const int64_t kb = std::min(kKeyBlock, L.per_window - j0), kbp = round_up(kb, lanes);
    load_keys<scalar_t, acc_t>(L, qkv, AttentionLayout::kKey, b, h, w, j0, kb, kbp, hdp, t.k.data(), t.kt.data());
    load_keys<scalar_t, acc_t>(L, qkv, AttentionLayout::kValue, b, h, w, j0, kb, kbp, hdp, nullptr, t.vt.data());
    t.dk.assign(kbp * hdp, acc_t(0));
    t.dv.assign(kbp * hdp, acc_t(0));
    for (int64_t i0 = 0; i0 < nq; i0 += kQueryBlock) {
      const int64_t mq = std::min(kQueryBlock, nq - i0);
      acc_t* p = t.s.data();
      acc_t* dp = t.dp.data();
      std::fill(p, p + mq * kbp, acc_t(0));
      std::fill(dp, dp + mq * kbp, acc_t(0));
      gemm_rows(mq, hd, kbp, q.data() + i0 * hdp, hdp, 1, t.kt.data(), kbp, p, kbp);
      gemm_rows(mq, hd, kbp, dO.data() + i0 * hdp, hdp, 1, t.vt.data(), kbp, dp, kbp);  // dp = dO . v^T
      for (int64_t i = 0; i < mq; ++i) {
        acc_t* pi = p + i * kbp;
        acc_t* dpi = dp + i * kbp;
        exp_row(pi, kbp, t.lse[i0 + i]);
        std::fill(pi + kb, pi + kbp, acc_t(0));
        const acc_t delta = t.delta[i0 + i];
        for (int64_t j = 0; j < kb; ++j) dpi[j] = pi[j] * (dpi[j] - delta);  // ds
      }
      // dv += p^T . dO ; dk += ds^T . q (q pre-scaled) ; dq += ds . k (scaled at the end)
      gemm_rows(kb, mq, hdp, p, 1, kbp, dO.data() + i0 * hdp, hdp, t.dv.data(), hdp);
      gemm_rows(kb, mq, hdp, dp, 1, kbp, q.data() + i0 * hdp, hdp, t.dk.data(), hdp);
      gemm_rows(mq, kb, hdp, dp, kbp, 1, t.k.data(), hdp, t.dq.data() + i0 * hdp, hdp);
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

AttentionLayout make_layout(const char* op, const at::Tensor& qkv, int64_t heads, int64_t q_stride,
                            int64_t windows) {
  TORCH_CHECK(qkv.dim() == 3, op, ": qkv must be [B, N, 3 * dim_out], got ", qkv.dim(), " dims");
  AttentionLayout L;
  L.batch = qkv.size(0);
  L.tokens = qkv.size(1);
  TORCH_CHECK(heads >= 1 && qkv.size(2) % (3 * heads) == 0, op, ": qkv width ", qkv.size(2),
              " is not divisible by 3 * heads = ", 3 * heads);
  TORCH_CHECK(q_stride >= 1 && q_stride <= kMaxPoolStride, op, ": q_stride must be in [1, ", kMaxPoolStride,
              "], got ", q_stride);
  TORCH_CHECK(windows >= 1 && L.tokens % (windows * q_stride) == 0, op, ": N=", L.tokens,
              " does not split into ", windows, " windows of a multiple of q_stride=", q_stride, " tokens");
  L.dim = qkv.size(2) / 3;
  L.heads = heads;
  L.head_dim = L.dim / heads;
  L.q_stride = q_stride;
  L.windows = windows;
  L.per_window = L.tokens / windows;
  L.queries = L.per_window / q_stride;
  return L;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_unit_attention_cpu(const at::Tensor& qkv_in, int64_t heads,
                                                                       int64_t q_stride, int64_t windows) {
  const AttentionLayout L = make_layout("hiera_kernels::mask_unit_attention", qkv_in, heads, q_stride, windows);
  const at::Tensor qkv = qkv_in.contiguous();
  at::Tensor out = at::empty({L.batch, L.queries * L.windows, L.dim}, qkv.options());
  // The log-sum-exp is kept in the accumulation type: float32, or float64 for float64.
  const auto lse_dtype = qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({L.batch, L.heads, L.windows, L.queries}, qkv.options().dtype(lse_dtype));
  at::Tensor argmax = q_stride > 1 ? at::empty({L.batch, L.queries * L.windows, L.dim}, qkv.options().dtype(at::kByte))
                                   : at::empty({0}, qkv.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, lse, argmax};
  const int64_t query_blocks = (L.queries + kQueryBlock - 1) / kQueryBlock;
  const int64_t block_rows = (L.queries + query_blocks - 1) / query_blocks;  // balanced blocks
  const int64_t tasks = L.batch * L.heads * L.windows * query_blocks;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "mask_unit_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      Tiles<acc_t> tiles(L, block_rows);
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
  const AttentionLayout L = make_layout(op, qkv_in, heads, q_stride, windows);
  const std::vector<int64_t> out_shape = {L.batch, L.queries * L.windows, L.dim};
  TORCH_CHECK(grad_out_in.sizes() == out_shape && out_in.sizes() == out_shape, op,
              ": grad_out and out must have shape ", out_shape);
  const auto lse_dtype = qkv_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse_in.scalar_type() == lse_dtype && lse_in.numel() == L.batch * L.heads * L.windows * L.queries,
              op, ": lse must be ", lse_dtype, " [B, heads, windows, queries]");
  TORCH_CHECK(q_stride == 1 || (argmax_in.sizes() == out_shape && argmax_in.scalar_type() == at::kByte), op,
              ": q_argmax must be uint8 of the output's shape");
  const at::Tensor qkv = qkv_in.contiguous(), grad_out = grad_out_in.contiguous().to(qkv.scalar_type());
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous(), argmax = argmax_in.contiguous();
  at::Tensor grad_qkv = at::empty_like(qkv);  // every element is written once
  if (grad_qkv.numel() == 0) return grad_qkv;
  const int64_t tasks = L.batch * L.heads * L.windows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "mask_unit_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      Tiles<acc_t> tiles(L, L.queries);
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
