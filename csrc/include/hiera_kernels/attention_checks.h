// Host-side construction and checking of an AttentionLayout, shared by the CPU and
// CUDA entry points of mask_unit_attention and its backward: one copy of each check.
// The Python op layer has already given friendly errors; these checks keep direct
// torch.ops calls from reading or writing out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "hiera_kernels/attention_layout.h"
#include "hiera_kernels/tensor_checks.h"
#include "hiera_kernels/token_order.h"  // kMaxPoolStride, kMaxWindowQStride
#include "hiera_kernels/window_layout.h"

namespace hiera_kernels {

// The log-sum-exp is saved in the accumulation type: float32, or float64 for float64.
inline at::ScalarType attention_lse_dtype(at::ScalarType qkv_dtype) {
  return qkv_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The log-sum-exp's shape [B, heads, windows, queries] (either layout).
template <typename Layout>
std::vector<int64_t> attention_lse_shape(const Layout& L) {
  return {L.batch, L.heads, L.windows, L.queries};
}

// The forward's log-sum-exp (attention_lse_shape, either layout). The kernels
// write every element, except where C = 0: then out is empty and no kernel runs, but lse
// is not: every score is an empty dot product, 0, so each query's softmax is uniform over
// its window's per_window keys (as SDPA's is for E = 0) and lse = log(per_window).
template <typename Layout>
at::Tensor new_attention_lse(const at::Tensor& qkv, const Layout& L) {
  at::Tensor lse = at::empty(attention_lse_shape(L), qkv.options().dtype(attention_lse_dtype(qkv.scalar_type())));
  if (L.dim == 0) lse.fill_(std::log(static_cast<double>(L.per_window)));
  return lse;
}

// qkv [B, N, 3 * C] in a float dtype, split into `windows` windows of N / windows
// keys, each with N / (windows * q_stride) pooled queries, over `heads` heads of
// C / heads channels.
inline AttentionLayout check_attention_args(const char* op, const at::Tensor& qkv, int64_t heads,
                                            int64_t q_stride, int64_t windows) {
  check_dims(op, "qkv", qkv, 3, "[B, N, 3 * dim_out]");
  check_float_dtype(op, "qkv", qkv);
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

// The backward reads the forward's outputs, so each must be exactly what the forward
// made of this qkv: out and grad_out of out_shape in qkv's dtype, lse of lse_shape in the
// accumulation type, q_argmax uint8 of out's shape ([0] when q_stride == 1), all on qkv's
// device.
inline void check_forward_outputs(const char* op, const at::Tensor& qkv, const at::Tensor& grad_out,
                                  const at::Tensor& out, const at::Tensor& lse, const at::Tensor& q_argmax,
                                  const std::vector<int64_t>& out_shape, const std::vector<int64_t>& lse_shape,
                                  int64_t q_stride) {
  const std::vector<int64_t> argmax_shape = q_stride > 1 ? out_shape : std::vector<int64_t>{0};
  const struct {
    const char* name;
    const at::Tensor& t;
    at::ScalarType dtype;
    const char* why;
    const std::vector<int64_t>& shape;
  } args[] = {
      {"grad_out", grad_out, qkv.scalar_type(), " like qkv", out_shape},
      {"out", out, qkv.scalar_type(), " like qkv", out_shape},
      {"lse", lse, attention_lse_dtype(qkv.scalar_type()), " (the forward's log-sum-exp)", lse_shape},
      {"q_argmax", q_argmax, at::kByte, " (the forward's query argmax)", argmax_shape},
  };
  for (const auto& a : args) {
    check_dtype(op, a.name, a.t, a.dtype, a.why);
    check_shape(op, a.name, a.t, a.shape);
    check_same_device(op, a.name, a.t, "qkv", qkv);
  }
}

// Mask-unit attention's backward: out and grad_out [B, queries * windows, C], lse
// [B, heads, windows, queries] (check_forward_outputs).
inline AttentionLayout check_attention_backward_args(const char* op, const at::Tensor& grad_out,
                                                     const at::Tensor& qkv, const at::Tensor& out,
                                                     const at::Tensor& lse, const at::Tensor& q_argmax,
                                                     int64_t heads, int64_t q_stride, int64_t windows) {
  const AttentionLayout L = check_attention_args(op, qkv, heads, q_stride, windows);
  const std::vector<int64_t> out_shape = {L.batch, L.queries * L.windows, L.dim};
  check_forward_outputs(op, qkv, grad_out, out, lse, q_argmax, out_shape, attention_lse_shape(L), q_stride);
  return L;
}

// SAM 2's window attention: qkv [B, H, W, 3 * C] in a float dtype, pad [3 * C] (a padded
// token's qkv) in qkv's dtype and on its device; window_size 0 (global) or a multiple of
// q_stride; q_stride * q_stride candidates fit the one-byte argmax; the map holds at
// least one pooling window.
inline WindowLayout check_window_attention_args(const char* op, const at::Tensor& qkv, const at::Tensor& pad,
                                                int64_t heads, int64_t window_size, int64_t q_stride) {
  check_dims(op, "qkv", qkv, 4, "[B, H, W, 3 * dim_out]");
  check_float_dtype(op, "qkv", qkv);
  TORCH_CHECK(heads >= 1 && qkv.size(3) % (3 * heads) == 0, op, ": qkv width ", qkv.size(3),
              " is not divisible by 3 * heads = ", 3 * heads);
  TORCH_CHECK(q_stride >= 1 && q_stride <= kMaxWindowQStride, op, ": q_stride must be in [1, ", kMaxWindowQStride,
              "] (s * s candidates, one-byte argmax), got ", q_stride);
  TORCH_CHECK(window_size >= 0 && window_size % q_stride == 0, op, ": window_size must be 0 (global) or a multiple of q_stride=",
              q_stride, ", got ", window_size);
  TORCH_CHECK(qkv.size(1) >= q_stride && qkv.size(2) >= q_stride, op, ": the ", qkv.size(1), "x", qkv.size(2),
              " map is smaller than one ", q_stride, "x", q_stride, " pooling window");
  check_dtype(op, "pad", pad, qkv.scalar_type(), " like qkv");
  check_shape(op, "pad", pad, {qkv.size(3)});
  check_same_device(op, "pad", pad, "qkv", qkv);
  return WindowLayout::make(qkv.size(0), qkv.size(1), qkv.size(2), qkv.size(3) / 3, heads, window_size, q_stride);
}

// Its backward: out and grad_out [B, out_h, out_w, C], lse [B, heads, windows, queries]
// (check_forward_outputs).
inline WindowLayout check_window_attention_backward_args(const char* op, const at::Tensor& grad_out,
                                                         const at::Tensor& qkv, const at::Tensor& pad,
                                                         const at::Tensor& out, const at::Tensor& lse,
                                                         const at::Tensor& q_argmax, int64_t heads,
                                                         int64_t window_size, int64_t q_stride) {
  const WindowLayout L = check_window_attention_args(op, qkv, pad, heads, window_size, q_stride);
  const std::vector<int64_t> out_shape = {L.batch, L.out_h, L.out_w, L.dim};
  check_forward_outputs(op, qkv, grad_out, out, lse, q_argmax, out_shape, attention_lse_shape(L), q_stride);
  return L;
}

}  // namespace hiera_kernels
