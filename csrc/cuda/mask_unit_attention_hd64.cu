// Mask-unit attention, forward and backward, for head dim 64 (Hiera H):
// one instantiation per translation unit so ninja compiles them in parallel.
#include "attention_kernels.cuh"

namespace hiera_kernels {
namespace cuda_attention {
template cudaError_t forward<AttentionLayout, 64>(const ForwardArgs<AttentionLayout>&, Dtype, cudaStream_t);
template cudaError_t backward<AttentionLayout, 64>(const BackwardArgs<AttentionLayout>&, Dtype, cudaStream_t);
}  // namespace cuda_attention
}  // namespace hiera_kernels
