// CUDA kernels for query pooling, out[b, i, c] = max_s x[b, s * No + i, c] with a one-byte
// argmax s, and its backward. In [B, N, C] with N = stride * No, the candidates of output
// element j = i * C + c of image b lie in `stride` contiguous slabs of No * C elements,
// so each thread owns kPack consecutive elements of a slab (16 bytes where aligned) and
// reads its stride candidates with one access per slab, coalesced across threads.
// Grid: [blocks over the slab, images] (kernel_utils.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "hiera_kernels/token_order.h"  // pool_takes
#include "kernel_utils.cuh"
#include "launch.h"

namespace hiera_kernels {
namespace {

// Values compare in float (double for double), as on the CPU: widening is exact, so the
// comparisons are those of the stored values.
__device__ __forceinline__ float to_compare(float v) { return v; }
__device__ __forceinline__ double to_compare(double v) { return v; }
__device__ __forceinline__ float to_compare(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compare(__nv_bfloat16 v) { return __bfloat162float(v); }

// x [B, stride, slab] -> out, argmax [B, slab], in packs of kPack elements: output pack
// j of image b has its s-th candidate at input pack (b * stride + s) * slab_packs + j.
// The output keeps the winner's own bits.
template <typename scalar_t, int kPack>
__global__ void __launch_bounds__(kThreads)
    query_pool_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                      uint8_t* __restrict__ argmax, int64_t batch, int64_t slab_packs, int64_t stride) {
  using Values = Pack<scalar_t, kPack>;
  using Args = Pack<uint8_t, kPack>;
  using compare_t = decltype(to_compare(scalar_t()));
  const int64_t grid_threads = int64_t(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const Values* image = reinterpret_cast<const Values*>(x) + b * stride * slab_packs;
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < slab_packs; j += grid_threads) {
      Values best = image[j];
      Args arg;
      compare_t best_value[kPack];
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        best_value[k] = to_compare(best.v[k]);
        arg.v[k] = 0;
      }
      for (int64_t s = 1; s < stride; ++s) {
        const Values candidate = image[s * slab_packs + j];
#pragma unroll
        for (int k = 0; k < kPack; ++k) {
          const compare_t value = to_compare(candidate.v[k]);
          if (pool_takes(value, best_value[k])) {
            best_value[k] = value;
            best.v[k] = candidate.v[k];
            arg.v[k] = static_cast<uint8_t>(s);
          }
        }
      }
      reinterpret_cast<Values*>(out)[b * slab_packs + j] = best;
      reinterpret_cast<Args*>(argmax)[b * slab_packs + j] = arg;
    }
  }
}

// grad_out, argmax [B, slab] -> grad_in [B, stride, slab]: every input element written
// once (no zero-fill pass). A selection, not arithmetic: raw bits move, and all-zero
// bits are +0.0 in every float format, so one kernel per element size serves every dtype.
template <typename bits_t, int kPack>
__global__ void __launch_bounds__(kThreads)
    query_pool_backward_kernel(const bits_t* __restrict__ grad_out, const uint8_t* __restrict__ argmax,
                               bits_t* __restrict__ grad_in, int64_t batch, int64_t slab_packs,
                               int64_t stride) {
  using Values = Pack<bits_t, kPack>;
  using Args = Pack<uint8_t, kPack>;
  const int64_t grid_threads = int64_t(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    Values* image = reinterpret_cast<Values*>(grad_in) + b * stride * slab_packs;
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < slab_packs; j += grid_threads) {
      const Values grad = reinterpret_cast<const Values*>(grad_out)[b * slab_packs + j];
      const Args arg = reinterpret_cast<const Args*>(argmax)[b * slab_packs + j];
      for (int64_t s = 0; s < stride; ++s) {
        Values routed;
#pragma unroll
        for (int k = 0; k < kPack; ++k) routed.v[k] = arg.v[k] == s ? grad.v[k] : bits_t(0);
        image[s * slab_packs + j] = routed;
      }
    }
  }
}

// 16-byte packs of elements when the slab is a whole number of them (so no pack
// straddles two images) and every base address allows it; otherwise one element per
// thread. The argmax pack is one byte per element.
template <typename scalar_t>
bool use_vector(const void* values_in, const void* values_out, const uint8_t* argmax, int64_t slab) {
  return is_aligned(16, {reinterpret_cast<uintptr_t>(values_in), reinterpret_cast<uintptr_t>(values_out),
                         static_cast<uintptr_t>(slab * sizeof(scalar_t))}) &&
         is_aligned(16 / sizeof(scalar_t), {reinterpret_cast<uintptr_t>(argmax)});
}

template <typename scalar_t>
void launch_pool(const void* x, void* out, uint8_t* argmax, int64_t batch, int64_t stride,
                 int64_t slab, cudaStream_t stream) {
  constexpr int kVector = 16 / sizeof(scalar_t);
  const auto* src = static_cast<const scalar_t*>(x);
  auto* dst = static_cast<scalar_t*>(out);
  if (use_vector<scalar_t>(x, out, argmax, slab)) {
    query_pool_kernel<scalar_t, kVector><<<image_grid(slab / kVector, kThreads, batch), kThreads, 0, stream>>>(
        src, dst, argmax, batch, slab / kVector, stride);
  } else {
    query_pool_kernel<scalar_t, 1><<<image_grid(slab, kThreads, batch), kThreads, 0, stream>>>(
        src, dst, argmax, batch, slab, stride);
  }
}

template <typename bits_t>
void launch_pool_backward(const void* grad_out, const uint8_t* argmax, void* grad_in, int64_t batch,
                          int64_t stride, int64_t slab, cudaStream_t stream) {
  constexpr int kVector = 16 / sizeof(bits_t);
  const auto* src = static_cast<const bits_t*>(grad_out);
  auto* dst = static_cast<bits_t*>(grad_in);
  if (use_vector<bits_t>(grad_out, grad_in, argmax, slab)) {
    query_pool_backward_kernel<bits_t, kVector><<<image_grid(slab / kVector, kThreads, batch), kThreads, 0, stream>>>(
        src, argmax, dst, batch, slab / kVector, stride);
  } else {
    query_pool_backward_kernel<bits_t, 1><<<image_grid(slab, kThreads, batch), kThreads, 0, stream>>>(
        src, argmax, dst, batch, slab, stride);
  }
}

}  // namespace

void launch_query_pool(PoolType type, const void* x, void* out, uint8_t* argmax, int64_t batch,
                       int64_t stride, int64_t slab, cudaStream_t stream) {
  switch (type) {
    case PoolType::kFloat32: return launch_pool<float>(x, out, argmax, batch, stride, slab, stream);
    case PoolType::kFloat16: return launch_pool<__half>(x, out, argmax, batch, stride, slab, stream);
    case PoolType::kBFloat16: return launch_pool<__nv_bfloat16>(x, out, argmax, batch, stride, slab, stream);
    case PoolType::kFloat64: return launch_pool<double>(x, out, argmax, batch, stride, slab, stream);
  }
}

void launch_query_pool_backward(PoolType type, const void* grad_out, const uint8_t* argmax,
                                void* grad_in, int64_t batch, int64_t stride, int64_t slab,
                                cudaStream_t stream) {
  switch (type) {
    case PoolType::kFloat16:
    case PoolType::kBFloat16:
      return launch_pool_backward<uint16_t>(grad_out, argmax, grad_in, batch, stride, slab, stream);
    case PoolType::kFloat32: return launch_pool_backward<uint32_t>(grad_out, argmax, grad_in, batch, stride, slab, stream);
    case PoolType::kFloat64: return launch_pool_backward<uint64_t>(grad_out, argmax, grad_in, batch, stride, slab, stream);
  }
}

}  // namespace hiera_kernels
