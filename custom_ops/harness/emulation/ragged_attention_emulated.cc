// The CUDA kernels of custom_ops/kernels/ragged_attention.cu.cc and the
// harness's C ABI, compiled by g++ against cuda_emulation.h: a CPU build of
// the same source (libtfrec_fast_kernels_emulated.so) that
// custom_ops/harness/ragged_attention.py drives with NumPy arrays
// (--emulated).
#include "custom_ops/harness/emulation/cuda_emulation.h"

#include "custom_ops/kernels/ragged_attention.cu.cc"
#include "custom_ops/harness/ragged_attention_capi.cc"

// The runtime calls the launchers make (TFREC_EMU_SHARED_BYTES: the shared
// memory a block may use, so that the 32-row fallback can be exercised
// too) and the emulation's controls.
#include "custom_ops/harness/emulation/cuda_runtime_stubs.h"
