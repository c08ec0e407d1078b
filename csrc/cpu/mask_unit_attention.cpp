// CPU entry points of mask-unit attention with fused query pooling, forward and
// backward: argument checks (attention_checks.h, shared with CUDA), allocation, the
// split into tasks, and per-chunk workspace; the flash-style kernels themselves are
// the chosen build's (kernels_impl.h, cpu_kernels.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <memory>
#include <tuple>

#include "cpu_dispatch.h"
#include "hiera_kernels/attention_checks.h"

namespace hiera_kernels {
namespace {

// Scratch for one parallel_for chunk (the kernels take raw pointers; allocation stays
// in baseline code). Uninitialised: the kernels write every tile before reading it.
std::unique_ptr<unsigned char[]> workspace(int64_t bytes) {
  return std::unique_ptr<unsigned char[]>(new unsigned char[bytes]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_unit_attention_cpu(const at::Tensor& qkv_in, int64_t heads,
                                                                       int64_t q_stride, int64_t windows) {
  constexpr const char* op = "hiera_kernels::mask_unit_attention";
  const AttentionLayout L = check_attention_args(op, qkv_in, heads, q_stride, windows);
  const CpuDtype dtype = cpu_dtype(op, qkv_in.scalar_type());
  const at::Tensor qkv = qkv_in.contiguous();
  at::Tensor out = at::empty({L.batch, L.queries * L.windows, L.dim}, qkv.options());
  at::Tensor lse = at::empty({L.batch, L.heads, L.windows, L.queries},
                             qkv.options().dtype(attention_lse_dtype(qkv.scalar_type())));
  at::Tensor argmax = q_stride > 1 ? at::empty({L.batch, L.queries * L.windows, L.dim}, qkv.options().dtype(at::kByte))
                                   : at::empty({0}, qkv.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, lse, argmax};
  // Keys that fit one block are loaded once for all of a window's queries; longer
  // sequences split the queries into blocks (more tasks, keys re-read per block).
  const int64_t block_rows = L.per_window <= kKeyBlock ? L.queries : kQueryBlock;
  const int64_t query_blocks = (L.queries + block_rows - 1) / block_rows;
  const int64_t tasks = L.batch * L.heads * L.windows * query_blocks;
  const CpuKernels& kernels = cpu_kernels();
  const int64_t bytes = kernels.attention_forward_workspace(dtype, L, block_rows);
  const void* q = qkv.const_data_ptr();
  void* o = out.mutable_data_ptr();
  void* l = lse.mutable_data_ptr();
  uint8_t* a = argmax.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const auto scratch = workspace(bytes);
    kernels.mask_unit_attention(dtype, L, q, o, l, a, block_rows, begin, end, scratch.get());
  });
  return {out, lse, argmax};
}

at::Tensor mask_unit_attention_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& qkv_in,
                                            const at::Tensor& out_in, const at::Tensor& lse_in,
                                            const at::Tensor& argmax_in, int64_t heads, int64_t q_stride,
                                            int64_t windows) {
  constexpr const char* op = "hiera_kernels::mask_unit_attention_backward";
  const AttentionLayout L =
      check_attention_backward_args(op, grad_out_in, qkv_in, out_in, lse_in, argmax_in, heads, q_stride, windows);
  const CpuDtype dtype = cpu_dtype(op, qkv_in.scalar_type());
  const at::Tensor qkv = qkv_in.contiguous(), grad_out = grad_out_in.contiguous();
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous(), argmax = argmax_in.contiguous();
  at::Tensor grad_qkv = at::empty_like(qkv);  // every element is written once
  if (grad_qkv.numel() == 0) return grad_qkv;
  const int64_t tasks = L.batch * L.heads * L.windows;
  const CpuKernels& kernels = cpu_kernels();
  const int64_t bytes = kernels.attention_backward_workspace(dtype, L);
  const void* go = grad_out.const_data_ptr();
  const void* q = qkv.const_data_ptr();
  const void* o = out.const_data_ptr();
  const void* l = lse.const_data_ptr();
  const uint8_t* a = argmax.const_data_ptr<uint8_t>();
  void* gq = grad_qkv.mutable_data_ptr();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const auto scratch = workspace(bytes);
    kernels.mask_unit_attention_backward(dtype, L, go, q, o, l, a, gq, begin, end, scratch.get());
  });
  return grad_qkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(hiera_kernels, CPU, m) {
  m.impl("mask_unit_attention", &mask_unit_attention_cpu);
  m.impl("mask_unit_attention_backward", &mask_unit_attention_backward_cpu);
}

}  // namespace hiera_kernels
