// The AVX-512 build with AVX512-BF16 (kernels_impl.h): the avx512 build, plus bfloat16
// attention, forward and backward, on vdpbf16ps dot products (Bf16PairProduct). ATen has
// no level of its own for it, so it takes AVX512's and is chosen over avx512 where the
// CPU has the instructions (Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on).
#define HK_CPU_CAPABILITY avx512_bf16
#define HK_CPU_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"
#define HK_VECTOR_BYTES 64
#define HK_MAX_TILE_VECTORS 4
#define HK_CPU_F16C 1
#define HK_CPU_BF16_DOT 1
#include "kernels_impl.h"
