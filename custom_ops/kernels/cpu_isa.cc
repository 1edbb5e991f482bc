// Run-time choice of the CPU kernels' instruction set; see cpu_isa.h.
#include "custom_ops/kernels/cpu_isa.h"

#include <cstdlib>
#include <string>

namespace tfrec_fast {
namespace kernels {

CpuIsa DetectCpuIsa() {
  CpuIsa best = CpuIsa::kGeneric;
#ifdef TFREC_FAST_X86_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi2")) {
    best = CpuIsa::kAvx2;
  }
  if (best == CpuIsa::kAvx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw")) {
    best = CpuIsa::kAvx512;
  }
#endif
  // TFREC_FAST_CPU_ISA=generic|avx2|avx512 caps the choice; it never picks
  // an unsupported one.
  const char* cap = std::getenv("TFREC_FAST_CPU_ISA");
  if (cap != nullptr) {
    const std::string want(cap);
    CpuIsa limit = best;
    if (want == "generic") limit = CpuIsa::kGeneric;
    if (want == "avx2") limit = CpuIsa::kAvx2;
    if (static_cast<int>(limit) < static_cast<int>(best)) best = limit;
  }
  return best;
}

const char* CpuIsaName(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

}  // namespace kernels
}  // namespace tfrec_fast
