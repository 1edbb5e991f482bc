// The CUDA kernels of custom_ops/kernels/kernel_sampler.cu.cc (the
// quadratic-kernel sampler's draws) and the harness's C ABI
// (kernel_sampler_capi.cc), compiled by g++ against cuda_emulation.h: a CPU
// build of the same sources (libtfrec_fast_kernel_sampler_emulated.so) that
// custom_ops/harness/kernel_sampler.py (--emulated) and
// tests/test_harness_kernel_sampler_cpu.py drive with NumPy arrays.
#include "custom_ops/harness/emulation/cuda_emulation.h"

#include "custom_ops/kernels/kernel_sampler.cu.cc"
#include "custom_ops/harness/kernel_sampler_capi.cc"

// The runtime calls the launchers make and the emulation's controls.
#include "custom_ops/harness/emulation/cuda_runtime_stubs.h"
