// Torch-facing entry points of the CUDA attention kernels (attention_kernels.cuh, one
// layout and head dim per mask_unit_attention_hd*.cu and window_attention_hd*.cu):
// Hiera's mask_unit_attention and SAM 2's window_attention, forward and backward.
// Argument checks shared with the CPU kernels (attention_checks.h, run first, so that
// tests reach them by redispatch without a GPU), CUDA-only checks, allocation, the
// current stream, and the head-dim dispatch.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "attention_launch.h"
#include "cuda_checks.h"
#include "hiera_kernels/attention_checks.h"

namespace hiera_kernels {
namespace {

namespace ca = cuda_attention;

// The shared checks have admitted the float dtypes; the CUDA kernel has no float64.
ca::Dtype check_dtype(const char* op, const at::Tensor& qkv) {
  switch (qkv.scalar_type()) {
    case at::kFloat: return ca::Dtype::kFloat32;
    case at::kHalf: return ca::Dtype::kFloat16;
    case at::kBFloat16: return ca::Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": the CUDA kernel runs float32, float16 and bfloat16, got ", dtype_name(qkv.scalar_type()),
                  " (float64 runs on the 'torch' and 'cpu' backends)");
  }
}

// The CUDA kernels' own limits: head dim, shared memory on this device, grid size.
template <typename Layout>
void check_cuda_limits(const char* op, const Layout& L, ca::Dtype dtype) {
  TORCH_CHECK(L.head_dim <= ca::kMaxHeadDim, op, ": the CUDA kernel takes head dims up to ", ca::kMaxHeadDim,
              ", got ", L.head_dim, " (dim_out ", L.dim, " over ", L.heads, " heads)");
  const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  for (ca::Pass pass : {ca::Pass::kForward, ca::Pass::kBackwardDq, ca::Pass::kBackwardDkDv}) {
    const int64_t bytes = ca::smem_bytes<Layout>(pass, dtype, L.head_dim);
    TORCH_CHECK(bytes <= optin, op, ": head dim ", L.head_dim, " needs ", bytes,
                " bytes of shared memory per CTA; this GPU allows ", optin);
    TORCH_CHECK(ca::grid_size(L, pass, dtype) <= std::numeric_limits<int32_t>::max(), op, ": ", L.batch,
                " images x ", L.heads, " heads x ", L.windows, " windows is more CTAs than one launch takes");
  }
}

// Calls f(std::integral_constant<int, kHeadDim>) for the head dim's instantiation of the
// layout (ca::HeadDims, or 0: the generic one).
template <typename F, int... kDims>
cudaError_t by_head_dim(int64_t head_dim, F&& f, std::integer_sequence<int, kDims...>) {
  cudaError_t err = cudaSuccess;
  const bool instantiated = ((head_dim == kDims && (err = f(std::integral_constant<int, kDims>{}), true)) || ...);
  return instantiated ? err : f(std::integral_constant<int, 0>{});
}
template <typename Layout, typename F>
cudaError_t by_head_dim(int64_t head_dim, F&& f) {
  return by_head_dim(head_dim, std::forward<F>(f), typename ca::HeadDims<Layout>::type{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_unit_attention_cuda(const at::Tensor& qkv_in, int64_t heads,
                                                                        int64_t q_stride, int64_t windows) {
  const char* op = "hiera_kernels::mask_unit_attention";
  const AttentionLayout L = check_attention_args(op, qkv_in, heads, q_stride, windows);
  check_cuda_tensor(op, "qkv", qkv_in);
  const ca::Dtype dtype = check_dtype(op, qkv_in);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = qkv_in.contiguous();
  at::Tensor out = at::empty({L.batch, L.queries * L.windows, L.dim}, qkv.options());
  at::Tensor lse = new_attention_lse(qkv, L);
  at::Tensor argmax = q_stride > 1 ? at::empty({L.batch, L.queries * L.windows, L.dim}, qkv.options().dtype(at::kByte))
                                   : at::empty({0}, qkv.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, lse, argmax};
  check_cuda_limits(op, L, dtype);
  const ca::ForwardArgs<AttentionLayout> args{L,       qkv.const_data_ptr(), nullptr, out.mutable_data_ptr(),
                                              lse.mutable_data_ptr<float>(),
                                              q_stride > 1 ? argmax.mutable_data_ptr<uint8_t>() : nullptr};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(by_head_dim<AttentionLayout>(
      L.head_dim, [&](auto hd) { return ca::forward<AttentionLayout, decltype(hd)::value>(args, dtype, stream); }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse, argmax};
}

at::Tensor mask_unit_attention_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& qkv_in,
                                             const at::Tensor& out_in, const at::Tensor& lse_in,
                                             const at::Tensor& argmax_in, int64_t heads, int64_t q_stride,
                                             int64_t windows) {
  const char* op = "hiera_kernels::mask_unit_attention_backward";
  const AttentionLayout L =
      check_attention_backward_args(op, grad_out_in, qkv_in, out_in, lse_in, argmax_in, heads, q_stride, windows);
  check_cuda_tensor(op, "qkv", qkv_in);  // and so every tensor, all being on qkv's device
  const ca::Dtype dtype = check_dtype(op, qkv_in);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = qkv_in.contiguous(), grad_out = grad_out_in.contiguous();
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous(), argmax = argmax_in.contiguous();
  at::Tensor grad_qkv = at::empty_like(qkv);  // every element is written once
  if (grad_qkv.numel() == 0) return grad_qkv;
  check_cuda_limits(op, L, dtype);
  at::Tensor delta = at::empty_like(lse);  // rowsum(dO * O) per pooled query
  const ca::BackwardArgs<AttentionLayout> args{L,
                                               grad_out.const_data_ptr(),
                                               qkv.const_data_ptr(),
                                               nullptr,
                                               out.const_data_ptr(),
                                               lse.const_data_ptr<float>(),
                                               q_stride > 1 ? argmax.const_data_ptr<uint8_t>() : nullptr,
                                               delta.mutable_data_ptr<float>(),
                                               grad_qkv.mutable_data_ptr(),
                                               nullptr,
                                               nullptr};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(by_head_dim<AttentionLayout>(
      L.head_dim, [&](auto hd) { return ca::backward<AttentionLayout, decltype(hd)::value>(args, dtype, stream); }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_qkv;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_cuda(const at::Tensor& qkv_in, const at::Tensor& pad_in,
                                                                     int64_t heads, int64_t window_size, int64_t q_stride) {
  const char* op = "hiera_kernels::window_attention";
  const WindowLayout L = check_window_attention_args(op, qkv_in, pad_in, heads, window_size, q_stride);
  check_cuda_tensor(op, "qkv", qkv_in);  // and so pad, being on qkv's device
  const ca::Dtype dtype = check_dtype(op, qkv_in);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = qkv_in.contiguous(), pad = pad_in.contiguous();
  at::Tensor out = at::empty({L.batch, L.out_h, L.out_w, L.dim}, qkv.options());
  at::Tensor lse = new_attention_lse(qkv, L);
  at::Tensor argmax = q_stride > 1 ? at::empty({L.batch, L.out_h, L.out_w, L.dim}, qkv.options().dtype(at::kByte))
                                   : at::empty({0}, qkv.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, lse, argmax};
  check_cuda_limits(op, L, dtype);
  const ca::ForwardArgs<WindowLayout> args{L,
                                           qkv.const_data_ptr(),
                                           pad.const_data_ptr(),
                                           out.mutable_data_ptr(),
                                           lse.mutable_data_ptr<float>(),
                                           q_stride > 1 ? argmax.mutable_data_ptr<uint8_t>() : nullptr};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(by_head_dim<WindowLayout>(
      L.head_dim, [&](auto hd) { return ca::forward<WindowLayout, decltype(hd)::value>(args, dtype, stream); }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse, argmax};
}

std::tuple<at::Tensor, at::Tensor> window_attention_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& qkv_in,
                                                                  const at::Tensor& pad_in, const at::Tensor& out_in,
                                                                  const at::Tensor& lse_in, const at::Tensor& argmax_in,
                                                                  int64_t heads, int64_t window_size, int64_t q_stride) {
  const char* op = "hiera_kernels::window_attention_backward";
  const WindowLayout L = check_window_attention_backward_args(op, grad_out_in, qkv_in, pad_in, out_in, lse_in, argmax_in,
                                                              heads, window_size, q_stride);
  check_cuda_tensor(op, "qkv", qkv_in);  // and so every tensor, all being on qkv's device
  const ca::Dtype dtype = check_dtype(op, qkv_in);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = qkv_in.contiguous(), pad = pad_in.contiguous(), grad_out = grad_out_in.contiguous();
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous(), argmax = argmax_in.contiguous();
  // Every element is written once, except the q of positions no query pools over.
  at::Tensor grad_qkv = L.pools_every_position() ? at::empty_like(qkv) : at::zeros_like(qkv);
  at::Tensor grad_pad = at::empty_like(pad);
  if (grad_qkv.numel() == 0) return {grad_qkv, grad_pad.zero_()};
  check_cuda_limits(op, L, dtype);
  at::Tensor delta = at::empty_like(lse);  // rowsum(dO * O) per pooled query
  at::Tensor pad_partials = L.has_padding() ? at::empty({ca::pad_partials_size(L, dtype)}, lse.options())
                                            : at::Tensor();
  const ca::BackwardArgs<WindowLayout> args{L,
                                            grad_out.const_data_ptr(),
                                            qkv.const_data_ptr(),
                                            pad.const_data_ptr(),
                                            out.const_data_ptr(),
                                            lse.const_data_ptr<float>(),
                                            q_stride > 1 ? argmax.const_data_ptr<uint8_t>() : nullptr,
                                            delta.mutable_data_ptr<float>(),
                                            grad_qkv.mutable_data_ptr(),
                                            L.has_padding() ? pad_partials.mutable_data_ptr<float>() : nullptr,
                                            grad_pad.mutable_data_ptr()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(by_head_dim<WindowLayout>(
      L.head_dim, [&](auto hd) { return ca::backward<WindowLayout, decltype(hd)::value>(args, dtype, stream); }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_qkv, grad_pad};
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CUDA, m) {
  m.impl("mask_unit_attention", &mask_unit_attention_cuda);
  m.impl("mask_unit_attention_backward", &mask_unit_attention_backward_cuda);
  m.impl("window_attention", &window_attention_cuda);
  m.impl("window_attention_backward", &window_attention_backward_cuda);
}

}  // namespace hiera_kernels
