// GPU kernels of TfrecFastCutCrossEntropy and TfrecFastCutCrossEntropyGrad
// (the ops, their shape functions and CPU kernels are in
// cut_cross_entropy_op.cc). Compiled by g++ with -DGOOGLE_CUDA=1 only when
// the GPU kernels are built; the CUDA code is in
// custom_ops/kernels/cut_cross_entropy.cu.cc (nvcc). Without GOOGLE_CUDA
// this file compiles to nothing, so CPU-only builds ignore it.
//
// Checks: the same shape checks, in the same order and with the same
// messages, as the CPU kernels (copied from cut_cross_entropy_op.cc, where
// they are file-local). Targets live in device memory: one scan kernel
// (validate_ids_gpu.h) finds the first id outside [0, C), its answer is
// copied back and the stream synchronised once per call, before the loss
// kernels are launched (so the host enqueues them while they run), and a
// bad id is the CPU kernel's InvalidArgument ("targets[i] = v is out of
// range [0, C) ..."). The kernels themselves never read out of bounds for a
// bad id (it reads as a NaN logit).
//
// Half and bfloat16 are read and written in their own type (float32 math
// inside, tensor cores on sm_80+); loss, logsumexp, item_bias and its
// gradient are float32. Workspace (split partials) comes from
// allocate_temp. The backward is deterministic (no atomics).
#if GOOGLE_CUDA

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "custom_ops/kernels/cut_cross_entropy_gpu.h"
#include "custom_ops/kernels/validate_ids_gpu.h"
#include "custom_ops/tf/validate_ids_message.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"
#include "xla/stream_executor/stream.h"
#include "xla/stream_executor/stream_executor.h"

namespace tensorflow {
namespace {

namespace tk = tfrec_fast::kernels;

template <typename T>
constexpr tk::CrossEntropyGpuType GpuType() {
  if constexpr (std::is_same<T, float>::value) {
    return tk::CrossEntropyGpuType::kFloat32;
  } else if constexpr (std::is_same<T, Eigen::half>::value) {
    return tk::CrossEntropyGpuType::kFloat16;
  } else {
    static_assert(std::is_same<T, bfloat16>::value, "float, half, bfloat16");
    return tk::CrossEntropyGpuType::kBFloat16;
  }
}

// As CheckInputs in cut_cross_entropy_op.cc (same order and messages).
Status CheckInputs(const Tensor& h, const Tensor& w, const Tensor& bias,
                   const Tensor& targets) {
  if (h.dims() != 2) {
    return errors::InvalidArgument("hidden must be a matrix [N, D], got shape ",
                                   h.shape().DebugString());
  }
  if (w.dims() != 2) {
    return errors::InvalidArgument(
        "item_table must be a matrix [C, D], got shape ",
        w.shape().DebugString());
  }
  if (h.dim_size(1) != w.dim_size(1)) {
    return errors::InvalidArgument(
        "hidden ", h.shape().DebugString(), " and item_table ",
        w.shape().DebugString(), " must have the same D (dimension 1)");
  }
  if (bias.dims() != 1 ||
      (bias.dim_size(0) != w.dim_size(0) && bias.dim_size(0) != 0)) {
    return errors::InvalidArgument(
        "item_bias must be [C] = [", w.dim_size(0),
        "] (dimension 0 of item_table) or [0] for no bias, got shape ",
        bias.shape().DebugString());
  }
  if (targets.dims() != 1 || targets.dim_size(0) != h.dim_size(0)) {
    return errors::InvalidArgument(
        "targets must be [N] = [", h.dim_size(0),
        "] (dimension 0 of hidden), got shape ", targets.shape().DebugString());
  }
  if (w.dim_size(0) == 0 && h.dim_size(0) > 0) {
    return errors::InvalidArgument(
        "item_table has no items (C = 0, shape ", w.shape().DebugString(),
        ") but hidden has N = ", h.dim_size(0),
        " rows: the softmax over an empty catalog is undefined");
  }
  return OkStatus();
}

struct GpuContext {
  cudaStream_t stream = nullptr;
  int device = -1;
};

Status GetGpuContext(OpKernelContext* ctx, const char* op, GpuContext* gpu) {
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

Status CudaStatus(cudaError_t err, const char* op) {
  if (err == cudaSuccess) return OkStatus();
  return errors::Internal(op, " GPU kernel failed: ", cudaGetErrorName(err),
                          ": ", cudaGetErrorString(err));
}

// The first target outside [0, C) as the CPU kernel's InvalidArgument:
// scans on the device, waits for the answer (one small copy).
Status CheckTargetsOnDevice(OpKernelContext* ctx, const char* op,
                            const GpuContext& gpu, const Tensor& targets,
                            int64_t num_items) {
  const int64_t n = targets.NumElements();
  if (n == 0) return OkStatus();
  Tensor scratch;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_INT64, TensorShape({}), &scratch));
  auto* slot = reinterpret_cast<unsigned long long*>(
      scratch.scalar<int64_t>().data());
  int64_t bad = n, bad_value = 0;
  cudaError_t err;
  if (targets.dtype() == DT_INT32) {
    err = tk::FindFirstOutOfRange<int32_t>(targets.flat<int32>().data(), n,
                                           num_items, slot, gpu.stream, &bad,
                                           &bad_value);
  } else {
    err = tk::FindFirstOutOfRange<int64_t>(targets.flat<int64_t>().data(), n,
                                           num_items, slot, gpu.stream, &bad,
                                           &bad_value);
  }
  TF_RETURN_IF_ERROR(CudaStatus(err, op));
  if (bad == n) return OkStatus();
  return tfrec_fast_internal::OutOfRangeError("targets", targets.shape(), bad,
                                              bad_value, num_items);
}

template <typename T>
tk::CutCrossEntropyGpuDims Dims(const Tensor& h, const Tensor& w,
                                const Tensor& bias, const Tensor& targets,
                                int device) {
  tk::CutCrossEntropyGpuDims d;
  d.num_rows = h.dim_size(0);
  d.num_items = w.dim_size(0);
  d.dim = h.dim_size(1);
  d.type = GpuType<T>();
  d.targets_int64 = targets.dtype() == DT_INT64;
  d.has_bias = bias.dim_size(0) > 0;
  d.device = device;
  return d;
}

Status AllocateWorkspace(OpKernelContext* ctx, const char* op,
                         const tk::CutCrossEntropyGpuDims& dims,
                         bool backward, Tensor* workspace, size_t* bytes) {
  TF_RETURN_IF_ERROR(CudaStatus(
      tk::CutCrossEntropyGpuWorkspaceBytes(dims, backward, bytes), op));
  return ctx->allocate_temp(
      DT_INT8, TensorShape({static_cast<int64_t>(std::max<size_t>(*bytes, 1))}),
      workspace);
}

template <typename T>
class CutCrossEntropyGpuOp : public OpKernel {
 public:
  explicit CutCrossEntropyGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    static constexpr char kOp[] = "TfrecFastCutCrossEntropy";
    const Tensor& h = ctx->input(0);
    const Tensor& w = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    const Tensor& targets = ctx->input(3);
    OP_REQUIRES_OK(ctx, CheckInputs(h, w, bias, targets));
    const int64_t n = h.dim_size(0);
    Tensor *loss = nullptr, *lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n}), &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n}), &lse));
    if (n == 0) return;
    GpuContext gpu;
    OP_REQUIRES_OK(ctx, GetGpuContext(ctx, kOp, &gpu));
    OP_REQUIRES_OK(ctx, CheckTargetsOnDevice(ctx, kOp, gpu, targets,
                                             w.dim_size(0)));
    const auto dims = Dims<T>(h, w, bias, targets, gpu.device);
    Tensor workspace;
    size_t bytes = 0;
    OP_REQUIRES_OK(ctx, AllocateWorkspace(ctx, kOp, dims, false, &workspace,
                                          &bytes));
    OP_REQUIRES_OK(
        ctx, CudaStatus(tk::CutCrossEntropyGpuForward(
                            dims, h.flat<T>().data(), w.flat<T>().data(),
                            dims.has_bias ? bias.flat<float>().data()
                                          : nullptr,
                            targets.dtype() == DT_INT32
                                ? static_cast<const void*>(
                                      targets.flat<int32>().data())
                                : static_cast<const void*>(
                                      targets.flat<int64_t>().data()),
                            loss->flat<float>().data(),
                            lse->flat<float>().data(),
                            workspace.flat<int8>().data(), bytes, gpu.stream),
                        kOp));
  }
};

template <typename T>
class CutCrossEntropyGradGpuOp : public OpKernel {
 public:
  explicit CutCrossEntropyGradGpuOp(OpKernelConstruction* ctx)
      : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    static constexpr char kOp[] = "TfrecFastCutCrossEntropyGrad";
    const Tensor& h = ctx->input(0);
    const Tensor& w = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    const Tensor& targets = ctx->input(3);
    const Tensor& lse = ctx->input(4);
    const Tensor& d_loss = ctx->input(5);
    OP_REQUIRES_OK(ctx, CheckInputs(h, w, bias, targets));
    const int64_t N = h.dim_size(0);
    OP_REQUIRES(ctx, lse.dims() == 1 && lse.dim_size(0) == N,
                errors::InvalidArgument(
                    "logsumexp must be [N] = [", N,
                    "] (dimension 0 of hidden), got shape ",
                    lse.shape().DebugString()));
    OP_REQUIRES(ctx, d_loss.dims() == 1 && d_loss.dim_size(0) == N,
                errors::InvalidArgument(
                    "d_loss must be [N] = [", N,
                    "] (dimension 0 of hidden), got shape ",
                    d_loss.shape().DebugString()));
    GpuContext gpu;
    OP_REQUIRES_OK(ctx, GetGpuContext(ctx, kOp, &gpu));
    OP_REQUIRES_OK(ctx, CheckTargetsOnDevice(ctx, kOp, gpu, targets,
                                             w.dim_size(0)));
    Tensor *dh = nullptr, *dw = nullptr, *db = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, h.shape(), &dh));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, w.shape(), &dw));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, bias.shape(), &db));
    const auto dims = Dims<T>(h, w, bias, targets, gpu.device);
    Tensor workspace;
    size_t bytes = 0;
    OP_REQUIRES_OK(ctx, AllocateWorkspace(ctx, kOp, dims, true, &workspace,
                                          &bytes));
    // N = 0 included: the launcher zeroes d_item_table and d_item_bias.
    OP_REQUIRES_OK(
        ctx, CudaStatus(tk::CutCrossEntropyGpuBackward(
                            dims, h.flat<T>().data(), w.flat<T>().data(),
                            dims.has_bias ? bias.flat<float>().data()
                                          : nullptr,
                            targets.dtype() == DT_INT32
                                ? static_cast<const void*>(
                                      targets.flat<int32>().data())
                                : static_cast<const void*>(
                                      targets.flat<int64_t>().data()),
                            lse.flat<float>().data(),
                            d_loss.flat<float>().data(),
                            dh->flat<T>().data(), dw->flat<T>().data(),
                            dims.has_bias ? db->flat<float>().data()
                                          : nullptr,
                            workspace.flat<int8>().data(), bytes, gpu.stream),
                        kOp));
  }
};

#define REGISTER_GPU(T)                                             \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastCutCrossEntropy")          \
                              .Device(DEVICE_GPU)                   \
                              .TypeConstraint<T>("T"),              \
                          CutCrossEntropyGpuOp<T>);                 \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastCutCrossEntropyGrad")      \
                              .Device(DEVICE_GPU)                   \
                              .TypeConstraint<T>("T"),              \
                          CutCrossEntropyGradGpuOp<T>);
REGISTER_GPU(float);
REGISTER_GPU(Eigen::half);
REGISTER_GPU(bfloat16);
#undef REGISTER_GPU

}  // namespace
}  // namespace tensorflow

#endif  // GOOGLE_CUDA
