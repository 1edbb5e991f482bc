// Compiles one CPU kernel's vector code once per instruction set (see
// cpu_isa.h). NOT a normal header: a kernel's .cc includes it inside the
// namespace that is to hold the copies, with
//   TFREC_ISA_IMPL  the "*_impl.h" to compile, as an include path string,
// defined. It includes that file once per instruction set, each time with
//   TFREC_ISA_NS  the namespace of the copy: avx512, avx2 or generic,
//   TFREC_ISA_W   floats per vector: 16, 8 or 4,
//   TFREC_ISA_R   rows of the register tiles: 8, 4 or 4,
// defined: avx512 and avx2 inside `#pragma GCC target` regions (GCC on
// x86-64 only, TFREC_FAST_X86_MULTI_ISA), generic for the build's own
// target (SSE2 on x86-64, NEON on arm64, ...). TFREC_FAST_ISA_DISPATCH
// (cpu_isa.h) calls the copy GetCpuIsa() names. No include guard on
// purpose; TFREC_ISA_IMPL is undefined afterwards.
//
// Example (ragged_attention.cc):
//   namespace ra_impl {
//   #define TFREC_ISA_IMPL "custom_ops/kernels/ragged_attention_impl.h"
//   #include "custom_ops/kernels/cpu_isa_variants.h"
//   }  // namespace ra_impl

#ifndef TFREC_ISA_IMPL
#error "define TFREC_ISA_IMPL (the *_impl.h to compile) first"
#endif

#ifdef TFREC_FAST_X86_MULTI_ISA
static_assert(::tfrec_fast::kernels::CpuIsaVectorFloats(
                  ::tfrec_fast::kernels::CpuIsa::kAvx512) == 16 &&
                  ::tfrec_fast::kernels::CpuIsaVectorFloats(
                      ::tfrec_fast::kernels::CpuIsa::kAvx2) == 8,
              "vector widths of cpu_isa.h");

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi,bmi2")
#define TFREC_ISA_NS avx512
#define TFREC_ISA_W 16
#define TFREC_ISA_R 8
#include TFREC_ISA_IMPL
#undef TFREC_ISA_NS
#undef TFREC_ISA_W
#undef TFREC_ISA_R
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2")
#define TFREC_ISA_NS avx2
#define TFREC_ISA_W 8
#define TFREC_ISA_R 4
#include TFREC_ISA_IMPL
#undef TFREC_ISA_NS
#undef TFREC_ISA_W
#undef TFREC_ISA_R
#pragma GCC pop_options
#endif  // TFREC_FAST_X86_MULTI_ISA

static_assert(::tfrec_fast::kernels::CpuIsaVectorFloats(
                  ::tfrec_fast::kernels::CpuIsa::kGeneric) == 4,
              "vector width of cpu_isa.h");
#define TFREC_ISA_NS generic
#define TFREC_ISA_W 4
#define TFREC_ISA_R 4
#include TFREC_ISA_IMPL
#undef TFREC_ISA_NS
#undef TFREC_ISA_W
#undef TFREC_ISA_R

#undef TFREC_ISA_IMPL
