// Device checks of the CUDA entry points. The dispatcher picks the CUDA kernel when any
// tensor argument is on CUDA, so each tensor argument is checked, after the
// device-independent argument checks shared with the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace hiera_kernels {

inline void check_cuda_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

}  // namespace hiera_kernels
