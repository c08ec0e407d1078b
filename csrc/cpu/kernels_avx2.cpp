// The AVX2 build of the CPU kernels (kernels_impl.h), ATen's AVX2 level: 32-byte
// vectors, two per micro-kernel row (16 ymm registers), F16C half conversion.
#define HK_CPU_CAPABILITY avx2
#define HK_CPU_TARGET "avx2,fma,f16c"
#define HK_VECTOR_BYTES 32
#define HK_MAX_TILE_VECTORS 2
#define HK_CPU_F16C 1
#include "kernels_impl.h"
