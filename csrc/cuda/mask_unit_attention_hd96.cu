// Mask-unit attention, forward and backward, for head dim 96 (Hiera T/S/B):
// one instantiation per translation unit so ninja compiles them in parallel.
#include "mask_unit_attention_kernels.cuh"

namespace hiera_kernels {
namespace cuda_attention {
template cudaError_t forward<96>(const ForwardArgs&, Dtype, cudaStream_t);
template cudaError_t backward<96>(const BackwardArgs&, Dtype, cudaStream_t);
}  // namespace cuda_attention
}  // namespace hiera_kernels
