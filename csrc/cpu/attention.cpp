// CPU entry points of both attentions, forward and backward: mask-unit attention with
// fused query pooling, and SAM 2's window attention. Argument checks
// (attention_checks.h, shared with CUDA), allocation, the split into tasks and
// per-chunk workspace live here; the flash-style kernels are the chosen build's
// (kernels_impl.h, cpu_kernels.h), one set for both layouts.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <tuple>

#include "cpu_dispatch.h"
#include "hiera_kernels/attention_checks.h"

namespace hiera_kernels {
namespace {

// Runs the forward over every (b, h, w, query block) into out, lse and argmax, which
// the caller allocated. Keys that fit one block are loaded once for all of a window's
// queries; longer sequences split the queries into blocks (more tasks, keys re-read
// per block).
template <typename Layout>
void run_forward(const CpuKernels::Attention<Layout>& kernels, CpuDtype dtype, const Layout& L, const at::Tensor& qkv,
                 const void* pad, at::Tensor& out, at::Tensor& lse, at::Tensor& argmax) {
  const int64_t block_rows = L.per_window <= kKeyBlock ? L.queries : kQueryBlock;
  const int64_t query_blocks = (L.queries + block_rows - 1) / block_rows;
  const int64_t tasks = L.batch * L.heads * L.windows * query_blocks;
  const int64_t bytes = kernels.forward_workspace(dtype, L, block_rows);
  const void* q = qkv.const_data_ptr();
  void* o = out.mutable_data_ptr();
  void* l = lse.mutable_data_ptr();
  uint8_t* a = argmax.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const auto scratch = workspace(bytes);
    kernels.forward(dtype, L, q, pad, o, l, a, block_rows, begin, end, scratch.get());
  });
}

// Runs the backward over every (b, h, w) into grad_qkv (and grad_pad's partials).
template <typename Layout>
void run_backward(const CpuKernels::Attention<Layout>& kernels, CpuDtype dtype, const Layout& L,
                  const at::Tensor& grad_out, const at::Tensor& qkv, const void* pad, const at::Tensor& out,
                  const at::Tensor& lse, const at::Tensor& argmax, at::Tensor& grad_qkv, void* grad_pad) {
  const int64_t tasks = L.batch * L.heads * L.windows;
  const int64_t bytes = kernels.backward_workspace(dtype, L);
  const void* go = grad_out.const_data_ptr();
  const void* q = qkv.const_data_ptr();
  const void* o = out.const_data_ptr();
  const void* l = lse.const_data_ptr();
  const uint8_t* a = argmax.const_data_ptr<uint8_t>();
  void* gq = grad_qkv.mutable_data_ptr();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const auto scratch = workspace(bytes);
    kernels.backward(dtype, L, go, q, pad, o, l, a, gq, grad_pad, begin, end, scratch.get());
  });
}

// The backward gathers each pooled query from the q candidate its q_argmax byte names, so
// a byte at or past the candidate count (a q_argmax the forward did not make) would read
// another row or past qkv's end: refused, with the largest one found. (CUDA's kernels
// cannot raise without a host sync; they read such a candidate as 0.)
template <typename Layout>
void check_argmax_values(const char* op, const Layout& L, const at::Tensor& argmax) {
  if (L.candidate_count() == 1 || argmax.numel() == 0) return;
  const int64_t largest = argmax.max().item<uint8_t>();
  TORCH_CHECK(largest < L.candidate_count(), op, ": q_argmax must hold candidate indices in [0, ", L.candidate_count(),
              ") (the forward's query argmax), got ", largest);
}

at::Tensor empty_argmax(const at::Tensor& out, int64_t q_stride) {
  return q_stride > 1 ? at::empty(out.sizes(), out.options().dtype(at::kByte))
                      : at::empty({0}, out.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_unit_attention_cpu(const at::Tensor& qkv_in, int64_t heads,
                                                                       int64_t q_stride, int64_t windows) {
  constexpr const char* op = "hiera_kernels::mask_unit_attention";
  const AttentionLayout L = check_attention_args(op, qkv_in, heads, q_stride, windows);
  const CpuDtype dtype = cpu_dtype(op, qkv_in.scalar_type());
  const at::Tensor qkv = qkv_in.contiguous();
  at::Tensor out = at::empty({L.batch, L.queries * L.windows, L.dim}, qkv.options());
  at::Tensor lse = new_attention_lse(qkv, L);
  at::Tensor argmax = empty_argmax(out, q_stride);
  if (out.numel() > 0) run_forward(cpu_kernels().mask_unit_attention, dtype, L, qkv, nullptr, out, lse, argmax);
  return {out, lse, argmax};
}

at::Tensor mask_unit_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv_in,
                                            const at::Tensor& out, const at::Tensor& lse, const at::Tensor& argmax,
                                            int64_t heads, int64_t q_stride, int64_t windows) {
  constexpr const char* op = "hiera_kernels::mask_unit_attention_backward";
  const AttentionLayout L =
      check_attention_backward_args(op, grad_out, qkv_in, out, lse, argmax, heads, q_stride, windows);
  check_argmax_values(op, L, argmax);
  const CpuDtype dtype = cpu_dtype(op, qkv_in.scalar_type());
  const at::Tensor qkv = qkv_in.contiguous();
  at::Tensor grad_qkv = at::empty_like(qkv);  // every element is written once
  if (grad_qkv.numel() > 0)
    run_backward(cpu_kernels().mask_unit_attention, dtype, L, grad_out.contiguous(), qkv, nullptr, out.contiguous(),
                 lse.contiguous(), argmax.contiguous(), grad_qkv, nullptr);
  return grad_qkv;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& qkv_in, const at::Tensor& pad_in,
                                                                    int64_t heads, int64_t window_size,
                                                                    int64_t q_stride) {
  constexpr const char* op = "hiera_kernels::window_attention";
  const WindowLayout L = check_window_attention_args(op, qkv_in, pad_in, heads, window_size, q_stride);
  const CpuDtype dtype = cpu_dtype(op, qkv_in.scalar_type());
  const at::Tensor qkv = qkv_in.contiguous(), pad = pad_in.contiguous();
  at::Tensor out = at::empty({L.batch, L.out_h, L.out_w, L.dim}, qkv.options());
  at::Tensor lse = new_attention_lse(qkv, L);
  at::Tensor argmax = empty_argmax(out, q_stride);
  if (out.numel() > 0)
    run_forward(cpu_kernels().window_attention, dtype, L, qkv, pad.const_data_ptr(), out, lse, argmax);
  return {out, lse, argmax};
}

std::tuple<at::Tensor, at::Tensor> window_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv_in,
                                                                 const at::Tensor& pad_in, const at::Tensor& out,
                                                                 const at::Tensor& lse, const at::Tensor& argmax,
                                                                 int64_t heads, int64_t window_size,
                                                                 int64_t q_stride) {
  constexpr const char* op = "hiera_kernels::window_attention_backward";
  const WindowLayout L = check_window_attention_backward_args(op, grad_out, qkv_in, pad_in, out, lse, argmax, heads,
                                                              window_size, q_stride);
  check_argmax_values(op, L, argmax);
  const CpuDtype dtype = cpu_dtype(op, qkv_in.scalar_type());
  const at::Tensor qkv = qkv_in.contiguous(), pad = pad_in.contiguous();
  // Keys and values are written once each; q rows only where a stored query pools
  // from them, so an odd map's last row or column (no stored query reads it: MaxPool2d's
  // floor, or window_unpartition's crop) needs zeros.
  const bool every_query_row_written = L.out_h * q_stride == L.height && L.out_w * q_stride == L.width;
  at::Tensor grad_qkv = every_query_row_written ? at::empty_like(qkv) : at::zeros_like(qkv);
  // A padded key's dk and dv, summed per (b, window) [B, windows, 2, C] in the
  // accumulation type, then over every window: grad_pad = [0 (q: padded queries are
  // never stored), dk, dv].
  const bool padded = L.has_padding();
  at::Tensor partials = at::zeros({padded ? L.batch * L.windows : 0, 2 * L.dim}, lse.options());
  if (grad_qkv.numel() > 0)
    run_backward(cpu_kernels().window_attention, dtype, L, grad_out.contiguous(), qkv, pad.const_data_ptr(),
                 out.contiguous(), lse.contiguous(), argmax.contiguous(), grad_qkv,
                 padded ? partials.mutable_data_ptr() : nullptr);
  at::Tensor grad_pad = at::cat({at::zeros({L.dim}, partials.options()), partials.sum(0)}).to(pad.scalar_type());
  return {grad_qkv, grad_pad};
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CPU, m) {
  m.impl("mask_unit_attention", &mask_unit_attention_cpu);
  m.impl("mask_unit_attention_backward", &mask_unit_attention_backward_cpu);
  m.impl("window_attention", &window_attention_cpu);
  m.impl("window_attention_backward", &window_attention_backward_cpu);
}

}  // namespace hiera_kernels
