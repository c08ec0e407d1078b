// Window attention (SAM 2), forward and backward, for head dim 96 (SAM 2 Hiera-T/S):
// one instantiation per translation unit so ninja compiles them in parallel.
#include "attention_kernels.cuh"

namespace hiera_kernels {
namespace cuda_attention {
template cudaError_t forward<WindowLayout, 96>(const ForwardArgs<WindowLayout>&, Dtype, cudaStream_t);
template cudaError_t backward<WindowLayout, 96>(const BackwardArgs<WindowLayout>&, Dtype, cudaStream_t);
}  // namespace cuda_attention
}  // namespace hiera_kernels
