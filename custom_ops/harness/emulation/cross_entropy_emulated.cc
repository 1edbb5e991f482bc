// The CUDA kernels of custom_ops/kernels/cut_cross_entropy.cu.cc and
// cce_minus.cu.cc and the harness's C ABI (cross_entropy_capi.cc), compiled
// by g++ against cuda_emulation.h: a CPU build of the same sources
// (libtfrec_fast_cross_entropy_emulated.so) that
// custom_ops/harness/cross_entropy.py drives with NumPy arrays (--emulated).
#include "custom_ops/harness/emulation/cuda_emulation.h"

#include "custom_ops/kernels/cut_cross_entropy.cu.cc"
#include "custom_ops/kernels/cce_minus.cu.cc"
#include "custom_ops/harness/cross_entropy_capi.cc"

// The runtime calls the launchers make (TFREC_EMU_SHARED_BYTES,
// TFREC_EMU_SM_COUNT, TFREC_EMU_CC_MAJOR) and the emulation's controls.
#include "custom_ops/harness/emulation/cuda_runtime_stubs.h"
