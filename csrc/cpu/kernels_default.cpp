// The baseline x86-64 build of the CPU kernels (kernels_impl.h): SSE2, runs on every
// x86-64 CPU. 16-byte vectors, two per micro-kernel row (16 xmm registers).
#define HK_CPU_CAPABILITY default
#define HK_VECTOR_BYTES 16
#define HK_MAX_TILE_VECTORS 2
#define HK_CPU_F16C 0
#include "kernels_impl.h"
