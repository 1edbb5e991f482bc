// The CUDA runtime calls the kernels' launchers make, for one emulated
// device, and the emulation's controls: what the emulated kernel libraries
// (ragged_attention_emulated.cc, cross_entropy_emulated.cc) link instead of
// a CUDA runtime. NOT a normal header: each of those .cc files includes it
// once, after cuda_emulation.h and the sources it emulates.
//
// Device attributes from the environment: TFREC_EMU_SHARED_BYTES (shared
// memory per block, default an H100's 227 KiB), TFREC_EMU_SM_COUNT
// (default 2: few SMs, so that split partials are exercised),
// TFREC_EMU_CC_MAJOR (default 9; below 8 the half types of the
// cross-entropy kernels take the SIMT path). The stubs are hidden, and the
// libraries are linked -Bsymbolic, so that a CUDA runtime already in the
// process (TensorFlow exports one) does not take these calls.
#ifndef TFREC_FAST_HARNESS_EMULATION_CUDA_RUNTIME_STUBS_H_
#define TFREC_FAST_HARNESS_EMULATION_CUDA_RUNTIME_STUBS_H_

#include <cstdlib>
#include <cstring>

#include "custom_ops/harness/emulation/cuda_emulation.h"

#define TFREC_EMU_STUB __attribute__((visibility("hidden")))
extern "C" {

namespace {
int EnvInt(const char* name, int fallback) {
  const char* env = std::getenv(name);
  return env != nullptr ? std::atoi(env) : fallback;
}
}  // namespace

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
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = EnvInt("TFREC_EMU_SHARED_BYTES", 232448);
      break;
    case cudaDevAttrMultiProcessorCount:
      *value = EnvInt("TFREC_EMU_SM_COUNT", 2);
      break;
    case cudaDevAttrComputeCapabilityMajor:
      *value = EnvInt("TFREC_EMU_CC_MAJOR", 9);
      break;
    default:
      break;
  }
  return cudaSuccess;
}

TFREC_EMU_STUB cudaError_t cudaFuncSetAttribute(const void* /*func*/,
                                                cudaFuncAttribute /*attr*/,
                                                int /*value*/) {
  return cudaSuccess;
}

TFREC_EMU_STUB cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count,
                                           cudaStream_t /*stream*/) {
  std::memset(ptr, value, count);
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

// Byte every block's shared memory starts with (0 or 0xFF: NaN floats).
__attribute__((visibility("default"))) void tfrec_emu_set_shared_fill(
    int byte) {
  tfrec_emu::SharedFillByte() = byte & 0xFF;
}

}  // extern "C"

#endif  // TFREC_FAST_HARNESS_EMULATION_CUDA_RUNTIME_STUBS_H_
