// The AVX-512 build of the CPU kernels (kernels_impl.h), ATen's AVX512 level: 64-byte
// vectors, four per micro-kernel row (32 zmm registers), F16C half conversion.
#define HK_CPU_CAPABILITY avx512
#define HK_CPU_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#define HK_VECTOR_BYTES 64
#define HK_MAX_TILE_VECTORS 4
#define HK_CPU_F16C 1
#include "kernels_impl.h"
