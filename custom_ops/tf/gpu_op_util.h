// Helpers of the GPU OpKernels (custom_ops/tf/*_op_gpu.cc): the op's CUDA
// stream and device, CUDA errors as Status, the kernels' element-type enum
// for T, device workspace, and range checks of id tensors in device memory
// worded as the CPU kernels word them. Compiled only with GOOGLE_CUDA (as
// the files that include it); empty otherwise.
#ifndef TFREC_FAST_TF_GPU_OP_UTIL_H_
#define TFREC_FAST_TF_GPU_OP_UTIL_H_

#if GOOGLE_CUDA

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "custom_ops/kernels/validate_ids_gpu.h"
#include "custom_ops/tf/validate_ids_message.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"
#include "xla/stream_executor/stream.h"
#include "xla/stream_executor/stream_executor.h"

namespace tensorflow {
namespace tfrec_fast_internal {

// The op's CUDA stream and device ordinal.
struct GpuContext {
  cudaStream_t stream = nullptr;
  int device = -1;
};

// The stream and device of the op's GPU device context; Internal
// "<op>: no GPU stream" without one.
inline Status GetGpuContext(OpKernelContext* ctx, const char* op,
                            GpuContext* gpu) {
  auto* device_context = ctx->op_device_context();
  if (device_context == nullptr || device_context->stream() == nullptr) {
    return errors::Internal(op, ": no GPU stream");
  }
  se::Stream* stream = device_context->stream();
  gpu->stream =
      static_cast<cudaStream_t>(stream->platform_specific_handle().stream);
  gpu->device = stream->parent()->device_ordinal();
  return OkStatus();
}

// OkStatus for cudaSuccess, else Internal "<op> GPU kernel failed: ...".
inline Status CudaStatus(cudaError_t err, const char* op) {
  if (err == cudaSuccess) return OkStatus();
  return errors::Internal(op, " GPU kernel failed: ", cudaGetErrorName(err),
                          ": ", cudaGetErrorString(err));
}

// The kernels' element type for T (float, Eigen::half, bfloat16): the
// enumerator kFloat32, kFloat16 or kBFloat16 of `GpuTypeEnum`.
template <typename GpuTypeEnum, typename T>
constexpr GpuTypeEnum GpuTypeOf() {
  if constexpr (std::is_same<T, float>::value) {
    return GpuTypeEnum::kFloat32;
  } else if constexpr (std::is_same<T, Eigen::half>::value) {
    return GpuTypeEnum::kFloat16;
  } else {
    static_assert(std::is_same<T, bfloat16>::value, "float, half, bfloat16");
    return GpuTypeEnum::kBFloat16;
  }
}

// The data of an int32 or int64 id tensor, untyped (the kernels take the
// width as a flag).
inline const void* IdData(const Tensor& t) {
  return t.dtype() == DT_INT32
             ? static_cast<const void*>(t.flat<int32>().data())
             : static_cast<const void*>(t.flat<int64_t>().data());
}

// A device workspace of `bytes` bytes (at least one).
inline Status AllocateGpuWorkspace(OpKernelContext* ctx, size_t bytes,
                                   Tensor* workspace) {
  return ctx->allocate_temp(
      DT_INT8, TensorShape({static_cast<int64_t>(std::max<size_t>(bytes, 1))}),
      workspace);
}

// Range checks of up to kMaxTensors id tensors (int32 / int64, any shape,
// device memory) against [0, C), answered together: the first Check scans
// every added tensor (validate_ids_gpu.h's kernel, one launch each) and
// waits once for all the answers; each Check then reports its tensor's
// first id outside [0, C) as the CPU kernels' InvalidArgument (copying
// that id back). Empty tensors are not scanned.
class DeviceIdRangeChecks {
 public:
  static constexpr int kMaxTensors = 3;

  DeviceIdRangeChecks(const char* op, const GpuContext& gpu)
      : op_(op), gpu_(gpu) {}

  // Adds `ids` (kept by pointer) to the scans; before the first Check.
  void Add(const Tensor* ids) {
    DCHECK_LT(count_, kMaxTensors);
    tensors_[count_++] = ids;
  }

  // OkStatus if every id of `ids` (an added tensor) lies in
  // [0, num_items); else the first bad one, named `name`.
  Status Check(OpKernelContext* ctx, const Tensor& ids,
               const std::string& name, int64_t num_items) {
    if (!scanned_) {
      TF_RETURN_IF_ERROR(Scan(ctx, num_items));
      scanned_ = true;
    }
    int i = 0;
    while (i < count_ && tensors_[i] != &ids) ++i;
    if (i == count_) {
      return errors::Internal(op_, ": ", name, " was not scanned");
    }
    const int64_t n = ids.NumElements();
    if (n == 0 || found_[i] >= static_cast<unsigned long long>(n)) {
      return OkStatus();
    }
    const int64_t bad = static_cast<int64_t>(found_[i]);
    int64_t value = 0;
    cudaError_t err;
    if (ids.dtype() == DT_INT32) {
      int32 v = 0;
      err = cudaMemcpyAsync(&v, ids.flat<int32>().data() + bad, sizeof(v),
                            cudaMemcpyDeviceToHost, gpu_.stream);
      if (err == cudaSuccess) err = cudaStreamSynchronize(gpu_.stream);
      value = v;
    } else {
      err = cudaMemcpyAsync(&value, ids.flat<int64_t>().data() + bad,
                            sizeof(value), cudaMemcpyDeviceToHost,
                            gpu_.stream);
      if (err == cudaSuccess) err = cudaStreamSynchronize(gpu_.stream);
    }
    TF_RETURN_IF_ERROR(CudaStatus(err, op_));
    return OutOfRangeError(name, ids.shape(), bad, value, num_items);
  }

 private:
  // Launches the scans of the non-empty tensors, copies the answers back,
  // waits.
  Status Scan(OpKernelContext* ctx, int64_t num_items) {
    bool any = false;
    for (int i = 0; i < count_; ++i) any |= tensors_[i]->NumElements() > 0;
    if (!any) return OkStatus();
    Tensor scratch;
    TF_RETURN_IF_ERROR(
        ctx->allocate_temp(DT_INT64, TensorShape({count_}), &scratch));
    auto* slots =
        reinterpret_cast<unsigned long long*>(scratch.flat<int64_t>().data());
    for (int i = 0; i < count_; ++i) {
      const Tensor& t = *tensors_[i];
      const int64_t n = t.NumElements();
      if (n == 0) continue;
      const cudaError_t err =
          t.dtype() == DT_INT32
              ? tfrec_fast::kernels::LaunchFirstOutOfRange<int32_t>(
                    t.flat<int32>().data(), n, num_items, slots + i,
                    gpu_.stream)
              : tfrec_fast::kernels::LaunchFirstOutOfRange<int64_t>(
                    t.flat<int64_t>().data(), n, num_items, slots + i,
                    gpu_.stream);
      TF_RETURN_IF_ERROR(CudaStatus(err, op_));
    }
    cudaError_t err =
        cudaMemcpyAsync(found_, slots, sizeof(unsigned long long) * count_,
                        cudaMemcpyDeviceToHost, gpu_.stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(gpu_.stream);
    return CudaStatus(err, op_);
  }

  const char* op_;
  GpuContext gpu_;
  const Tensor* tensors_[kMaxTensors] = {nullptr, nullptr, nullptr};
  unsigned long long found_[kMaxTensors] = {0, 0, 0};
  int count_ = 0;
  bool scanned_ = false;
};

}  // namespace tfrec_fast_internal
}  // namespace tensorflow

#endif  // GOOGLE_CUDA

#endif  // TFREC_FAST_TF_GPU_OP_UTIL_H_
