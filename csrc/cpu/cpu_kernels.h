// The interface between the CPU entry points and the CPU kernels' inner loops.
//
// The inner loops (kernels_impl.h) are compiled once per CPU capability, each build
// in its own namespace hiera_kernels::cpu_<name> with its own instruction set
// (kernels_<name>.cpp), and linked into one library; cpu_dispatch.cpp picks one build
// at run time from the CPU's features and ATen's capability, as ATen's DispatchStub
// does. The entry points (token_order.cpp, query_pool.cpp, attention.cpp)
// are compiled for baseline x86-64: they check arguments, allocate, split the work
// with at::parallel_for and call the chosen build through a CpuKernels table, passing
// raw pointers. This header is included by both sides, so it holds no code: only
// types, the table of builds, and declarations.
#pragma once

#include <cstdint>

#include "hiera_kernels/attention_layout.h"
#include "hiera_kernels/token_order.h"
#include "hiera_kernels/window_layout.h"

namespace hiera_kernels {

// Every build of the CPU kernels, least to most capable, one row each:
//   X(name, ATen level, GCC target)
// name: ATEN_CPU_CAPABILITY's spelling; its kernels_<name>.cpp compiles the build.
// ATen level: the at::native::CPUCapability it belongs to (0 DEFAULT, 1 AVX2, 2 AVX512):
//   a build is used only when ATen runs at that level or above, so ATEN_CPU_CAPABILITY
//   steers both libraries alike. A build for an ISA extension ATen has no level for
//   (AVX512-BF16, AMX) takes the level it extends (2) and goes after the rows it beats.
// GCC target: the instruction set the build is compiled for (kernels_impl.h checks that
//   kernels_<name>.cpp used exactly this string) and, feature by feature, what the CPU
//   must report (__builtin_cpu_supports) to run it.
// Adding a build is one row here and a kernels_<name>.cpp of five #defines (its name,
// this GCC target, its vector shape) that includes kernels_impl.h; setup.py globs it.
#define HIERA_KERNELS_CPU_CAPABILITIES(X)                                        \
  X(default, 0, "")                                                              \
  X(avx2, 1, "avx2,fma,f16c")                                                    \
  X(avx512, 2, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")                 \
  X(avx512_bf16, 2, "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")

// Mask-unit attention's blocking: keys go through the softmax kKeyBlock at a time; a
// window whose keys fit one key block takes all its queries in one task, longer windows
// split them into tasks of kQueryBlock queries (the entry point chooses, the kernels
// follow).
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 256;

// LayerNorm normalises rows in blocks of kLayerNormRows (side by side: independent add
// chains); its workspace holds one block and the widened weight and bias.
constexpr int64_t kLayerNormRows = 8;
constexpr int64_t layer_norm_workspace(int64_t C) { return (kLayerNormRows + 2) * C; }
// Its backward walks kLayerNormBackwardRows rows side by side: 2, because with 4 GCC spills
// the rows' sums (fp32 Hiera-B stage-1 rows ran 1.4x slower; bf16 ones gained 1.15x); its
// workspace is the widened weight.
constexpr int64_t kLayerNormBackwardRows = 2;
constexpr int64_t layer_norm_backward_workspace(int64_t C) { return C; }

// The dtypes the kernels take; the entry points map at::ScalarType onto these.
enum class CpuDtype : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// One build's kernels. Each runs a range [begin, end) of its op's tasks, as one
// at::parallel_for chunk; the entry point that calls it has checked every argument.
struct CpuKernels {
  const char* name;
  const char* target;  // the GCC target the build was compiled for

  // unroll (to_unrolled) or reroll of x [B, N, C] rows of row_bytes bytes; a task is one
  // in-unit position t of one image (b * unit_size + t); unit_base[w] = unit_offset(g, w).
  void (*permute_tokens)(bool to_unrolled, const TokenGeometry& g, const int64_t* unit_base, const char* src,
                         char* dst, int64_t tokens, int64_t row_bytes, int64_t begin, int64_t end);

  // query_pool of x [B, stride * slab / C, C] as B images of `stride` slabs of `slab`
  // elements: out [B, slab] and argmax [B, slab]; a task is one element b * slab + j.
  void (*query_pool)(CpuDtype dtype, const void* x, void* out, uint8_t* argmax, int64_t stride, int64_t slab,
                     int64_t begin, int64_t end);
  // Its backward: grad_in [B, stride * slab] from grad_out and argmax [B, slab], moved as
  // raw element_size-byte words; tasks as in query_pool.
  void (*query_pool_backward)(int64_t element_size, const void* grad_out, const uint8_t* argmax, void* grad_in,
                              int64_t stride, int64_t slab, int64_t begin, int64_t end);

  // Attention, one set of kernels per layout (Layout: AttentionLayout for mask-unit
  // attention, WindowLayout for SAM 2's window attention, whose padded keys read `pad`
  // [3 * dim]; mask-unit attention passes nullptr). Bytes of workspace one chunk of the
  // forward needs (block_rows queries per task), and the forward: a task is
  // (b, h, w, query block), block fastest.
  template <typename Layout>
  struct Attention {
    int64_t (*forward_workspace)(CpuDtype dtype, const Layout& L, int64_t block_rows);
    void (*forward)(CpuDtype dtype, const Layout& L, const void* qkv, const void* pad, void* out, void* lse,
                    uint8_t* argmax, int64_t block_rows, int64_t begin, int64_t end, void* workspace);
    // The same for the backward: a task is (b, h, w), w fastest. grad_pad: partial sums
    // [B, windows, 2, dim] (a padded key's dk, dv) in the accumulation type, zeroed by
    // the caller; nullptr when no key is padding.
    int64_t (*backward_workspace)(CpuDtype dtype, const Layout& L);
    void (*backward)(CpuDtype dtype, const Layout& L, const void* grad_out, const void* qkv, const void* pad,
                     const void* out, const void* lse, const uint8_t* argmax, void* grad_qkv, void* grad_pad,
                     int64_t begin, int64_t end, void* workspace);
  };
  Attention<AttentionLayout> mask_unit_attention;
  Attention<WindowLayout> window_attention;

  // LayerNorm over the last dim of x [rows, C]: y [rows, C], mean and rstd [rows] in x's
  // dtype (ATen's CPU native_layer_norm); weight and bias [C] or nullptr; a task is a row.
  // workspace: layer_norm_workspace(C) elements of the accumulation type.
  void (*layer_norm)(CpuDtype dtype, const void* x, const void* weight, const void* bias, double eps, int64_t C,
                     void* y, void* mean, void* rstd, int64_t begin, int64_t end, void* workspace);

  // LayerNorm's backward over rows [begin, end) of x and grad_y [rows, C], from the
  // forward's mean and rstd [rows] (x's dtype): grad_x [rows, C] (nullptr: not wanted),
  // plus grad_skip [rows, C] where that is not nullptr (then grad_x is wanted), and this
  // range's column sums [2, C] of the accumulation type (grad_weight's, then grad_bias's;
  // [3, C] with grad_skip's third; the entry point adds the ranges up). weight [C] or
  // nullptr; a task is a row. workspace: layer_norm_backward_workspace(C) elements of the
  // accumulation type.
  void (*layer_norm_backward)(CpuDtype dtype, const void* grad_y, const void* x, const void* mean, const void* rstd,
                              const void* weight, int64_t C, const void* grad_skip, void* grad_x, void* column_sums,
                              int64_t begin, int64_t end, void* workspace);

  // The exact GELU recomputed with its backward, over rows [begin, end) of h and grad_out
  // [rows, width]: out = gelu(h), grad_h = grad_out * gelu'(h); and, unless column_sums is
  // nullptr, this range's column sums [width] of grad_h (as stored) in the accumulation
  // type (fc1's bias gradient; the entry point adds the ranges up). A task is a row.
  void (*gelu_recompute_backward)(CpuDtype dtype, const void* grad_out, const void* h, void* out, void* grad_h,
                                  int64_t width, void* column_sums, int64_t begin, int64_t end);
};

// Each build's table, defined (constant-initialised, so loading the library runs none
// of a build's code) at the end of kernels_impl.h.
#define HIERA_KERNELS_DECLARE_BUILD(name, level, target) \
  namespace cpu_##name {                                  \
  extern const CpuKernels kernels;                        \
  }
HIERA_KERNELS_CPU_CAPABILITIES(HIERA_KERNELS_DECLARE_BUILD)
#undef HIERA_KERNELS_DECLARE_BUILD

}  // namespace hiera_kernels
