// Which build of the CPU kernels runs (cpu_kernels.h), chosen once per process in
// cpu_dispatch.cpp. Baseline code only.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace hiera_kernels {

struct CpuDispatchInfo {
  std::string path;                    // the build in use
  std::string aten;                    // ATen's capability (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY)
  std::vector<std::string> compiled;   // every build in the library, least to most capable
  std::vector<std::string> supported;  // the builds this CPU can run
  std::vector<std::string> missing;    // per compiled build, the CPU features it lacks ("" when none)
  std::string note;                    // why `path` is below the best this CPU and ATen allow, or empty
};

// Chosen on first use: the most capable build this CPU supports whose ATen level is at
// most ATen's. ATen obeys ATEN_CPU_CAPABILITY even where the CPU lacks the instructions;
// then this takes the best build the CPU has, warns once and says why in `note`.
// HIERA_KERNELS_CPU_BUILD=<name> caps the choice at that build (for builds ATen has no
// level of its own for, e.g. avx512 on a CPU that also runs avx512_bf16).
const CpuDispatchInfo& cpu_dispatch_info();
const CpuKernels& cpu_kernels();

// The rule alone, for tests: the build for ATen level `aten_level` given which builds
// the CPU supports (one flag per row of HIERA_KERNELS_CPU_CAPABILITIES).
int choose_cpu_build(int aten_level, const std::vector<bool>& supported);

// Scratch for one parallel_for chunk (the kernels take raw pointers; allocation stays
// in baseline code). Uninitialised: the kernels write every element before reading it.
inline std::unique_ptr<unsigned char[]> workspace(int64_t bytes) {
  return std::unique_ptr<unsigned char[]>(new unsigned char[bytes]);
}

inline CpuDtype cpu_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CpuDtype::kFloat32;
    case at::kDouble: return CpuDtype::kFloat64;
    case at::kHalf: return CpuDtype::kFloat16;
    case at::kBFloat16: return CpuDtype::kBFloat16;
    default: TORCH_CHECK(false, op, ": dtype ", t, " is not supported (float32, float16, bfloat16, float64)");
  }
}

// The kernels' accumulation type for a dtype (kernels_impl.h's acc_type): float64 for
// float64, float32 otherwise.
inline at::ScalarType accumulation_type(CpuDtype dtype) {
  return dtype == CpuDtype::kFloat64 ? at::kDouble : at::kFloat;
}

}  // namespace hiera_kernels
