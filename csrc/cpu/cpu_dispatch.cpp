// Run-time choice of the CPU kernels' build (cpu_kernels.h), as ATen's DispatchStub
// chooses its own: from the CPU's features and ATen's capability.
//
// ATen's capability comes from at::get_cpu_capability() (ATen/Version.h, the exported
// form of at::native::get_cpu_capability(), which is not exported): it reads
// ATEN_CPU_CAPABILITY and cpuinfo once per process, so both libraries agree. ATen
// trusts that variable even where the CPU lacks the instructions, so each build's own
// features are checked here too (__builtin_cpu_supports: CPUID and the OS's saved
// vector state), and a build the CPU lacks is never chosen.
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "cpu_dispatch.h"

namespace hiera_kernels {
namespace {

struct Build {
  const char* name;
  int aten_level;
  const char* target;
  const CpuKernels* kernels;
};

#define HIERA_KERNELS_BUILD_ROW(name, level, target) {#name, level, target, &cpu_##name::kernels},
constexpr Build kBuilds[] = {HIERA_KERNELS_CPU_CAPABILITIES(HIERA_KERNELS_BUILD_ROW)};
#undef HIERA_KERNELS_BUILD_ROW
constexpr int kNumBuilds = sizeof(kBuilds) / sizeof(kBuilds[0]);

// __builtin_cpu_supports takes only string literals: every feature a GCC target in the
// table may name. A new feature fails loudly on first use, not silently.
bool cpu_has(const std::string& feature) {
#define HIERA_KERNELS_FEATURE(f) \
  if (feature == f) return __builtin_cpu_supports(f);
  HIERA_KERNELS_FEATURE("avx2")
  HIERA_KERNELS_FEATURE("fma")
  HIERA_KERNELS_FEATURE("f16c")
  HIERA_KERNELS_FEATURE("avx512f")
  HIERA_KERNELS_FEATURE("avx512bw")
  HIERA_KERNELS_FEATURE("avx512vl")
  HIERA_KERNELS_FEATURE("avx512dq")
  HIERA_KERNELS_FEATURE("avx512bf16")
  HIERA_KERNELS_FEATURE("amx-tile")
  HIERA_KERNELS_FEATURE("amx-bf16")
#undef HIERA_KERNELS_FEATURE
  TORCH_CHECK(false, "hiera_kernels: cpu_dispatch.cpp cannot test the CPU for '", feature,
              "': add it to cpu_has()");
}

// The features of `target` ("avx2,fma,f16c") that this CPU lacks.
std::vector<std::string> missing_features(const std::string& target) {
  std::vector<std::string> missing;
  size_t start = 0;
  while (start < target.size()) {
    size_t end = target.find(',', start);
    if (end == std::string::npos) end = target.size();
    const std::string feature = target.substr(start, end - start);
    if (!cpu_has(feature)) missing.push_back(feature);
    start = end + 1;
  }
  return missing;
}

// "NO AVX" / "DEFAULT" / "AVX2" / "AVX512" (x86 builds of ATen) -> 0 / 0 / 1 / 2.
int aten_level(const std::string& aten) {
  if (aten == "AVX512") return 2;
  if (aten == "AVX2") return 1;
  if (aten == "DEFAULT" || aten == "NO AVX") return 0;
  TORCH_CHECK(false, "hiera_kernels: unknown ATen CPU capability '", aten,
              "' (the CPU kernels are built for x86-64)");
}

CpuDispatchInfo choose() {
  __builtin_cpu_init();
  CpuDispatchInfo info;
  info.aten = at::get_cpu_capability();
  const int level = aten_level(info.aten);
  std::vector<bool> supported;
  std::vector<std::vector<std::string>> missing;
  for (const Build& b : kBuilds) {
    missing.push_back(missing_features(b.target));
    supported.push_back(missing.back().empty());
    info.compiled.push_back(b.name);
    if (supported.back()) info.supported.push_back(b.name);
    std::string lacks;
    for (const std::string& f : missing.back()) lacks += (lacks.empty() ? "" : ",") + f;
    info.missing.push_back(lacks);
  }
  // HIERA_KERNELS_CPU_BUILD caps the choice: builds after its row count as unsupported.
  std::vector<bool> allowed = supported;
  if (const char* cap = std::getenv("HIERA_KERNELS_CPU_BUILD"); cap != nullptr && *cap != '\0') {
    int row = -1;
    for (int i = 0; i < kNumBuilds; ++i)
      if (std::string(cap) == kBuilds[i].name) row = i;
    std::string names;
    for (const Build& b : kBuilds) names += std::string(names.empty() ? "" : ", ") + b.name;
    TORCH_CHECK(row >= 0, "hiera_kernels: HIERA_KERNELS_CPU_BUILD=", cap, " is not a build of the CPU kernels (",
                names, ")");
    for (int i = row + 1; i < kNumBuilds; ++i) allowed[i] = false;
    info.note = std::string("HIERA_KERNELS_CPU_BUILD=") + cap + " caps the choice";
  }
  const int chosen = choose_cpu_build(level, allowed);
  info.path = kBuilds[chosen].name;
  const int unconstrained = choose_cpu_build(level, supported);
  if (kBuilds[unconstrained].aten_level < level) {  // ATEN_CPU_CAPABILITY asked for more than the CPU has
    std::string lacks;
    for (int i = 0; i < kNumBuilds; ++i) {
      if (kBuilds[i].aten_level <= kBuilds[unconstrained].aten_level || kBuilds[i].aten_level > level) continue;
      lacks += std::string(lacks.empty() ? "" : "; ") + kBuilds[i].name + " needs";
      for (const std::string& f : missing[i]) lacks += " " + f;
    }
    info.note = (info.note.empty() ? "" : info.note + "; ") + "ATen's capability is " + info.aten +
                " but this CPU lacks it (" + lacks + "): running " + info.path;
    TORCH_WARN("hiera_kernels: ", info.note, ". ATEN_CPU_CAPABILITY asks for more than this CPU has; ATen's own "
               "kernels may fail with an illegal instruction.");
  }
  return info;
}

}  // namespace

int choose_cpu_build(int aten_level, const std::vector<bool>& supported) {
  TORCH_CHECK(static_cast<int>(supported.size()) == kNumBuilds, "choose_cpu_build: ", supported.size(),
              " flags for ", kNumBuilds, " builds");
  TORCH_CHECK(supported[0], "choose_cpu_build: the default build runs on every x86-64 CPU");
  int chosen = 0;
  for (int i = 0; i < kNumBuilds; ++i) {
    if (kBuilds[i].aten_level <= aten_level && supported[i]) chosen = i;
  }
  return chosen;
}

const CpuDispatchInfo& cpu_dispatch_info() {
  static const CpuDispatchInfo info = choose();
  return info;
}

const CpuKernels& cpu_kernels() {
  static const CpuKernels& kernels = [] {
    const std::string& path = cpu_dispatch_info().path;
    for (const Build& b : kBuilds) {
      if (path == b.name) return *b.kernels;
    }
    TORCH_INTERNAL_ASSERT(false, "hiera_kernels: chose an unknown CPU build ", path);
  }();
  return kernels;
}

}  // namespace hiera_kernels
