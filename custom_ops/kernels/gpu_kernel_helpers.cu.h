// Helpers shared by the CUDA kernels (custom_ops/kernels/*.cu.cc): element
// conversions, warp reductions, the running log-sum-exp merge, dynamic
// shared memory, the first-bad-position search, and on the host: device scoping and attributes, the
// opt-in to large dynamic shared memory, workspace alignment and the
// dispatch on the element type.
//
// Framework-free (CUDA runtime only): included by the .cu.cc files that
// nvcc compiles into the TF op library and into the harness's standalone
// library, and by g++ against the harness's CPU emulation of CUDA
// (custom_ops/harness/emulation/cuda_emulation.h), which defines the hooks
// TFREC_KERNEL_LAUNCH and TFREC_EMULATED_SHARED before this header.
#ifndef TFREC_FAST_KERNELS_GPU_KERNEL_HELPERS_CU_H_
#define TFREC_FAST_KERNELS_GPU_KERNEL_HELPERS_CU_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

// Every kernel launch: kernel<<<grid, block, smem, stream>>>, unless the
// CPU emulation has its own.
#ifndef TFREC_KERNEL_LAUNCH
#define TFREC_KERNEL_LAUNCH(kernel, grid, block, smem, stream) \
  kernel<<<grid, block, smem, stream>>>
#endif

namespace tfrec_fast {
namespace kernels {
namespace gpu {

// Dynamic shared memory a kernel may use without opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------
// Device side.

// Element types (float, __half, __nv_bfloat16) to and from float32.
__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ids[i] of an int64 (is64 != 0) or int32 array.
__device__ __forceinline__ int64_t ReadId(const void* ids, int is64,
                                          int64_t i) {
  return is64 ? static_cast<const int64_t*>(ids)[i]
              : static_cast<int64_t>(static_cast<const int32_t*>(ids)[i]);
}

// The sum over the 32 lanes of a warp, in every lane (all must call it).
__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Merges the running log-sum-exp (m2, l2) into (m, l): the max of the
// logits seen and the sum of their exp(logit - max). m is never NaN (fmaxf
// drops NaN); a NaN logit lives in l.
__device__ __forceinline__ void MergeLse(float& m, float& l, float m2,
                                         float l2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) {
    l += l2;
    return;
  }
  l = l * exp2f((m - mm) * kLog2e) + l2 * exp2f((m2 - mm) * kLog2e);
  m = mm;
}

// The block's dynamic shared memory (16-byte aligned) as T*.
template <typename T>
__device__ __forceinline__ T* DynamicShared() {
#ifdef TFREC_EMULATED_SHARED
  return reinterpret_cast<T*>(TFREC_EMULATED_SHARED());
#else
  extern __shared__ float4 tfrec_dynamic_shared[];
  return reinterpret_cast<T*>(tfrec_dynamic_shared);
#endif
}

// The smallest position p < n with bad(p), published with atomicMin into
// *first_bad (set it to all bits, "none yet", before the launch). Each
// thread walks a grid-stride sequence of positions, which increases, so the
// first bad position a thread meets is its smallest: it publishes it and
// stops. Now and then (not every step: the all-good case is the common one
// and pays for each check) a thread also stops once a smaller bad position
// is already known. Call from every thread of a 1-D grid.
template <typename Bad>
__device__ __forceinline__ void FindFirstBad(int64_t n, const Bad& bad,
                                             unsigned long long* first_bad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int step = 0;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x +
                   threadIdx.x;
       p < n; p += stride, ++step) {
    if ((step & 15) == 15 &&
        static_cast<unsigned long long>(p) >=
            *static_cast<volatile unsigned long long*>(first_bad)) {
      return;
    }
    if (bad(p)) {
      atomicMin(first_bad, static_cast<unsigned long long>(p));
      return;
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

// Makes `device` current for the scope (if >= 0 and not already current).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (device < 0) return;
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) {
      status_ = cudaSetDevice(device);
      switched_ = status_ == cudaSuccess;
    }
  }
  ~DeviceScope() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;
  bool switched_ = false;
  cudaError_t status_ = cudaSuccess;
};

// *resolved = `device`, or the current device for device < 0.
inline cudaError_t ResolveDevice(int device, int* resolved) {
  *resolved = device;
  return device < 0 ? cudaGetDevice(resolved) : cudaSuccess;
}

// *value = attribute `attr` of `device` (< 0: the current device).
inline cudaError_t DeviceAttribute(int device, cudaDeviceAttr attr,
                                   int* value) {
  int dev = 0;
  const cudaError_t err = ResolveDevice(device, &dev);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(value, attr, dev);
}

// Lets `kernel` use `smem` bytes of dynamic shared memory (an opt-in past
// kDefaultSharedBytes); call before launching it with that much.
template <typename Kernel>
cudaError_t AllowDynamicShared(Kernel kernel, size_t smem) {
  if (smem <= kDefaultSharedBytes) return cudaSuccess;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

// `x` rounded up to 256 bytes (workspace offsets).
inline size_t AlignBytes(size_t x) { return (x + 255) / 256 * 256; }

// fn(T{}) for the element type `type` names (an enum with kFloat32,
// kFloat16, kBFloat16: float, __half, __nv_bfloat16); cudaErrorInvalidValue
// for any other value.
template <typename TypeEnum, typename Fn>
cudaError_t DispatchType(TypeEnum type, Fn&& fn) {
  switch (type) {
    case TypeEnum::kFloat32: return fn(float{});
    case TypeEnum::kFloat16: return fn(__half{});
    case TypeEnum::kBFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_GPU_KERNEL_HELPERS_CU_H_
