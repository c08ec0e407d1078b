// Checks of one tensor argument of a raw op (dtype, shape, device), with messages that
// name the op, the argument and the numbers. Used by the shared host checks
// (geometry.h, pool_args.h, attention_checks.h), which both the CPU and the CUDA entry
// points run.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace hiera_kernels {

// torch's spelling of the dtypes the ops take ("float32", "uint8"), else ATen's.
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kByte: return "uint8";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

// The floating dtypes every kernel backend computes in.
inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, op, ": ", name,
              " has dtype ", dtype_name(s), ", not one of float32, float16, bfloat16, float64");
}

// `t` must have dtype `expected`; `why` says where that comes from ("like qkv").
inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType expected,
                        const char* why = "") {
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must be ", dtype_name(expected), why, ", got ",
              dtype_name(t.scalar_type()));
}

inline void check_dims(const char* op, const char* name, const at::Tensor& t, int64_t dims, const char* layout) {
  TORCH_CHECK(t.dim() == dims, op, ": ", name, " must be ", layout, ", got ", t.dim(), " dims ", t.sizes());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// Every tensor an op reads must be where its main input is: the dispatcher picks the
// kernel from any one of them.
inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* main_name,
                              const at::Tensor& main) {
  TORCH_CHECK(t.device() == main.device(), op, ": ", name, " must be on ", main_name, "'s device ", main.device(),
              ", got one on ", t.device());
}

}  // namespace hiera_kernels
