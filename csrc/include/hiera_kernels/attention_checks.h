// Host-side construction and checking of an AttentionLayout, shared by the CPU and
// CUDA entry points of mask_unit_attention and its backward: one copy of each check.
// The Python op layer has already given friendly errors; these checks keep direct
// torch.ops calls from reading or writing out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "hiera_kernels/attention_layout.h"
#include "hiera_kernels/token_order.h"  // kMaxPoolStride

namespace hiera_kernels {

// The log-sum-exp is saved in the accumulation type: float32, or float64 for float64.
inline at::ScalarType attention_lse_dtype(at::ScalarType qkv_dtype) {
  return qkv_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// qkv [B, N, 3 * C] split into `windows` windows of N / windows keys, each with
// N / (windows * q_stride) pooled queries, over `heads` heads of C / heads channels.
inline AttentionLayout make_attention_layout(const char* op, const at::Tensor& qkv, int64_t heads,
                                             int64_t q_stride, int64_t windows) {
  TORCH_CHECK(qkv.dim() == 3, op, ": qkv must be [B, N, 3 * dim_out], got ", qkv.dim(), " dims");
  AttentionLayout L;
  L.batch = qkv.size(0);
  L.tokens = qkv.size(1);
  TORCH_CHECK(heads >= 1 && qkv.size(2) % (3 * heads) == 0, op, ": qkv width ", qkv.size(2),
              " is not divisible by 3 * heads = ", 3 * heads);
  TORCH_CHECK(q_stride >= 1 && q_stride <= kMaxPoolStride, op, ": q_stride must be in [1, ", kMaxPoolStride,
              "], got ", q_stride);
  TORCH_CHECK(windows >= 1 && L.tokens % (windows * q_stride) == 0, op, ": N=", L.tokens,
              " does not split into ", windows, " windows of a multiple of q_stride=", q_stride, " tokens");
  L.dim = qkv.size(2) / 3;
  L.heads = heads;
  L.head_dim = L.dim / heads;
  L.q_stride = q_stride;
  L.windows = windows;
  L.per_window = L.tokens / windows;
  L.queries = L.per_window / q_stride;
  return L;
}

// The backward's saved tensors must be the forward's: out and grad_out
// [B, queries * windows, C], lse [B, heads, windows, queries] in the accumulation
// type, q_argmax uint8 of out's shape (unused when q_stride == 1), all on qkv's device.
inline AttentionLayout check_attention_backward_args(const char* op, const at::Tensor& grad_out,
                                                     const at::Tensor& qkv, const at::Tensor& out,
                                                     const at::Tensor& lse, const at::Tensor& q_argmax,
                                                     int64_t heads, int64_t q_stride, int64_t windows) {
  const AttentionLayout L = make_attention_layout(op, qkv, heads, q_stride, windows);
  const std::vector<int64_t> out_shape = {L.batch, L.queries * L.windows, L.dim};
  TORCH_CHECK(grad_out.sizes() == out_shape && out.sizes() == out_shape, op,
              ": grad_out and out must have shape ", at::IntArrayRef(out_shape), ", got ", grad_out.sizes(), " and ", out.sizes());
  const std::vector<int64_t> lse_shape = {L.batch, L.heads, L.windows, L.queries};
  const at::ScalarType lse_dtype = attention_lse_dtype(qkv.scalar_type());
  TORCH_CHECK(lse.scalar_type() == lse_dtype && lse.sizes() == lse_shape, op, ": lse must be ", lse_dtype,
              " [B, heads, windows, queries] = ", at::IntArrayRef(lse_shape), ", got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(q_stride == 1 || (q_argmax.sizes() == out_shape && q_argmax.scalar_type() == at::kByte), op,
              ": q_argmax must be uint8 of the output's shape ", at::IntArrayRef(out_shape), ", got ", q_argmax.scalar_type(), " ",
              q_argmax.sizes());
  for (const at::Tensor* t : {&grad_out, &out, &lse, &q_argmax}) {
    TORCH_CHECK(t->device() == qkv.device(), op, ": every tensor must be on qkv's device ", qkv.device(),
                ", got one on ", t->device());
  }
  return L;
}

}  // namespace hiera_kernels
