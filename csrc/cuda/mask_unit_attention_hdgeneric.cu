// Mask-unit attention, forward and backward, for any other head dim up to kMaxHeadDim, padded to it and masked:
// one instantiation per translation unit so ninja compiles them in parallel.
#include "mask_unit_attention_kernels.cuh"

namespace hiera_kernels {
namespace cuda_attention {
template cudaError_t forward<0>(const ForwardArgs&, Dtype, cudaStream_t);
template cudaError_t backward<0>(const BackwardArgs&, Dtype, cudaStream_t);
}  // namespace cuda_attention
}  // namespace hiera_kernels
