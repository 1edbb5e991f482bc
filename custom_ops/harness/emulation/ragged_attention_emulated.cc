// The CUDA kernels of custom_ops/kernels/ragged_attention.cu.cc and the
// harness's C ABI, compiled by g++ against cuda_emulation.h: a CPU build of
// the same source (libtfrec_fast_kernels_emulated.so, see build.sh here)
// that the harness drives with NumPy arrays (--emulated).
#include "custom_ops/harness/emulation/cuda_emulation.h"

#include <cstdlib>

#include "custom_ops/kernels/ragged_attention.cu.cc"
#include "custom_ops/harness/ragged_attention_capi.cc"

// The CUDA runtime calls the launchers make, for one emulated device. The
// shared memory a block may use is TFREC_EMU_SHARED_BYTES (default: an
// H100's 227 KiB), so the 32-row fallback can be exercised too. Hidden (and
// the library is linked -Bsymbolic), so that a CUDA runtime already in the
// process (TensorFlow exports one) does not take these calls.
#define TFREC_EMU_STUB __attribute__((visibility("hidden")))
extern "C" {

TFREC_EMU_STUB cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

TFREC_EMU_STUB cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}

TFREC_EMU_STUB cudaError_t cudaDeviceGetAttribute(int* value,
                                                  cudaDeviceAttr attr,
                                                  int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  *value = 0;
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    const char* env = std::getenv("TFREC_EMU_SHARED_BYTES");
    *value = env != nullptr ? std::atoi(env) : 232448;
  }
  return cudaSuccess;
}

TFREC_EMU_STUB cudaError_t cudaFuncSetAttribute(const void* /*func*/,
                                                cudaFuncAttribute /*attr*/,
                                                int /*value*/) {
  return cudaSuccess;
}

TFREC_EMU_STUB cudaError_t cudaGetLastError(void) { return cudaSuccess; }

TFREC_EMU_STUB const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "emulated CUDA error";
  }
}

// Order in which the emulation resumes a block's threads (Schedule):
// 0 round robin, 1 lowest first, 2 highest first. Returns 0, or 1 for an
// unknown value.
__attribute__((visibility("default"))) int tfrec_emu_set_schedule(
    int schedule) {
  if (schedule < 0 || schedule > 2) return 1;
  tfrec_emu::CurrentSchedule() = static_cast<tfrec_emu::Schedule>(schedule);
  return 0;
}

}  // extern "C"
