// The instruction set the CPU kernels' vector code runs with, and the
// dispatch to the copy of that code compiled for it.
//
// Each CPU kernel keeps its vector code in an "*_impl.h" file that
// cpu_isa_variants.h compiles once per instruction set, into namespaces
// avx512, avx2 and generic (GCC on x86-64; elsewhere only generic, for the
// build's own target). GetCpuIsa() picks one per process: the best set this
// CPU supports (AVX-512 F/VL/DQ/BW with AVX2 + FMA + BMI2, AVX2 + FMA +
// BMI2, or the baseline), capped by the environment variable
// TFREC_FAST_CPU_ISA=generic|avx2|avx512 (to test every code path on one
// machine; it never picks a set the CPU lacks). Every kernel family runs
// the same choice. TFREC_FAST_ISA_DISPATCH calls the chosen copy.
//
// Framework-free (std only).
#ifndef TFREC_FAST_KERNELS_CPU_ISA_H_
#define TFREC_FAST_KERNELS_CPU_ISA_H_

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The AVX-512 and AVX2 copies are compiled (with `#pragma GCC target`).
#define TFREC_FAST_X86_MULTI_ISA 1
#endif

namespace tfrec_fast {
namespace kernels {

enum class CpuIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// Detects the CPU's features and applies TFREC_FAST_CPU_ISA (uncached).
CpuIsa DetectCpuIsa();

// The instruction set of this process: DetectCpuIsa() once, then cached.
inline CpuIsa GetCpuIsa() {
  static const CpuIsa isa = DetectCpuIsa();
  return isa;
}

// "avx512", "avx2" or "generic".
const char* CpuIsaName(CpuIsa isa);

// Floats per vector of the copy compiled for `isa` (TFREC_ISA_W of
// cpu_isa_variants.h).
constexpr int CpuIsaVectorFloats(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? 16 : (isa == CpuIsa::kAvx2 ? 8 : 4);
}

}  // namespace kernels
}  // namespace tfrec_fast

// `return ns::<isa>::call;` for the GetCpuIsa() copy of the vector code in
// namespace `ns` (as compiled by cpu_isa_variants.h), e.g.
//   TFREC_FAST_ISA_DISPATCH(ra_impl, ForwardWorker(dims, args, plan, next));
#ifdef TFREC_FAST_X86_MULTI_ISA
#define TFREC_FAST_ISA_DISPATCH(ns, ...)            \
  switch (::tfrec_fast::kernels::GetCpuIsa()) {     \
    case ::tfrec_fast::kernels::CpuIsa::kAvx512:    \
      return ns::avx512::__VA_ARGS__;               \
    case ::tfrec_fast::kernels::CpuIsa::kAvx2:      \
      return ns::avx2::__VA_ARGS__;                 \
    default:                                        \
      return ns::generic::__VA_ARGS__;              \
  }
#else
#define TFREC_FAST_ISA_DISPATCH(ns, ...) return ns::generic::__VA_ARGS__
#endif

#endif  // TFREC_FAST_KERNELS_CPU_ISA_H_
