// Window attention (SAM 2), forward and backward, for head dim 56 (SAM 2 Hiera-B+):
// one instantiation per translation unit so ninja compiles them in parallel.
#include "attention_kernels.cuh"

namespace hiera_kernels {
namespace cuda_attention {
template cudaError_t forward<WindowLayout, 56>(const ForwardArgs<WindowLayout>&, Dtype, cudaStream_t);
template cudaError_t backward<WindowLayout, 56>(const BackwardArgs<WindowLayout>&, Dtype, cudaStream_t);
}  // namespace cuda_attention
}  // namespace hiera_kernels
