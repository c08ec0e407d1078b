// The CPU kernels' inner loops, compiled once per CPU capability: kernels_<name>.cpp
// defines HK_CPU_CAPABILITY (a row of HIERA_KERNELS_CPU_CAPABILITIES), HK_CPU_TARGET
// (its GCC target, absent for the baseline build), the vector shape, and includes this
// file first, so that `#pragma GCC target` below applies to every function compiled in
// that translation unit, the headers' inline functions included. ninja (BuildExtension)
// has one set of flags for all sources, so the pragma, not -mavx2, sets the ISA.
//
// The hazard of compiling the same code for several ISAs into one library: an inline
// function or template with external linkage (std::vector's methods, an ATen helper, a
// shared header's inline function) instantiated here is emitted as a COMDAT copy, and
// the linker keeps ONE copy for every caller, so the AVX-512 copy could serve the AVX2
// build and fault on an AVX2 CPU. So, in this file:
// * everything is in an anonymous namespace inside hiera_kernels::cpu_<name>: internal
//   linkage, one private copy per build; the one external symbol is the table `kernels`;
// * no allocation, no std containers, no ATen: the entry points (compiled for baseline
//   x86-64) allocate, parallelise and pass raw pointers and workspace;
// * the shared index headers' functions are always_inline (HK_HOST_DEVICE), so no
//   copy of them is emitted at all.
// tests/test_cpu_dispatch.py disassembles the built library and fails if any function
// outside hiera_kernels::cpu_avx2 / cpu_avx512 holds a VEX or EVEX instruction.
//
// Mask-unit attention: one task is one (image, window, head) -- and, in the forward,
// one block of at most kQueryBlock pooled queries. It reads q, k and v straight out of
// the qkv Linear's output (attention_layout.h: no permute copies), max-pools q while
// loading it (a one-byte argmax per element for the backward), runs flash-style
// online-softmax attention over blocks of kKeyBlock keys in fp32 (so no score matrix
// larger than one block), and writes the output in token order for proj, with the
// float32 log-sum-exp the backward recomputes from. Operands are widened to tiles of
// the accumulation type (fp32; fp64 for float64 inputs) padded with zeros to whole
// vectors, and every product goes through one register-blocked micro-kernel, gemm_rows().

#if !defined(HK_CPU_CAPABILITY) || !defined(HK_VECTOR_BYTES) || !defined(HK_MAX_TILE_VECTORS) || \
    !defined(HK_CPU_F16C)
#error "kernels_<name>.cpp defines the build (HK_CPU_CAPABILITY, HK_VECTOR_BYTES, ...) before including kernels_impl.h"
#endif
#ifndef HK_CPU_BF16_DOT
#define HK_CPU_BF16_DOT 0  // bfloat16 attention products on AVX512-BF16 dot products (vdpbf16ps)
#endif

#if defined(HK_CPU_TARGET)
#if defined(__clang__) || !defined(__GNUC__)
#error "the CPU kernels choose each build's instruction set with #pragma GCC target: build with GCC"
#endif
#define HK_PRAGMA(x) _Pragma(#x)
#define HK_GCC_TARGET(t) HK_PRAGMA(GCC target(t))
HK_GCC_TARGET(HK_CPU_TARGET)
#else
#define HK_CPU_TARGET ""
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if HK_CPU_F16C || HK_CPU_BF16_DOT
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

#define HK_CONCAT_(a, b) a##b
#define HK_CONCAT(a, b) HK_CONCAT_(a, b)
#define HK_STRING_(a) #a
#define HK_STRING(a) HK_STRING_(a)

namespace hiera_kernels {
namespace HK_CONCAT(cpu_, HK_CPU_CAPABILITY) {
namespace {

// ------------------------------------------------------------------ the build's row
constexpr bool same_string(const char* a, const char* b) {
  return *a == *b && (*a == '\0' || same_string(a + 1, b + 1));
}
#define HK_THIS_ROW(name, level, target) \
  same_string(#name, HK_STRING(HK_CPU_CAPABILITY)) ? same_string(target, HK_CPU_TARGET):
static_assert(HIERA_KERNELS_CPU_CAPABILITIES(HK_THIS_ROW) false,
              "kernels_" HK_STRING(HK_CPU_CAPABILITY) ".cpp must compile for its row's GCC target in cpu_kernels.h");
#undef HK_THIS_ROW

// ------------------------------------------------------------------ element types
template <CpuDtype> struct DtypeOf;
template <> struct DtypeOf<CpuDtype::kFloat32> { using type = float; };
template <> struct DtypeOf<CpuDtype::kFloat64> { using type = double; };
template <> struct DtypeOf<CpuDtype::kFloat16> { using type = c10::Half; };
template <> struct DtypeOf<CpuDtype::kBFloat16> { using type = c10::BFloat16; };

// Accumulation type: float64 for float64, float32 otherwise (at::opmath_type's rule).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Calls f(scalar_t{}) for dtype.
template <typename F>
void by_dtype(CpuDtype dtype, F&& f) {
  switch (dtype) {
    case CpuDtype::kFloat32: return f(float{});
    case CpuDtype::kFloat64: return f(double{});
    case CpuDtype::kFloat16: return f(c10::Half{});
    case CpuDtype::kBFloat16: return f(c10::BFloat16{});
  }
}

// ------------------------------------------------------------------ unroll / reroll
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
// to_unrolled: out[b, n] = x[b, s(n)] (unroll, a gather).
// Otherwise:   out[b, s(n)] = x[b, n] (reroll, a scatter to distinct rows).
// One task moves the num_units tokens of one in-unit position t of one image: a
// contiguous run on the unrolled side, unit_offset(w) apart on the spatial side.
void permute_tokens(bool to_unrolled, const TokenGeometry& g, const int64_t* unit_base, const char* src, char* dst,
                    int64_t tokens, int64_t row_bytes, int64_t begin, int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / g.unit_size, t = task - b * g.unit_size;
    const int64_t unrolled = b * tokens + t * g.num_units;
    const int64_t spatial = b * tokens + in_unit_offset(g, t);
    for (int64_t w = 0; w < g.num_units; ++w) {
      const int64_t u = (unrolled + w) * row_bytes, s = (spatial + unit_base[w]) * row_bytes;
      if (to_unrolled) {
        copy_row(dst + u, src + s, row_bytes);
      } else {
        copy_row(dst + s, src + u, row_bytes);
      }
    }
  }
}

// ------------------------------------------------------------------ vectors
// The build's vector: HK_VECTOR_BYTES (one SSE, AVX2 or AVX-512 register) of T, and
// at most HK_MAX_TILE_VECTORS of them per micro-kernel row, so that a 6-row tile's
// accumulators, the B vectors and one broadcast fit the register file (16 xmm/ymm:
// 6 x 2 + 2 + 1; 32 zmm: 6 x 4 + 4 + 1).
constexpr int64_t kVectorBytes = HK_VECTOR_BYTES;
constexpr int kMaxTileVectors = HK_MAX_TILE_VECTORS;

// Loads and stores dereference the vector type itself (unaligned, may_alias) rather
// than memcpy: under the default tuning GCC expands a 32-byte memcpy as two 16-byte
// halves through the stack, and the reload of the whole vector then stalls on store
// forwarding (the AVX2 build ran attention 5-10x slower than the baseline build).
template <typename T>
struct Simd {
  static constexpr int64_t kLanes = kVectorBytes / sizeof(T);
  typedef T Vec __attribute__((vector_size(kVectorBytes), aligned(alignof(T)), may_alias));
  static Vec load(const T* p) { return *reinterpret_cast<const Vec*>(p); }
  static void store(T* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }
};
static_assert(kQueryBlock % Simd<float>::kLanes == 0, "query blocks must start on whole vectors");

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

using FloatVec = Simd<float>::Vec;
typedef uint32_t U32Vec __attribute__((vector_size(kVectorBytes), aligned(alignof(uint32_t)), may_alias));
// kLanes 16-bit words: a U32Vec narrowed (bfloat16 bits), half a register.
typedef uint16_t U16HalfVec __attribute__((vector_size(kVectorBytes / 2), aligned(alignof(uint16_t)), may_alias));
// One bfloat16 of a tile the products read as 32-bit pairs: may_alias, or GCC could
// order a 16-bit store after the 32-bit load of its pair (strict aliasing).
typedef uint16_t Bf16Word __attribute__((may_alias));

// fp32 lanes rounded to bfloat16 (to nearest even), the bf16 bits in each lane's upper
// half. A NaN is truncated, quiet bit set (rounding could carry it into an infinity or,
// for payloads from 0x7FFF8000 up, wrap it to zero).
inline U32Vec bf16_rounded(FloatVec x) {
  const U32Vec u = (U32Vec)x, nan = (U32Vec)(x != x);  // vector casts keep the bits
  const U32Vec rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  return (nan & ((u | 0x400000u) & 0xFFFF0000u)) | (~nan & rounded);
}

// The vector conversions of every bfloat16 path: kLanes bfloat16 bits, one per 32-bit lane
// (the low half); kLanes fp32 rounded to bfloat16 bits (bf16_rounded).
inline U32Vec widen_bits(const c10::BFloat16* p) {
  return __builtin_convertvector(*reinterpret_cast<const U16HalfVec*>(p), U32Vec);
}
inline U16HalfVec narrowed_bits(FloatVec v) { return __builtin_convertvector(bf16_rounded(v) >> 16, U16HalfVec); }

// The sum of a vector's lanes, pairwise in registers: the upper half added onto the
// lower, log2(kLanes) times (GCC extracts the halves; its _mm512_reduce_add_* and
// 512-bit extract intrinsics warn of their own undefined-register idiom).
template <typename T, int64_t kBytes>
inline T horizontal_sum_of(const void* v) {
  if constexpr (kBytes == 2 * static_cast<int64_t>(sizeof(T))) {
    T pair[2];
    std::memcpy(pair, v, kBytes);
    return pair[0] + pair[1];
  } else {
    typedef T Half __attribute__((vector_size(kBytes / 2)));
    Half lo, hi;
    std::memcpy(&lo, v, kBytes / 2);
    std::memcpy(&hi, static_cast<const char*>(v) + kBytes / 2, kBytes / 2);
    const Half sum = lo + hi;
    return horizontal_sum_of<T, kBytes / 2>(&sum);
  }
}

template <typename acc_t>
inline acc_t horizontal_sum(typename Simd<acc_t>::Vec v) {
  return horizontal_sum_of<acc_t, kVectorBytes>(&v);
}

// ------------------------------------------------------------------ pooling
// Widen n elements to the accumulation type. c10's scalar conversions do not vectorise,
// so bfloat16 is widened in whole vectors (its bits shifted into a float's upper half)
// and fp16 through F16C where the build has it.
template <typename scalar_t, typename acc_t>
inline void load_as_acc(const scalar_t* src, acc_t* dst, int64_t n) {
  int64_t k = 0;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    using S = Simd<float>;
    for (; k + S::kLanes <= n; k += S::kLanes) {
      S::store(dst + k, (FloatVec)(widen_bits(src + k) << 16));
    }
  }
#if HK_CPU_F16C
  if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    for (; k + 8 <= n; k += 8) {
      const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
      _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(half));
    }
  }
#endif
  for (; k < n; ++k) dst[k] = static_cast<acc_t>(src[k]);
}

// Narrow n accumulation-type values to scalar_t (round to nearest even); bfloat16 in
// whole vectors (c10's scalar conversion does not vectorise), fp16 through F16C.
template <typename scalar_t, typename acc_t>
inline void store_from_acc(const acc_t* src, scalar_t* dst, int64_t n) {
  int64_t k = 0;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    using S = Simd<float>;
    for (; k + S::kLanes <= n; k += S::kLanes) {
      *reinterpret_cast<U16HalfVec*>(dst + k) = narrowed_bits(S::load(src + k));
    }
  }
#if HK_CPU_F16C
  if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    for (; k + 8 <= n; k += 8) {
      const __m128i half = _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), half);
    }
  }
#endif
  for (; k < n; ++k) dst[k] = static_cast<scalar_t>(src[k]);
}

constexpr int64_t kPoolRowBlock = 256;  // elements per call: the accumulators stay in L1

// The max over rows, shared by query_pool and both attentions: best[k] = max over s <
// rows of row(s)[k], arg[k] = that s, for k < n <= kPoolRowBlock, by the rule `takes`
// (pool_takes: PyTorch's max(dim), first maximum wins ties, first NaN wins; SAM 2's
// max_pool2d_takes: the last NaN wins), passed as a lambda so that it inlines (a
// function pointer would also emit an out-of-line copy, see the top of this file).
// Block-local buffers keep the loop vectorisable (stores through uint8_t* may alias
// anything).
template <typename scalar_t, typename acc_t, typename RowAt, typename Takes>
inline void max_over_rows(RowAt row, int64_t rows, int64_t n, acc_t* best, uint8_t* arg, Takes takes) {
  acc_t value[kPoolRowBlock];
  uint8_t best_s[kPoolRowBlock];
  load_as_acc<scalar_t>(row(0), best, n);
  std::memset(best_s, 0, n);
  for (int64_t s = 1; s < rows; ++s) {
    load_as_acc<scalar_t>(row(s), value, n);
    for (int64_t k = 0; k < n; ++k) {
      const bool take = takes(value[k], best[k]);
      best[k] = take ? value[k] : best[k];
      best_s[k] = take ? static_cast<uint8_t>(s) : best_s[k];
    }
  }
  std::memcpy(arg, best_s, n);
}

// In [B, N, C] with N = stride * No, the stride slices of one image are `stride`
// contiguous slabs of No * C elements, so pooling is an elementwise max across
// slabs: a branch-free loop the compiler vectorises.
template <typename scalar_t>
void query_pool_typed(const scalar_t* src, scalar_t* dst, uint8_t* arg, int64_t stride, int64_t slab, int64_t begin,
                      int64_t end) {
  using acc_t = acc_type<scalar_t>;
  while (begin < end) {  // split [begin, end) at image boundaries
    const int64_t b = begin / slab, j0 = begin - b * slab;
    const int64_t j1 = std::min(slab, j0 + (end - begin));
    const scalar_t* in = src + b * stride * slab;
    for (int64_t k0 = j0; k0 < j1; k0 += kPoolRowBlock) {
      const int64_t n = std::min(kPoolRowBlock, j1 - k0);
      acc_t best[kPoolRowBlock];
      max_over_rows<scalar_t>([&](int64_t s) { return in + k0 + s * slab; }, stride, n, best, arg + b * slab + k0,
                              [](acc_t c, acc_t best) { return pool_takes(c, best); });
      store_from_acc(best, dst + b * slab + k0, n);
    }
    begin += j1 - j0;
  }
}

void query_pool(CpuDtype dtype, const void* x, void* out, uint8_t* argmax, int64_t stride, int64_t slab,
                int64_t begin, int64_t end) {
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    query_pool_typed(static_cast<const scalar_t*>(x), static_cast<scalar_t*>(out), argmax, stride, slab, begin, end);
  });
}

// A selection, not arithmetic: move raw bits (all-zero bits are +0.0 in every float
// format), so one loop per element size serves every dtype and vectorises.
template <typename bits_t>
void query_pool_backward_bits(const bits_t* src, const uint8_t* arg, bits_t* dst, int64_t stride, int64_t slab,
                              int64_t begin, int64_t end) {
  while (begin < end) {
    const int64_t b = begin / slab, j0 = begin - b * slab;
    const int64_t j1 = std::min(slab, j0 + (end - begin));
    const bits_t* __restrict__ go = src + b * slab;
    const uint8_t* __restrict__ ar = arg + b * slab;
    for (int64_t s = 0; s < stride; ++s) {  // every input element written once: no zero fill
      bits_t* __restrict__ gi_s = dst + b * stride * slab + s * slab;
      const uint8_t tag = static_cast<uint8_t>(s);
      for (int64_t j = j0; j < j1; ++j) gi_s[j] = ar[j] == tag ? go[j] : bits_t(0);
    }
    begin += j1 - j0;
  }
}

void query_pool_backward(int64_t element_size, const void* grad_out, const uint8_t* argmax, void* grad_in,
                         int64_t stride, int64_t slab, int64_t begin, int64_t end) {
  auto run = [&](auto bits_tag) {
    using bits_t = decltype(bits_tag);
    query_pool_backward_bits(static_cast<const bits_t*>(grad_out), argmax, static_cast<bits_t*>(grad_in), stride,
                             slab, begin, end);
  };
  switch (element_size) {  // the entry point admits only 2-, 4- and 8-byte float dtypes
    case 2: return run(uint16_t{});
    case 4: return run(uint32_t{});
    default: return run(uint64_t{});
  }
}

// ------------------------------------------------------------------ attention
// How a micro-kernel multiplies: C (Acc vectors) += A element (broadcast) x B vector,
// one k step at a time. FmaProduct: T x T in T (fp32 FMAs; fp64 for float64).
template <typename T>
struct FmaProduct {
  using A = T;     // one element of A
  using B = T;     // B's element: a vector of B is Simd<T>::kLanes of them
  using Acc = T;   // C's element
  using BVec = typename Simd<T>::Vec;
  static BVec load_b(const B* p) { return Simd<T>::load(p); }
  static typename Simd<T>::Vec madd(typename Simd<T>::Vec acc, A a, BVec b) { return acc + a * b; }
};

#if HK_CPU_BF16_DOT
// Bf16PairProduct: bfloat16 on AVX512-BF16 dot products, fp32 accumulation. A k step is a
// PAIR of bfloat16 (k = 2p, 2p + 1) packed in 32 bits: A(m, p) holds (A[m, 2p], A[m, 2p + 1])
// and B's row p holds, per fp32 lane n, (B[2p, n], B[2p + 1, n]) (the "VNNI" layout), so
// one vdpbf16ps adds A[m, 2p] B[2p, n] + A[m, 2p + 1] B[2p + 1, n] to 16 fp32 lanes: twice
// the multiply-adds of an fp32 FMA.
struct Bf16PairProduct {
  using A = uint32_t;
  using B = uint32_t;
  using Acc = float;
  using BVec = __m512bh;
  static_assert(kVectorBytes == 64, "the bf16 dot build has 16 fp32 lanes a vector");
  // GCC's builtin with vector casts, not the _mm512_dpbf16_ps wrapper nor reinterpret_cast
  // through references: with those, GCC 12 keeps part of gemm_tile's accumulators on the
  // stack, a store after every vdpbf16ps, and the bf16 products ran no faster than fp32.
  static BVec load_b(const B* p) { return (BVec)_mm512_loadu_si512(p); }
  static Simd<float>::Vec madd(Simd<float>::Vec acc, A a, BVec b) {
    return (Simd<float>::Vec)__builtin_ia32_dpbf16ps_v16sf((__m512)acc, (BVec)_mm512_set1_epi32(a), b);
  }
};
#endif

// bfloat16 attention multiplies on the dot products where the build has them
// (BF16Forward, BF16Backward, defined only there); every other dtype, and bfloat16 in
// the other builds, is widened to its accumulation type (WidenedForward, WidenedBackward).
template <typename scalar_t>
constexpr bool kBf16Dot = HK_CPU_BF16_DOT && std::is_same_v<scalar_t, c10::BFloat16>;
template <typename acc_t>
struct BF16Forward;
template <typename acc_t>
struct BF16Backward;

// C[m, n] += sum_k A(m, k) * B[k, n] for a tile of MR rows and NV vectors of
// columns, accumulated in registers. A(m, k) = a[m * a_row + k * a_col], so a
// transposed A costs nothing.
template <typename P, int MR, int NV>
void gemm_tile(int64_t K, const typename P::A* a, int64_t a_row, int64_t a_col, const typename P::B* b, int64_t ldb,
               typename P::Acc* c, int64_t ldc, bool accumulate) {
  using S = Simd<typename P::Acc>;
  typename S::Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? S::load(c + r * ldc + v * S::kLanes) : typename S::Vec{};
  for (int64_t k = 0; k < K; ++k) {
    typename P::BVec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = P::load_b(b + k * ldb + v * S::kLanes);
    for (int r = 0; r < MR; ++r) {
      const typename P::A av = a[r * a_row + k * a_col];
      for (int v = 0; v < NV; ++v) acc[r][v] = P::madd(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) S::store(c + r * ldc + v * S::kLanes, acc[r][v]);
}

template <typename P, int MR>
void gemm_row_tile(int64_t K, int64_t nv, const typename P::A* a, int64_t a_row, int64_t a_col,
                   const typename P::B* b, int64_t ldb, typename P::Acc* c, int64_t ldc, bool accumulate) {
  if constexpr (kMaxTileVectors >= 4) {
    if (nv >= 4) return gemm_tile<P, MR, 4>(K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
    if (nv == 3) return gemm_tile<P, MR, 3>(K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  }
  if (nv >= 2) return gemm_tile<P, MR, 2>(K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  return gemm_tile<P, MR, 1>(K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

// C[M, N] (+)= A(M, K) . B[K, N], N a whole number of vectors, row-major; without
// accumulate, C is overwritten (so it needs no zero fill). P: how elements multiply.
template <typename P>
void gemm_rows_with(int64_t M, int64_t K, int64_t N, const typename P::A* a, int64_t a_row, int64_t a_col,
                    const typename P::B* b, int64_t ldb, typename P::Acc* c, int64_t ldc, bool accumulate) {
  constexpr int64_t lanes = Simd<typename P::Acc>::kLanes;
  for (int64_t n0 = 0; n0 < N; n0 += kMaxTileVectors * lanes) {
    const int64_t nv = std::min<int64_t>(kMaxTileVectors, (N - n0) / lanes);
    int64_t m0 = 0;
    for (; m0 + 6 <= M; m0 += 6)
      gemm_row_tile<P, 6>(K, nv, a + m0 * a_row, a_row, a_col, b + n0, ldb, c + m0 * ldc + n0, ldc, accumulate);
    for (; m0 + 4 <= M; m0 += 4)
      gemm_row_tile<P, 4>(K, nv, a + m0 * a_row, a_row, a_col, b + n0, ldb, c + m0 * ldc + n0, ldc, accumulate);
    for (; m0 < M; ++m0)
      gemm_row_tile<P, 1>(K, nv, a + m0 * a_row, a_row, a_col, b + n0, ldb, c + m0 * ldc + n0, ldc, accumulate);
  }
}

template <typename T>
void gemm_rows(int64_t M, int64_t K, int64_t N, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
               T* c, int64_t ldc, bool accumulate = true) {
  gemm_rows_with<FmaProduct<T>>(M, K, N, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

typedef int32_t IntVec __attribute__((vector_size(kVectorBytes)));

// exp(x) lane by lane: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6
// polynomial (~1 ulp), 2^n by the exponent bits. Inputs below -87.3 give ~1e-38
// instead of a denormal or 0; NaN stays NaN. (glibc's vector expf would need
// -ffast-math, which would also break the NaN rules of the pooling.)
inline FloatVec exp_vec(FloatVec x) {
  const FloatVec lo = FloatVec{} - 87.3f, hi = FloatVec{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const FloatVec n = (x * 1.44269504f + magic) - magic;
  const FloatVec r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 split in two
  FloatVec p = FloatVec{} + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const IntVec bits = (__builtin_convertvector(n, IntVec) + 127) << 23;
  return p * reinterpret_cast<const FloatVec&>(bits);  // 2^n: the exponent bits as a float
}

// exp of every lane of a float64 vector: libm (gradcheck).
inline Simd<double>::Vec exp_vec(Simd<double>::Vec x) {
  for (int64_t l = 0; l < Simd<double>::kLanes; ++l) x[l] = std::exp(x[l]);
  return x;
}

template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

// The two attentions run the kernels below, which take the layout as a template
// argument: mask-unit attention (AttentionLayout: windows of unrolled tokens) and SAM 2's
// window attention (WindowLayout: windows of the spatial map, padded with `pad`, the
// output cropped). Their shared interface (key_offset, candidate_offset,
// candidate_count, out_offset, lse_offset) is where they differ: key_offset -1 is a
// padded key, whose q, k and v are pad's; out_offset -1 a query the crop drops: it is
// computed (its lse is saved) but neither stored nor given gradient.
constexpr int kQueryPart = 0, kKeyPart = 1, kValuePart = 2;  // [which] in qkv's features

// Where (which, h) of the qkv row at `offset` starts: in qkv, or in pad for padding.
template <typename scalar_t>
inline const scalar_t* row_or_pad(const scalar_t* qkv, const scalar_t* pad, int64_t offset, int which, int64_t dim,
                                  int64_t h, int64_t head_dim) {
  return offset >= 0 ? qkv + offset : pad + which * dim + h * head_dim;
}

// Rows [j0, j0 + n) of k or v (which) of (b, h, w), widened into rows [n, hd_pad],
// zero-padded: contiguous copies, no transposes.
template <typename scalar_t, typename acc_t, typename Layout>
void load_rows(const Layout& L, const scalar_t* qkv, const scalar_t* pad, int which, int64_t b, int64_t h, int64_t w,
               int64_t j0, int64_t n, int64_t hd_pad, acc_t* rows) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* src =
        row_or_pad(qkv, pad, L.key_offset(b, which, h, j0 + j, w), which, L.dim, h, L.head_dim);
    acc_t* dst = rows + j * hd_pad;
    load_as_acc(src, dst, L.head_dim);
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
// forward takes the max by the layout's rule (Layout::pool_takes: first max wins ties;
// Hiera's max(dim) keeps the first NaN, SAM 2's MaxPool2d the last) and records its
// argmax; the backward re-reads the recorded argmax.
// kPool: take the max and write argmax_out; otherwise gather the rows argmax_in names
// (a query the crop drops stays 0: the backward gives it no gradient).
template <typename scalar_t, bool kPool, typename acc_t, typename Layout>
void load_queries(const Layout& L, const scalar_t* qkv, const scalar_t* pad, const uint8_t* argmax_in,
                  uint8_t* argmax_out, int64_t b, int64_t h, int64_t w, int64_t i0, int64_t mq, int64_t hd_pad,
                  acc_t* q) {
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(L.head_dim));
  const int64_t count = L.candidate_count();
  std::fill(q, q + mq * hd_pad, acc_t(0));
  const scalar_t* candidate[kMaxPoolStride];
  for (int64_t i = 0; i < mq; ++i) {
    acc_t* qi = q + i * hd_pad;
    const int64_t arg_offset = L.out_offset(b, h, i0 + i, w);
    if (!kPool && arg_offset < 0) continue;
    for (int64_t c = 0; c < count; ++c)
      candidate[c] = row_or_pad(qkv, pad, L.candidate_offset(b, h, i0 + i, w, c), kQueryPart, L.dim, h, L.head_dim);
    if (count == 1) {
      for (int64_t d = 0; d < L.head_dim; ++d) qi[d] = static_cast<acc_t>(candidate[0][d]) * scale;
      continue;
    }
    if constexpr (kPool) {
      uint8_t dropped[kPoolRowBlock];  // the argmax of a query the crop drops
      for (int64_t d0 = 0; d0 < L.head_dim; d0 += kPoolRowBlock) {
        const int64_t n = std::min(kPoolRowBlock, L.head_dim - d0);
        max_over_rows<scalar_t>([&](int64_t c) { return candidate[c] + d0; }, count, n, qi + d0,
                                arg_offset >= 0 ? argmax_out + arg_offset + d0 : dropped,
                                [](acc_t c, acc_t best) { return Layout::pool_takes(c, best); });
      }
      for (int64_t d = 0; d < L.head_dim; ++d) qi[d] *= scale;
    } else {
      for (int64_t d = 0; d < L.head_dim; ++d)
        qi[d] = static_cast<acc_t>(candidate[argmax_in[arg_offset + d]][d]) * scale;
    }
  }
}

// Carves consecutive tiles of acc_t out of a workspace; with workspace == nullptr it
// only counts, so the entry point learns the size from the same code that uses it.
template <typename acc_t>
struct Carver {
  acc_t* workspace;
  int64_t used = 0;
  acc_t* take(int64_t n) {
    acc_t* tile = workspace == nullptr ? nullptr : workspace + used;
    used += n;
    return tile;
  }
};

// The products run in transposed space: scores^T [keys, queries] = K . Q^T, so K and
// V are plain row copies, only the (small) query block is transposed, and the
// softmax over keys is a reduction down columns: vectorised across queries.
template <typename acc_t>
struct ForwardTiles {
  int64_t hd_pad, q_pad, elements;
  acc_t *q_rows, *q_cols, *o, *k_rows, *v_rows, *scores, *col_max, *col_sum, *rescale, *p_pairs;
  template <typename Layout>
  ForwardTiles(const Layout& L, int64_t queries, acc_t* workspace) {
    constexpr int64_t lanes = Simd<acc_t>::kLanes;
    hd_pad = round_up(L.head_dim, lanes);
    q_pad = round_up(queries, lanes);
    const int64_t kb = std::min(kKeyBlock, L.per_window);
    Carver<acc_t> ws{workspace};
    q_rows = ws.take(queries * hd_pad);
    q_cols = ws.take(L.head_dim * q_pad);
    o = ws.take(queries * hd_pad);
    k_rows = ws.take(kb * hd_pad);
    v_rows = ws.take(kb * hd_pad);
    scores = ws.take(kb * q_pad);
    col_max = ws.take(q_pad);
    col_sum = ws.take(q_pad);
    rescale = ws.take(q_pad);
    p_pairs = ws.take((kb + 1) / 2 * q_pad);  // the bf16 dot path's P (BF16Forward)
    elements = ws.used;
  }
};

// The forward's two products, scores^T = K . Q^T and o += P . V, in the accumulation
// type: K and V widened into t.k_rows / t.v_rows, Q^T in t.q_cols.
template <typename scalar_t, typename acc_t>
struct WidenedForward {
  template <typename Layout>
  static void prepare_queries(const Layout& L, int64_t mq, int64_t mqp, ForwardTiles<acc_t>& t) {
    transpose_rows(t.q_rows, mq, L.head_dim, t.hd_pad, t.q_cols, mqp);
  }
  template <typename Layout>
  static void scores(const Layout& L, const scalar_t* qkv, const scalar_t* pad, int64_t b, int64_t h, int64_t w,
                     int64_t j0, int64_t kb, int64_t mqp, ForwardTiles<acc_t>& t) {
    const int64_t hdp = t.hd_pad;
    load_rows(L, qkv, pad, kKeyPart, b, h, w, j0, kb, hdp, t.k_rows);
    load_rows(L, qkv, pad, kValuePart, b, h, w, j0, kb, hdp, t.v_rows);
    gemm_rows(kb, L.head_dim, mqp, t.k_rows, hdp, 1, t.q_cols, mqp, t.scores, mqp, false);
  }
  static void add_pv(int64_t mq, int64_t kb, int64_t mqp, ForwardTiles<acc_t>& t) {
    gemm_rows(mq, kb, t.hd_pad, t.scores, 1, mqp, t.v_rows, t.hd_pad, t.o, t.hd_pad);
  }
};

#if HK_CPU_BF16_DOT
// ---- the bfloat16 dot path's operands: pairs of bfloat16 in 32-bit words
// (Bf16PairProduct), the first of a pair in the low half; an odd count pads its last
// pair with a zero. Copies of bf16 inputs are exact; fp32 tiles are rounded to nearest.
using bf16 = c10::BFloat16;
inline uint32_t* as_pairs(float* tile) { return reinterpret_cast<uint32_t*>(tile); }
inline U16HalfVec rounded_bits(const float* p) { return narrowed_bits(Simd<float>::load(p)); }

// Rows [j0, j0 + n) of k or v (which) of (b, h, w), pairs along the head dim (an A
// operand): [n, hd_pairs], a plain copy.
template <typename Layout>
void copy_row_pairs(const Layout& L, const bf16* qkv, const bf16* pad, int which, int64_t b, int64_t h, int64_t w,
                    int64_t j0, int64_t n, uint32_t* rows) {
  const int64_t hd = L.head_dim, hd_pairs = (hd + 1) / 2;
  Bf16Word* words = reinterpret_cast<Bf16Word*>(rows);
  for (int64_t j = 0; j < n; ++j) {
    const bf16* src = row_or_pad(qkv, pad, L.key_offset(b, which, h, j0 + j, w), which, L.dim, h, hd);
    std::memcpy(words + j * 2 * hd_pairs, src, hd * sizeof(bf16));
    if (hd % 2) words[j * 2 * hd_pairs + hd] = 0;
  }
}

// The same rows in pairs of rows (a B operand, the "VNNI" layout): [(n + 1) / 2, hd_pad],
// lane d of pair p = (row 2p [d], row 2p + 1 [d]), lanes from the head dim on 0.
template <typename Layout>
void interleave_row_pairs(const Layout& L, const bf16* qkv, const bf16* pad, int which, int64_t b, int64_t h,
                          int64_t w, int64_t j0, int64_t n, int64_t hd_pad, uint32_t* pairs) {
  constexpr int64_t lanes = Simd<float>::kLanes;
  const int64_t hd = L.head_dim;
  for (int64_t p = 0; p < (n + 1) / 2; ++p) {
    const bf16* lo = row_or_pad(qkv, pad, L.key_offset(b, which, h, j0 + 2 * p, w), which, L.dim, h, hd);
    const bf16* hi = 2 * p + 1 < n ? row_or_pad(qkv, pad, L.key_offset(b, which, h, j0 + 2 * p + 1, w), which, L.dim,
                                                h, hd)
                                   : nullptr;
    uint32_t* dst = pairs + p * hd_pad;
    int64_t d = 0;
    for (; d + lanes <= hd; d += lanes)
      *reinterpret_cast<U32Vec*>(dst + d) = widen_bits(lo + d) | (hi != nullptr ? widen_bits(hi + d) << 16 : U32Vec{});
    for (; d < hd; ++d) dst[d] = lo[d].x | (hi != nullptr ? uint32_t(hi[d].x) << 16 : 0u);
    std::fill(dst + hd, dst + hd_pad, 0u);
  }
}

// fp32 rows [n, ld] in pairs of rows (a B operand, or an A operand read down columns):
// out [(n + 1) / 2, ld_out], lane c of pair p = (row 2p [c], row 2p + 1 [c]) for c <
// width, a whole number of vectors.
inline void pack_row_pairs(const float* rows, int64_t n, int64_t ld, int64_t width, uint32_t* out, int64_t ld_out) {
  using S = Simd<float>;
  for (int64_t p = 0; p < (n + 1) / 2; ++p)
    for (int64_t c = 0; c < width; c += S::kLanes) {
      const U32Vec lo = bf16_rounded(S::load(rows + 2 * p * ld + c)) >> 16;
      const U32Vec hi = 2 * p + 1 < n ? bf16_rounded(S::load(rows + (2 * p + 1) * ld + c)) : U32Vec{};
      *reinterpret_cast<U32Vec*>(out + p * ld_out + c) = lo | hi;
    }
}

// fp32 rows [n, ld] in pairs of columns (an A operand): out [n, width / 2] pairs, width
// a whole number of vectors. Products read the pairs up to the one holding column
// valid - 1, so an odd valid's partner column is set to 0 (it may hold padding's 1s).
inline void pack_column_pairs(const float* rows, int64_t n, int64_t ld, int64_t width, int64_t valid, uint32_t* out) {
  Bf16Word* words = reinterpret_cast<Bf16Word*>(out);
  for (int64_t r = 0; r < n; ++r) {
    Bf16Word* dst = words + r * width;
    for (int64_t c = 0; c < width; c += Simd<float>::kLanes)
      *reinterpret_cast<U16HalfVec*>(dst + c) = rounded_bits(rows + r * ld + c);
    if (valid % 2) dst[valid] = 0;
  }
}

// fp32 rows [n, ld] (0 from hd to ld, ld a whole number of vectors) transposed into
// columns of head-dim pairs (a B operand): cols [hd_pairs, n_pad], lane i of pair p =
// (row i [2p], row i [2p + 1]), lanes from n on 0.
inline void transpose_to_pairs(const float* rows, int64_t n, int64_t hd, int64_t ld, uint32_t* cols, int64_t n_pad) {
  constexpr int64_t lanes = Simd<float>::kLanes;
  const int64_t hd_pairs = (hd + 1) / 2;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < ld; c += lanes) {
      const U16HalfVec words = rounded_bits(rows + i * ld + c);  // pairs c / 2 .. c / 2 + lanes / 2
      uint32_t pair[lanes / 2];
      std::memcpy(pair, &words, sizeof pair);
      for (int64_t k = 0; k < lanes / 2 && c / 2 + k < hd_pairs; ++k) cols[(c / 2 + k) * n_pad + i] = pair[k];
    }
  for (int64_t p = 0; p < hd_pairs; ++p) std::fill(cols + p * n_pad + n, cols + (p + 1) * n_pad, 0u);
}

// The forward's products for bfloat16 on AVX512-BF16, keeping the fp32 online softmax
// between them: scores^T = K . Q^T with K's rows copied as pairs along the head dim
// (t.k_rows) and Q^T rounded to pairs along the head dim per query lane (t.q_cols); o +=
// P . V with P rounded to key pairs per query lane (t.p_pairs) and V interleaved in key
// pairs (t.v_rows). Rounding Q and P to bf16 is what a bf16 flash attention does on any
// matrix unit.
template <typename acc_t>
struct BF16Forward {
  template <typename Layout>
  static void prepare_queries(const Layout& L, int64_t mq, int64_t mqp, ForwardTiles<acc_t>& t) {
    transpose_to_pairs(t.q_rows, mq, L.head_dim, t.hd_pad, as_pairs(t.q_cols), mqp);
  }
  template <typename Layout>
  static void scores(const Layout& L, const bf16* qkv, const bf16* pad, int64_t b, int64_t h, int64_t w, int64_t j0,
                     int64_t kb, int64_t mqp, ForwardTiles<acc_t>& t) {
    const int64_t hd_pairs = (L.head_dim + 1) / 2;
    copy_row_pairs(L, qkv, pad, kKeyPart, b, h, w, j0, kb, as_pairs(t.k_rows));
    interleave_row_pairs(L, qkv, pad, kValuePart, b, h, w, j0, kb, t.hd_pad, as_pairs(t.v_rows));
    gemm_rows_with<Bf16PairProduct>(kb, hd_pairs, mqp, as_pairs(t.k_rows), hd_pairs, 1, as_pairs(t.q_cols), mqp,
                                    t.scores, mqp, false);
  }
  static void add_pv(int64_t mq, int64_t kb, int64_t mqp, ForwardTiles<acc_t>& t) {
    pack_row_pairs(t.scores, kb, mqp, mqp, as_pairs(t.p_pairs), mqp);
    gemm_rows_with<Bf16PairProduct>(mq, (kb + 1) / 2, t.hd_pad, as_pairs(t.p_pairs), 1, mqp, as_pairs(t.v_rows),
                                    t.hd_pad, t.o, t.hd_pad, true);
  }
};
#endif

template <typename scalar_t, typename acc_t>
using ForwardProducts =
    std::conditional_t<kBf16Dot<scalar_t>, BF16Forward<acc_t>, WidenedForward<scalar_t, acc_t>>;

template <typename scalar_t, typename acc_t, typename Layout>
void forward_task(const Layout& L, const scalar_t* qkv, const scalar_t* pad, scalar_t* out, acc_t* lse,
                  uint8_t* argmax, int64_t b, int64_t h, int64_t w, int64_t i0, int64_t mq, ForwardTiles<acc_t>& t) {
  using S = Simd<acc_t>;
  using Vec = typename S::Vec;
  const int64_t hd = L.head_dim, hdp = t.hd_pad, mqp = round_up(mq, S::kLanes);
  using Products = ForwardProducts<scalar_t, acc_t>;
  load_queries<scalar_t, true, acc_t>(L, qkv, pad, nullptr, argmax, b, h, w, i0, mq, hdp, t.q_rows);
  Products::prepare_queries(L, mq, mqp, t);
  std::fill(t.o, t.o + mq * hdp, acc_t(0));
  std::fill(t.col_max, t.col_max + mqp, -std::numeric_limits<acc_t>::infinity());
  std::fill(t.col_sum, t.col_sum + mqp, acc_t(0));
  acc_t* st = t.scores;
  for (int64_t j0 = 0; j0 < L.per_window; j0 += kKeyBlock) {
    const int64_t kb = std::min(kKeyBlock, L.per_window - j0);
    Products::scores(L, qkv, pad, b, h, w, j0, kb, mqp, t);  // scores^T [kb, mqp] in st
    for (int64_t c = 0; c < mqp; c += S::kLanes) {  // online softmax, S::kLanes queries at a time
      Vec block_max = S::load(st + c);
      for (int64_t j = 1; j < kb; ++j) block_max = vmax(block_max, S::load(st + j * mqp + c));
      const Vec old_max = S::load(t.col_max + c);
      const Vec new_max = vmax(old_max, block_max);
      Vec sum = Vec{};
      for (int64_t j = 0; j < kb; ++j) {
        const Vec p = exp_vec(S::load(st + j * mqp + c) - new_max);
        S::store(st + j * mqp + c, p);
        sum += p;
      }
      const Vec rescale = exp_vec(old_max - new_max);  // 0 (or ~1e-38) on the first block
      S::store(t.col_sum + c, S::load(t.col_sum + c) * rescale + sum);
      S::store(t.col_max + c, new_max);
      S::store(t.rescale + c, rescale);
    }
    if (j0 > 0)
      for (int64_t i = 0; i < mq; ++i)
        for (int64_t d = 0; d < hdp; ++d) t.o[i * hdp + d] *= t.rescale[i];
    Products::add_pv(mq, kb, mqp, t);  // o += p . v
  }
  for (int64_t i = 0; i < mq; ++i) {
    lse[L.lse_offset(b, h, w, i0 + i)] = t.col_max[i] + std::log(t.col_sum[i]);
    const int64_t out_offset = L.out_offset(b, h, i0 + i, w);
    if (out_offset < 0) continue;  // cropped
    const acc_t inv = acc_t(1) / t.col_sum[i];
    acc_t* row = t.o + i * hdp;
    for (int64_t d = 0; d < hd; ++d) row[d] *= inv;
    store_from_acc(row, out + out_offset, hd);  // vector rounding (c10's scalar one does not vectorise)
  }
}

template <typename Layout>
int64_t attention_forward_workspace(CpuDtype dtype, const Layout& L, int64_t block_rows) {
  int64_t bytes = 0;
  by_dtype(dtype, [&](auto tag) {
    using acc_t = acc_type<decltype(tag)>;
    bytes = ForwardTiles<acc_t>(L, block_rows, nullptr).elements * static_cast<int64_t>(sizeof(acc_t));
  });
  return bytes;
}

// A forward task: (b, h, w) and its block of queries [i0, i0 + mq).
struct ForwardTask {
  int64_t b, h, w, i0, mq;
};
// Task `task` of (b, h, w, query block), block fastest, then w, then h.
template <typename Layout>
ForwardTask forward_task_at(const Layout& L, int64_t block_rows, int64_t task) {
  const int64_t query_blocks = (L.queries + block_rows - 1) / block_rows;
  const int64_t block = task % query_blocks;
  task /= query_blocks;
  const int64_t w = task % L.windows;
  task /= L.windows;
  const int64_t i0 = block * block_rows;
  return {task / L.heads, task % L.heads, w, i0, std::min(block_rows, L.queries - i0)};
}

// Requests the cache line at p from memory, without waiting for it. An asm statement:
// GCC counts __builtin_prefetch as free of side effects, so it drops a call to a
// function that only prefetches (prefetch_forward_rows) as dead code.
inline void prefetch_line(const char* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p);
#endif
}

// Requests the n elements at row from memory.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = n * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t offset = 0; offset < size; offset += 64) prefetch_line(bytes + offset);
  prefetch_line(bytes + size - 1);
}

// In `rows` (qkv, or its gradient), the q candidates of query i of window (b, h, w), and
// the window's k and v rows; a padded one (offset -1) is pad's, already in cache.
template <typename scalar_t, typename Layout>
void prefetch_candidate_rows(const Layout& L, const scalar_t* rows, int64_t b, int64_t h, int64_t i, int64_t w) {
  for (int64_t c = 0; c < L.candidate_count(); ++c) {
    const int64_t offset = L.candidate_offset(b, h, i, w, c);
    if (offset >= 0) prefetch_row(rows + offset, L.head_dim);
  }
}
template <typename scalar_t, typename Layout>
void prefetch_key_rows(const Layout& L, const scalar_t* rows, int64_t b, int64_t h, int64_t w) {
  for (int64_t j = 0; j < L.per_window; ++j)
    for (const int which : {kKeyPart, kValuePart}) {
      const int64_t offset = L.key_offset(b, which, h, j, w);
      if (offset >= 0) prefetch_row(rows + offset, L.head_dim);
    }
}

// The rows a forward task reads and writes (its queries' candidates in qkv and their
// rows of out; with_keys, its window's k and v), requested while the task before it
// computes: a window's rows are `windows` tokens apart in the unrolled layout (a page
// or more), a stride the hardware prefetchers do not follow, so every row would
// otherwise wait for memory in turn.
template <typename scalar_t, typename Layout>
void prefetch_forward_rows(const Layout& L, const scalar_t* qkv, const scalar_t* out, const ForwardTask& t,
                           bool with_keys) {
  for (int64_t i = t.i0; i < t.i0 + t.mq; ++i) {
    prefetch_candidate_rows(L, qkv, t.b, t.h, i, t.w);
    const int64_t out_offset = L.out_offset(t.b, t.h, i, t.w);
    if (out_offset >= 0) prefetch_row(out + out_offset, L.head_dim);
  }
  if (with_keys) prefetch_key_rows(L, qkv, t.b, t.h, t.w);
}

// Whether a task prefetches the next one's rows: only for windows whose keys fit one key
// block (mask units, SAM 2's local windows); a longer window's next task is far off, and
// its rows would push this task's tiles out of the cache.
template <typename Layout>
bool prefetches(const Layout& L) {
  return L.per_window <= kKeyBlock;
}

// Tasks [begin, end) (forward_task_at's order), each prefetching the next one's rows.
template <typename Layout>
void attention_forward(CpuDtype dtype, const Layout& L, const void* qkv, const void* pad, void* out, void* lse,
                       uint8_t* argmax, int64_t block_rows, int64_t begin, int64_t end, void* workspace) {
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const auto* qkv_data = static_cast<const scalar_t*>(qkv);
    auto* out_data = static_cast<scalar_t*>(out);
    ForwardTiles<acc_t> tiles(L, block_rows, static_cast<acc_t*>(workspace));
    for (int64_t task = begin; task < end; ++task) {
      const ForwardTask t = forward_task_at(L, block_rows, task);
      if (task + 1 < end && prefetches(L)) {
        const ForwardTask next = forward_task_at(L, block_rows, task + 1);
        prefetch_forward_rows(L, qkv_data, out_data, next, next.w != t.w || next.h != t.h || next.b != t.b);
      }
      forward_task<scalar_t, acc_t>(L, qkv_data, static_cast<const scalar_t*>(pad), out_data, static_cast<acc_t*>(lse),
                                    argmax, t.b, t.h, t.w, t.i0, t.mq, tiles);
    }
  });
}

template <typename acc_t>
struct BackwardTiles {
  int64_t hd_pad, q_pad, elements;
  acc_t *q_rows, *q_cols, *d_out_rows, *d_out_cols, *dq, *k_rows, *v_rows, *dk, *dv, *p, *ds, *lse, *delta;
  acc_t *q_pairs, *d_out_pairs, *k_pairs, *p_pairs, *ds_pairs, *ds_key_pairs;  // the bf16 dot path's (BF16Backward)
  template <typename Layout>
  BackwardTiles(const Layout& L, acc_t* workspace) {
    constexpr int64_t lanes = Simd<acc_t>::kLanes;
    hd_pad = round_up(L.head_dim, lanes);
    q_pad = round_up(L.queries, lanes);
    const int64_t kb = std::min(kKeyBlock, L.per_window);
    Carver<acc_t> ws{workspace};
    q_rows = ws.take(L.queries * hd_pad);
    d_out_rows = ws.take(L.queries * hd_pad);
    dq = ws.take(L.queries * hd_pad);
    q_cols = ws.take(L.head_dim * q_pad);
    d_out_cols = ws.take(L.head_dim * q_pad);
    k_rows = ws.take(kb * hd_pad);
    v_rows = ws.take(kb * hd_pad);
    dk = ws.take(kb * hd_pad);
    dv = ws.take(kb * hd_pad);
    p = ws.take(kb * kQueryBlock);
    ds = ws.take(kb * kQueryBlock);
    lse = ws.take(q_pad);
    delta = ws.take(q_pad);
    q_pairs = ws.take((L.queries + 1) / 2 * hd_pad);
    d_out_pairs = ws.take((L.queries + 1) / 2 * hd_pad);
    k_pairs = ws.take((kb + 1) / 2 * hd_pad);
    p_pairs = ws.take(kb * kQueryBlock / 2);
    ds_pairs = ws.take(kb * kQueryBlock / 2);
    ds_key_pairs = ws.take((kb + 1) / 2 * kQueryBlock);
    elements = ws.used;
  }
};

// The backward's five products per (key block, query block), in the accumulation type:
// s^T = K . Q^T and dp^T = V . dO^T [kb, mqp] into t.p and t.ds, then (with p and ds
// computed in place) dv += p^T . dO, dk += ds^T . q and dq += ds . K.
template <typename scalar_t, typename acc_t>
struct WidenedBackward {
  template <typename Layout>
  static void prepare_queries(const Layout& L, BackwardTiles<acc_t>& t) {
    transpose_rows(t.q_rows, L.queries, L.head_dim, t.hd_pad, t.q_cols, t.q_pad);
    transpose_rows(t.d_out_rows, L.queries, L.head_dim, t.hd_pad, t.d_out_cols, t.q_pad);
  }
  template <typename Layout>
  static void load_keys(const Layout& L, const scalar_t* qkv, const scalar_t* pad, int64_t b, int64_t h, int64_t w,
                        int64_t j0, int64_t kb, BackwardTiles<acc_t>& t) {
    load_rows(L, qkv, pad, kKeyPart, b, h, w, j0, kb, t.hd_pad, t.k_rows);
    load_rows(L, qkv, pad, kValuePart, b, h, w, j0, kb, t.hd_pad, t.v_rows);
  }
  static void scores(int64_t hd, int64_t kb, int64_t i0, int64_t mqp, BackwardTiles<acc_t>& t) {
    gemm_rows(kb, hd, mqp, t.k_rows, t.hd_pad, 1, t.q_cols + i0, t.q_pad, t.p, mqp, false);       // s^T
    gemm_rows(kb, hd, mqp, t.v_rows, t.hd_pad, 1, t.d_out_cols + i0, t.q_pad, t.ds, mqp, false);  // dp^T
  }
  static void add_gradients(int64_t kb, int64_t i0, int64_t mq, int64_t mqp, BackwardTiles<acc_t>& t) {
    const int64_t hdp = t.hd_pad;
    gemm_rows(kb, mq, hdp, t.p, mqp, 1, t.d_out_rows + i0 * hdp, hdp, t.dv, hdp);
    gemm_rows(kb, mq, hdp, t.ds, mqp, 1, t.q_rows + i0 * hdp, hdp, t.dk, hdp);
    gemm_rows(mq, kb, hdp, t.ds, 1, mqp, t.k_rows, hdp, t.dq + i0 * hdp, hdp);
  }
};

#if HK_CPU_BF16_DOT
// The same products for bfloat16 on AVX512-BF16: every operand in bf16 pairs (see the
// forward's), fp32 accumulation; the softmax backward between them stays fp32. Q (pre-
// scaled) and dO go both ways once per task: pairs along the head dim per query lane
// (t.q_cols, t.d_out_cols) and pairs of query rows (t.q_pairs, t.d_out_pairs); per key
// block, K and V rows are copied as head-dim pairs (t.k_rows, t.v_rows) and K also
// interleaved in key pairs (t.k_pairs); p and ds are rounded to query pairs (t.p_pairs,
// t.ds_pairs) and ds to key pairs (t.ds_key_pairs). Q is rounded as in the forward, so
// s^T is the forward's bit for bit and p matches its lse.
template <typename acc_t>
struct BF16Backward {
  template <typename Layout>
  static void prepare_queries(const Layout& L, BackwardTiles<acc_t>& t) {
    const int64_t nq = L.queries, hdp = t.hd_pad;
    transpose_to_pairs(t.q_rows, nq, L.head_dim, hdp, as_pairs(t.q_cols), t.q_pad);
    transpose_to_pairs(t.d_out_rows, nq, L.head_dim, hdp, as_pairs(t.d_out_cols), t.q_pad);
    pack_row_pairs(t.q_rows, nq, hdp, hdp, as_pairs(t.q_pairs), hdp);
    pack_row_pairs(t.d_out_rows, nq, hdp, hdp, as_pairs(t.d_out_pairs), hdp);
  }
  template <typename Layout>
  static void load_keys(const Layout& L, const bf16* qkv, const bf16* pad, int64_t b, int64_t h, int64_t w,
                        int64_t j0, int64_t kb, BackwardTiles<acc_t>& t) {
    copy_row_pairs(L, qkv, pad, kKeyPart, b, h, w, j0, kb, as_pairs(t.k_rows));
    copy_row_pairs(L, qkv, pad, kValuePart, b, h, w, j0, kb, as_pairs(t.v_rows));
    interleave_row_pairs(L, qkv, pad, kKeyPart, b, h, w, j0, kb, t.hd_pad, as_pairs(t.k_pairs));
  }
  static void scores(int64_t hd, int64_t kb, int64_t i0, int64_t mqp, BackwardTiles<acc_t>& t) {
    const int64_t hd_pairs = (hd + 1) / 2;
    gemm_rows_with<Bf16PairProduct>(kb, hd_pairs, mqp, as_pairs(t.k_rows), hd_pairs, 1, as_pairs(t.q_cols) + i0,
                                    t.q_pad, t.p, mqp, false);
    gemm_rows_with<Bf16PairProduct>(kb, hd_pairs, mqp, as_pairs(t.v_rows), hd_pairs, 1, as_pairs(t.d_out_cols) + i0,
                                    t.q_pad, t.ds, mqp, false);
  }
  static void add_gradients(int64_t kb, int64_t i0, int64_t mq, int64_t mqp, BackwardTiles<acc_t>& t) {
    const int64_t hdp = t.hd_pad, q_pairs = (mq + 1) / 2;  // i0 is even: a whole number of query blocks
    pack_column_pairs(t.p, kb, mqp, mqp, mq, as_pairs(t.p_pairs));
    pack_column_pairs(t.ds, kb, mqp, mqp, mq, as_pairs(t.ds_pairs));
    pack_row_pairs(t.ds, kb, mqp, mqp, as_pairs(t.ds_key_pairs), mqp);
    gemm_rows_with<Bf16PairProduct>(kb, q_pairs, hdp, as_pairs(t.p_pairs), mqp / 2, 1,
                                    as_pairs(t.d_out_pairs) + i0 / 2 * hdp, hdp, t.dv, hdp, true);
    gemm_rows_with<Bf16PairProduct>(kb, q_pairs, hdp, as_pairs(t.ds_pairs), mqp / 2, 1,
                                    as_pairs(t.q_pairs) + i0 / 2 * hdp, hdp, t.dk, hdp, true);
    gemm_rows_with<Bf16PairProduct>(mq, (kb + 1) / 2, hdp, as_pairs(t.ds_key_pairs), 1, mqp, as_pairs(t.k_pairs), hdp,
                                    t.dq + i0 * hdp, hdp, true);
  }
};
#endif

template <typename scalar_t, typename acc_t>
using BackwardProducts =
    std::conditional_t<kBf16Dot<scalar_t>, BF16Backward<acc_t>, WidenedBackward<scalar_t, acc_t>>;

// dq, dk and dv of one (b, h, w): recompute p = exp(s - lse) block by block. A padded
// key's dk and dv add up in grad_pad [2, dim] (this (b, w)'s slot of the pad partials).
// A query the crop drops gets dO = 0, q = 0 and lse = 0, so its p is finite and its
// dS and dV terms are exactly 0.
template <typename scalar_t, typename acc_t, typename Layout>
void backward_task(const Layout& L, const scalar_t* grad_out, const scalar_t* qkv, const scalar_t* pad,
                   const scalar_t* out, const acc_t* lse, const uint8_t* argmax, scalar_t* grad_qkv, acc_t* grad_pad,
                   int64_t b, int64_t h, int64_t w, BackwardTiles<acc_t>& t) {
  using S = Simd<acc_t>;
  using Vec = typename S::Vec;
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(L.head_dim));
  const int64_t hd = L.head_dim, hdp = t.hd_pad, nq = L.queries, nqp = t.q_pad;
  using Products = BackwardProducts<scalar_t, acc_t>;
  load_queries<scalar_t, false, acc_t>(L, qkv, pad, argmax, nullptr, b, h, w, 0, nq, hdp, t.q_rows);
  std::fill(t.lse, t.lse + nqp, acc_t(0));
  std::fill(t.delta, t.delta + nqp, acc_t(0));
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t out_offset = L.out_offset(b, h, i, w);
    acc_t* dOi = t.d_out_rows + i * hdp;
    if (out_offset < 0) {  // cropped
      std::fill(dOi, dOi + hdp, acc_t(0));
      continue;
    }
    // delta = rowsum(dO * O), the softmax backward's correction, in vector lanes; O is
    // widened into dq's row (zeroed after this loop).
    acc_t* Oi = t.dq + i * hdp;
    load_as_acc(grad_out + out_offset, dOi, hd);
    load_as_acc(out + out_offset, Oi, hd);
    std::fill(dOi + hd, dOi + hdp, acc_t(0));
    std::fill(Oi + hd, Oi + hdp, acc_t(0));
    Vec delta{};
    for (int64_t d = 0; d < hdp; d += S::kLanes) delta += S::load(dOi + d) * S::load(Oi + d);
    t.delta[i] = horizontal_sum<acc_t>(delta);
    t.lse[i] = lse[L.lse_offset(b, h, w, i)];
  }
  Products::prepare_queries(L, t);
  std::fill(t.dq, t.dq + nq * hdp, acc_t(0));
  for (int64_t j0 = 0; j0 < L.per_window; j0 += kKeyBlock) {
    const int64_t kb = std::min(kKeyBlock, L.per_window - j0);
    Products::load_keys(L, qkv, pad, b, h, w, j0, kb, t);
    std::fill(t.dk, t.dk + kb * hdp, acc_t(0));
    std::fill(t.dv, t.dv + kb * hdp, acc_t(0));
    for (int64_t i0 = 0; i0 < nq; i0 += kQueryBlock) {
      const int64_t mq = std::min(kQueryBlock, nq - i0), mqp = round_up(mq, S::kLanes);
      acc_t* pt = t.p;
      acc_t* dst = t.ds;
      Products::scores(hd, kb, i0, mqp, t);  // s^T in pt, dp^T in dst
      for (int64_t j = 0; j < kb; ++j) {
        for (int64_t c = 0; c < mqp; c += S::kLanes) {
          const Vec p = exp_vec(S::load(pt + j * mqp + c) - S::load(t.lse + i0 + c));
          S::store(pt + j * mqp + c, p);
          S::store(dst + j * mqp + c, p * (S::load(dst + j * mqp + c) - S::load(t.delta + i0 + c)));
        }
      }
      // dv += p^T . dO ; dk += ds^T . q (q pre-scaled) ; dq += ds . k (scaled at the end)
      Products::add_gradients(kb, i0, mq, mqp, t);
    }
    for (int64_t j = 0; j < kb; ++j) {
      for (const int which : {kKeyPart, kValuePart}) {
        const acc_t* grad = (which == kKeyPart ? t.dk : t.dv) + j * hdp;
        const int64_t offset = L.key_offset(b, which, h, j0 + j, w);
        if (offset < 0) {  // a padded key: its k and v are pad's
          acc_t* sum = grad_pad + (which - kKeyPart) * L.dim + h * hd;
          for (int64_t d = 0; d < hd; ++d) sum[d] += grad[d];
          continue;
        }
        store_from_acc(grad, grad_qkv + offset, hd);
      }
    }
  }
  // Route dq through the pooling argmax: every q candidate row of a stored query gets
  // its gradient or 0 (candidates of stored queries are never padding).
  const int64_t count = L.candidate_count();
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t out_offset = L.out_offset(b, h, i, w);
    if (out_offset < 0) continue;
    acc_t* dq = t.dq + i * hdp;
    for (int64_t d = 0; d < hd; ++d) dq[d] *= scale;
    if (count == 1) {  // no pooling: the row is the query's
      store_from_acc(dq, grad_qkv + L.candidate_offset(b, h, i, w, 0), hd);
      continue;
    }
    const uint8_t* arg = argmax + out_offset;
    for (int64_t c = 0; c < count; ++c) {
      scalar_t* row = grad_qkv + L.candidate_offset(b, h, i, w, c);
      for (int64_t d = 0; d < hd; ++d) row[d] = static_cast<scalar_t>(arg[d] == c ? dq[d] : acc_t(0));
    }
  }
}

template <typename Layout>
int64_t attention_backward_workspace(CpuDtype dtype, const Layout& L) {
  int64_t bytes = 0;
  by_dtype(dtype, [&](auto tag) {
    using acc_t = acc_type<decltype(tag)>;
    bytes = BackwardTiles<acc_t>(L, nullptr).elements * static_cast<int64_t>(sizeof(acc_t));
  });
  return bytes;
}

// A backward task: window (b, h, w); task `task` of them, w fastest, then h.
struct BackwardTask {
  int64_t b, h, w;
};
template <typename Layout>
BackwardTask backward_task_at(const Layout& L, int64_t task) {
  return {task / (L.windows * L.heads), (task / L.windows) % L.heads, task % L.windows};
}

// The rows a backward task (b, h, w) reads and writes, requested while the task before
// it computes (see prefetch_forward_rows): its queries' dO, O, argmax and candidates
// (read, and written with their gradient) and its keys' k and v (the same).
template <typename scalar_t, typename Layout>
void prefetch_backward_rows(const Layout& L, const scalar_t* grad_out, const scalar_t* qkv, const scalar_t* out,
                            const uint8_t* argmax, const scalar_t* grad_qkv, const BackwardTask& t) {
  for (int64_t i = 0; i < L.queries; ++i) {
    const int64_t out_offset = L.out_offset(t.b, t.h, i, t.w);
    if (out_offset < 0) continue;  // cropped: neither read nor written
    prefetch_row(grad_out + out_offset, L.head_dim);
    prefetch_row(out + out_offset, L.head_dim);
    if (L.candidate_count() > 1) prefetch_row(argmax + out_offset, L.head_dim);
    prefetch_candidate_rows(L, qkv, t.b, t.h, i, t.w);
    prefetch_candidate_rows(L, grad_qkv, t.b, t.h, i, t.w);
  }
  prefetch_key_rows(L, qkv, t.b, t.h, t.w);
  prefetch_key_rows(L, grad_qkv, t.b, t.h, t.w);
}

// Tasks [begin, end) (backward_task_at's order), each prefetching the next one's rows.
// grad_pad: the pad partials [B, windows, 2, dim] in the accumulation type, zeroed by
// the caller (nullptr without padding).
template <typename Layout>
void attention_backward(CpuDtype dtype, const Layout& L, const void* grad_out, const void* qkv, const void* pad,
                        const void* out, const void* lse, const uint8_t* argmax, void* grad_qkv, void* grad_pad,
                        int64_t begin, int64_t end, void* workspace) {
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const auto* grad_out_data = static_cast<const scalar_t*>(grad_out);
    const auto* qkv_data = static_cast<const scalar_t*>(qkv);
    const auto* out_data = static_cast<const scalar_t*>(out);
    auto* grad_qkv_data = static_cast<scalar_t*>(grad_qkv);
    BackwardTiles<acc_t> tiles(L, static_cast<acc_t*>(workspace));
    for (int64_t task = begin; task < end; ++task) {
      const BackwardTask t = backward_task_at(L, task);
      if (task + 1 < end && prefetches(L))
        prefetch_backward_rows(L, grad_out_data, qkv_data, out_data, argmax, grad_qkv_data, backward_task_at(L, task + 1));
      acc_t* pad_slot =
          grad_pad == nullptr ? nullptr : static_cast<acc_t*>(grad_pad) + (t.b * L.windows + t.w) * 2 * L.dim;
      backward_task<scalar_t, acc_t>(L, grad_out_data, qkv_data, static_cast<const scalar_t*>(pad), out_data,
                                     static_cast<const acc_t*>(lse), argmax, grad_qkv_data, pad_slot, t.b, t.h, t.w,
                                     tiles);
    }
  });
}

// ------------------------------------------------------------------ layer norm
// ATen's native_layer_norm over the last dim: y = (x - mean) * rstd * weight + bias with
// rstd = 1 / sqrt(var + eps), var the biased variance. kLayerNormRows rows at a time are
// widened into the workspace (L1-resident) and read twice: their means, then their sums
// of squares about the mean (no cancellation, unlike E[x^2] - mean^2). Rows are short
// (Hiera-B: C = 96 .. 768), so one row's reductions are a chain of dependent adds and a
// square root; the rows of a block are summed side by side (independent chains, each in
// Simd lanes in a fixed order) and their square roots taken together.

// out[i] = sum over k < C of (rows[i * C + k] - shift[i])^kPower for kLayerNormRows rows.
template <int kPower, typename acc_t>
inline void row_sums(const acc_t* rows, int64_t C, const acc_t* shift, acc_t* out) {
  using S = Simd<acc_t>;
  typename S::Vec lanes[kLayerNormRows] = {};
  int64_t k = 0;
  for (; k + S::kLanes <= C; k += S::kLanes)
    for (int64_t i = 0; i < kLayerNormRows; ++i) {
      const typename S::Vec d = S::load(rows + i * C + k) - shift[i];
      lanes[i] += kPower == 1 ? d : d * d;
    }
  for (int64_t i = 0; i < kLayerNormRows; ++i) {
    acc_t sum = horizontal_sum<acc_t>(lanes[i]);
    for (int64_t j = k; j < C; ++j) {
      const acc_t d = rows[i * C + j] - shift[i];
      sum += kPower == 1 ? d : d * d;
    }
    out[i] = sum;
  }
}

template <typename scalar_t>
void layer_norm_typed(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, double eps, int64_t C,
                      scalar_t* y, scalar_t* mean_out, scalar_t* rstd_out, int64_t begin, int64_t end,
                      acc_type<scalar_t>* workspace) {
  using acc_t = acc_type<scalar_t>;
  using S = Simd<acc_t>;
  acc_t* rows = workspace;                       // [kLayerNormRows, C] the rows being normalised
  acc_t* gamma = rows + kLayerNormRows * C;      // [C] weight, or ones
  acc_t* beta = gamma + C;                       // [C] bias, or zeros
  for (int64_t c = 0; c < C; ++c) {
    gamma[c] = weight == nullptr ? acc_t(1) : static_cast<acc_t>(weight[c]);
    beta[c] = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[c]);
  }
  for (int64_t r0 = begin; r0 < end; r0 += kLayerNormRows) {
    const int64_t nr = std::min(kLayerNormRows, end - r0);
    for (int64_t i = 0; i < nr; ++i) load_as_acc(x + (r0 + i) * C, rows + i * C, C);
    std::fill(rows + nr * C, rows + kLayerNormRows * C, acc_t(0));  // a last, partial block
    const acc_t zero[kLayerNormRows] = {};
    acc_t mean[kLayerNormRows], rstd[kLayerNormRows];
    row_sums<1>(rows, C, zero, mean);
    for (int64_t i = 0; i < kLayerNormRows; ++i) mean[i] /= static_cast<acc_t>(C);
    row_sums<2>(rows, C, mean, rstd);
    for (int64_t i = 0; i < kLayerNormRows; ++i)
      rstd[i] = acc_t(1) / std::sqrt(rstd[i] / static_cast<acc_t>(C) + static_cast<acc_t>(eps));
    for (int64_t i = 0; i < nr; ++i) {
      acc_t* row = rows + i * C;
      int64_t c = 0;
      for (; c + S::kLanes <= C; c += S::kLanes)
        S::store(row + c, (S::load(row + c) - mean[i]) * rstd[i] * S::load(gamma + c) + S::load(beta + c));
      for (; c < C; ++c) row[c] = (row[c] - mean[i]) * rstd[i] * gamma[c] + beta[c];
      store_from_acc(row, y + (r0 + i) * C, C);
      mean_out[r0 + i] = static_cast<scalar_t>(mean[i]);
      rstd_out[r0 + i] = static_cast<scalar_t>(rstd[i]);
    }
  }
}

void layer_norm(CpuDtype dtype, const void* x, const void* weight, const void* bias, double eps, int64_t C, void* y,
                void* mean, void* rstd, int64_t begin, int64_t end, void* workspace) {
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    layer_norm_typed(static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(weight),
                     static_cast<const scalar_t*>(bias), eps, C, static_cast<scalar_t*>(y),
                     static_cast<scalar_t*>(mean), static_cast<scalar_t*>(rstd), begin, end,
                     static_cast<acc_type<scalar_t>*>(workspace));
  });
}

// ------------------------------------------------------------------ layer norm backward
// ATen's native_layer_norm_backward over the last dim, from the forward's saved mean and
// rstd: with xhat = (x - mean) * rstd and g = grad_y * weight (C channels),
//   grad_x = rstd * (g - sum_C(g) / C - xhat * sum_C(g * xhat) / C)
// (ATen's a * g + b * x + c, with x - mean taken first), and this range's share of the
// column sums grad_weight = sum over rows of grad_y * xhat, grad_bias = sum of grad_y,
// always (one code path: grad_x's bits do not depend on which outputs are wanted, as
// they would if GCC contracted the sums into FMAs differently in two versions).
// kLayerNormBackwardRows rows at a time are walked side by side: each row's two sums are
// independent chains in registers, and a block's column sums are read and written once
// per block; the second walk (grad_x) finds the block's rows in L1 and recomputes xhat
// and g from them rather than storing them. With a skip gradient (kSkip: the gradient
// that a skip connection around the LayerNorm's branch carries to x), grad_x is the sum
// of both, rounded once, and the skip gradient's column sums are this range's third row
// of column sums (the bias gradient of the Linear whose output the skip is added to).

// Simd<acc_t>::kLanes elements of src in the accumulation type (load_as_acc's widening),
// and back (store_from_acc's rounding).
template <typename scalar_t, typename acc_t>
inline typename Simd<acc_t>::Vec load_widened(const scalar_t* src) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Simd<acc_t>::load(src);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    return (FloatVec)(widen_bits(src) << 16);
  } else {
    acc_t lanes[Simd<acc_t>::kLanes];
    load_as_acc(src, lanes, Simd<acc_t>::kLanes);
    return Simd<acc_t>::load(lanes);
  }
}

template <typename scalar_t, typename acc_t>
inline void store_narrowed(typename Simd<acc_t>::Vec v, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    Simd<acc_t>::store(dst, v);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    *reinterpret_cast<U16HalfVec*>(dst) = narrowed_bits(v);
  } else {
    acc_t lanes[Simd<acc_t>::kLanes];
    Simd<acc_t>::store(lanes, v);
    store_from_acc(lanes, dst, Simd<acc_t>::kLanes);
  }
}

// Rows [r0, r0 + kRows) of layer_norm_backward_typed; gamma [C] the widened weight;
// grad_skip read where kSkip (then grad_x is not nullptr).
template <int64_t kRows, bool kSkip, typename scalar_t, typename acc_t>
inline void layer_norm_backward_rows(const scalar_t* grad_y, const scalar_t* x, const scalar_t* mean,
                                     const scalar_t* rstd, const acc_t* gamma, int64_t C, const scalar_t* grad_skip,
                                     scalar_t* grad_x, acc_t* column_sums, int64_t r0) {
  using S = Simd<acc_t>;
  using Vec = typename S::Vec;
  const int64_t vector_end = C / S::kLanes * S::kLanes;
  const scalar_t* xs = x + r0 * C;
  const scalar_t* dys = grad_y + r0 * C;
  acc_t m[kRows], s[kRows], sum_g[kRows], sum_gx[kRows];
  for (int64_t i = 0; i < kRows; ++i) {
    m[i] = static_cast<acc_t>(mean[r0 + i]);
    s[i] = static_cast<acc_t>(rstd[r0 + i]);
  }
  {
    Vec lanes_g[kRows] = {}, lanes_gx[kRows] = {};
    for (int64_t c = 0; c < vector_end; c += S::kLanes) {
      const Vec gam = S::load(gamma + c);
      Vec block_weight{}, block_bias{};
      for (int64_t i = 0; i < kRows; ++i) {
        const Vec xh = (load_widened<scalar_t, acc_t>(xs + i * C + c) - m[i]) * s[i];
        const Vec dy = load_widened<scalar_t, acc_t>(dys + i * C + c), gw = dy * gam;
        block_weight += dy * xh;
        block_bias += dy;
        lanes_g[i] += gw;
        lanes_gx[i] += gw * xh;
      }
      S::store(column_sums + c, S::load(column_sums + c) + block_weight);
      S::store(column_sums + C + c, S::load(column_sums + C + c) + block_bias);
    }
    for (int64_t i = 0; i < kRows; ++i) {
      sum_g[i] = horizontal_sum<acc_t>(lanes_g[i]);
      sum_gx[i] = horizontal_sum<acc_t>(lanes_gx[i]);
    }
  }
  for (int64_t c = vector_end; c < C; ++c) {  // the vector tail
    acc_t block_weight = 0, block_bias = 0;
    for (int64_t i = 0; i < kRows; ++i) {
      const acc_t xh = (static_cast<acc_t>(xs[i * C + c]) - m[i]) * s[i], dy = static_cast<acc_t>(dys[i * C + c]);
      block_weight += dy * xh;
      block_bias += dy;
      sum_g[i] += dy * gamma[c];
      sum_gx[i] += dy * gamma[c] * xh;
    }
    column_sums[c] += block_weight;
    column_sums[C + c] += block_bias;
  }
  if (grad_x == nullptr) return;
  for (int64_t i = 0; i < kRows; ++i) {
    const acc_t mean_g = sum_g[i] / static_cast<acc_t>(C), mean_gx = sum_gx[i] / static_cast<acc_t>(C);
    scalar_t* dx = grad_x + (r0 + i) * C;
    // With a skip gradient: its row, and its column sums (column_sums' third row; summed
    // row by row here, where the row is read for grad_x anyway).
    [[maybe_unused]] const scalar_t* skip = kSkip ? grad_skip + (r0 + i) * C : nullptr;
    [[maybe_unused]] acc_t* skip_sums = column_sums + 2 * C;
    int64_t c = 0;
    for (; c < vector_end; c += S::kLanes) {
      const Vec xh = (load_widened<scalar_t, acc_t>(xs + i * C + c) - m[i]) * s[i];
      const Vec gw = load_widened<scalar_t, acc_t>(dys + i * C + c) * S::load(gamma + c);
      Vec dxv = (gw - mean_g - xh * mean_gx) * s[i];
      if constexpr (kSkip) {
        const Vec k = load_widened<scalar_t, acc_t>(skip + c);
        dxv += k;
        S::store(skip_sums + c, S::load(skip_sums + c) + k);
      }
      store_narrowed<scalar_t, acc_t>(dxv, dx + c);
    }
    for (; c < C; ++c) {
      const acc_t xh = (static_cast<acc_t>(xs[i * C + c]) - m[i]) * s[i];
      acc_t dxc = (static_cast<acc_t>(dys[i * C + c]) * gamma[c] - mean_g - xh * mean_gx) * s[i];
      if constexpr (kSkip) {
        dxc += static_cast<acc_t>(skip[c]);
        skip_sums[c] += static_cast<acc_t>(skip[c]);
      }
      dx[c] = static_cast<scalar_t>(dxc);
    }
  }
}

// Rows [begin, end): whole blocks of kLayerNormBackwardRows, then a last, partial block
// row by row; kSkip compiles the walk with or without the skip gradient (no test per element).
template <bool kSkip, typename scalar_t, typename acc_t>
void layer_norm_backward_blocks(const scalar_t* grad_y, const scalar_t* x, const scalar_t* mean, const scalar_t* rstd,
                                const acc_t* gamma, int64_t C, const scalar_t* grad_skip, scalar_t* grad_x,
                                acc_t* column_sums, int64_t begin, int64_t end) {
  int64_t r = begin;
  for (; r + kLayerNormBackwardRows <= end; r += kLayerNormBackwardRows)
    layer_norm_backward_rows<kLayerNormBackwardRows, kSkip>(grad_y, x, mean, rstd, gamma, C, grad_skip, grad_x,
                                                            column_sums, r);
  for (; r < end; ++r)
    layer_norm_backward_rows<1, kSkip>(grad_y, x, mean, rstd, gamma, C, grad_skip, grad_x, column_sums, r);
}

template <typename scalar_t>
void layer_norm_backward_typed(const scalar_t* grad_y, const scalar_t* x, const scalar_t* mean, const scalar_t* rstd,
                               const scalar_t* weight, int64_t C, const scalar_t* grad_skip, scalar_t* grad_x,
                               acc_type<scalar_t>* column_sums, int64_t begin, int64_t end,
                               acc_type<scalar_t>* workspace) {
  using acc_t = acc_type<scalar_t>;
  acc_t* gamma = workspace;  // [C] weight, or ones
  for (int64_t c = 0; c < C; ++c) gamma[c] = weight == nullptr ? acc_t(1) : static_cast<acc_t>(weight[c]);
  std::fill(column_sums, column_sums + (grad_skip == nullptr ? 2 : 3) * C, acc_t(0));
  if (grad_skip == nullptr)
    layer_norm_backward_blocks<false>(grad_y, x, mean, rstd, gamma, C, grad_skip, grad_x, column_sums, begin, end);
  else
    layer_norm_backward_blocks<true>(grad_y, x, mean, rstd, gamma, C, grad_skip, grad_x, column_sums, begin, end);
}

void layer_norm_backward(CpuDtype dtype, const void* grad_y, const void* x, const void* mean, const void* rstd,
                         const void* weight, int64_t C, const void* grad_skip, void* grad_x, void* column_sums,
                         int64_t begin, int64_t end, void* workspace) {
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    layer_norm_backward_typed(static_cast<const scalar_t*>(grad_y), static_cast<const scalar_t*>(x),
                              static_cast<const scalar_t*>(mean), static_cast<const scalar_t*>(rstd),
                              static_cast<const scalar_t*>(weight), C, static_cast<const scalar_t*>(grad_skip),
                              static_cast<scalar_t*>(grad_x), static_cast<acc_t*>(column_sums), begin, end,
                              static_cast<acc_t*>(workspace));
  });
}

// ------------------------------------------------------------------ GELU backward
// The exact GELU recomputed together with its backward, one pass (training's recompute
// ops keep fc1's output h, not gelu(h)): out = h * cdf(h) and grad_h = grad_out * (cdf(h)
// + h * pdf(h)), cdf(h) = (1 + erf(h / sqrt 2)) / 2, pdf(h) = exp(-h^2 / 2) / sqrt(2 pi).
// erf is Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7; ATen's Vectorized<float>::erf),
// whose exp(-x^2) at x = h / sqrt 2 is pdf's exponential: one exp serves both, where
// ATen's gelu and gelu_backward are two passes with an erf each.
inline void gelu_and_slope(FloatVec h, FloatVec& out, FloatVec& slope) {
  const FloatVec x = h * 0.707106781f;  // h / sqrt 2
  const FloatVec zero{};
  const FloatVec ax = x < zero ? -x : x;
  const FloatVec t = 1.f / (ax * 0.3275911f + 1.f);
  FloatVec r = t * 1.061405429f - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  // exp(-x^2), exactly 0 where it underflows (x^2 > 87), so that h = +-inf gives
  // h * pdf = inf * 0 = NaN in the slope, as ATen's gelu_backward does.
  const FloatVec x2 = x * x;
  const FloatVec e = x2 > zero + 87.f ? zero : exp_vec(-x2);
  const FloatVec erf_ax = 1.f - r * t * e;
  const FloatVec cdf = 0.5f * (1.f + (x < zero ? -erf_ax : erf_ax));
  out = h * cdf;
  slope = cdf + h * e * 0.398942280f;  // 1 / sqrt(2 pi)
}

constexpr int64_t kGeluBlock = 256;  // elements widened at a time (L1)

// Rows [begin, end) of grad_out and h [rows, width]; column_sums (or nullptr) [width] in the
// accumulation type: this range's sums of grad_h as stored (rounded to scalar_t, the values
// a separate grad_h.sum(0) would add), for fc1's bias gradient.
template <typename scalar_t>
void gelu_recompute_backward_typed(const scalar_t* grad_out, const scalar_t* h, scalar_t* out, scalar_t* grad_h,
                                   int64_t width, acc_type<scalar_t>* column_sums, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  if (column_sums != nullptr) std::fill(column_sums, column_sums + width, acc_t(0));
  for (int64_t r = begin; r < end; ++r) {
    const int64_t row = r * width;
    if constexpr (std::is_same_v<scalar_t, double>) {  // float64 (gradcheck): libm, ATen's formula
      for (int64_t k = row; k < row + width; ++k) {
        const double cdf = 0.5 * (1.0 + std::erf(h[k] * M_SQRT1_2));
        const double pdf = std::exp(-0.5 * h[k] * h[k]) * 0.5 * M_2_SQRTPI * M_SQRT1_2;
        out[k] = h[k] * cdf;
        grad_h[k] = grad_out[k] * (cdf + h[k] * pdf);
      }
      if (column_sums != nullptr)
        for (int64_t c = 0; c < width; ++c) column_sums[c] += grad_h[row + c];
    } else {
      using S = Simd<float>;
      float hv[kGeluBlock], gv[kGeluBlock];
      for (int64_t c0 = 0; c0 < width; c0 += kGeluBlock) {
        const int64_t k0 = row + c0, n = std::min(kGeluBlock, width - c0), nv = round_up(n, S::kLanes);
        load_as_acc(h + k0, hv, n);
        load_as_acc(grad_out + k0, gv, n);
        std::fill(hv + n, hv + nv, 0.f);  // whole vectors; the tail lanes are not stored
        std::fill(gv + n, gv + nv, 0.f);
        for (int64_t k = 0; k < nv; k += S::kLanes) {
          FloatVec o, slope;
          gelu_and_slope(S::load(hv + k), o, slope);
          S::store(hv + k, o);
          S::store(gv + k, S::load(gv + k) * slope);
        }
        store_from_acc(hv, out + k0, n);
        store_from_acc(gv, grad_h + k0, n);
        if (column_sums != nullptr) {
          load_as_acc(grad_h + k0, gv, n);  // the stored, rounded values
          for (int64_t c = 0; c < n; ++c) column_sums[c0 + c] += gv[c];
        }
      }
    }
  }
}

void gelu_recompute_backward(CpuDtype dtype, const void* grad_out, const void* h, void* out, void* grad_h,
                             int64_t width, void* column_sums, int64_t begin, int64_t end) {
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    gelu_recompute_backward_typed(static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(h),
                                  static_cast<scalar_t*>(out), static_cast<scalar_t*>(grad_h), width,
                                  static_cast<acc_type<scalar_t>*>(column_sums), begin, end);
  });
}

}  // namespace

extern const CpuKernels kernels = {
    HK_STRING(HK_CPU_CAPABILITY),
    HK_CPU_TARGET,
    &permute_tokens,
    &query_pool,
    &query_pool_backward,
    {&attention_forward_workspace<AttentionLayout>, &attention_forward<AttentionLayout>,
     &attention_backward_workspace<AttentionLayout>, &attention_backward<AttentionLayout>},
    {&attention_forward_workspace<WindowLayout>, &attention_forward<WindowLayout>,
     &attention_backward_workspace<WindowLayout>, &attention_backward<WindowLayout>},
    &layer_norm,
    &layer_norm_backward,
    &gelu_recompute_backward,
};

}  // namespace HK_CONCAT(cpu_, HK_CPU_CAPABILITY)
}  // namespace hiera_kernels
