// GPU kernels of TfrecFastCutCrossEntropy and TfrecFastCutCrossEntropyGrad
// (the ops, their shape functions and CPU kernels are in
// cut_cross_entropy_op.cc). Compiled by g++ with -DGOOGLE_CUDA=1 only when
// the GPU kernels are built; the CUDA code is in
// custom_ops/kernels/cut_cross_entropy.cu.cc (nvcc). Without GOOGLE_CUDA
// this file compiles to nothing, so CPU-only builds ignore it.
//
// Checks: the CPU kernels' shape checks (cut_cross_entropy_checks.h, same
// order and messages). Targets live in device memory: one scan kernel
// (gpu_op_util.h's DeviceIdRangeChecks) finds the first id outside [0, C),
// its answer is copied back and the stream synchronised once per call,
// before the loss kernels are launched (so the host enqueues them while
// they run), and a bad id is the CPU kernel's InvalidArgument ("targets[i]
// = v is out of range [0, C) ..."). The kernels themselves never read out
// of bounds for a bad id (it reads as a NaN logit).
//
// Half and bfloat16 are read and written in their own type (float32 math
// inside, tensor cores on sm_80+); loss, logsumexp, item_bias and its
// gradient are float32. Workspace (split partials) comes from
// allocate_temp. The backward is deterministic (no atomics).
#if GOOGLE_CUDA

#include <algorithm>
#include <cstdint>

#include "custom_ops/kernels/cut_cross_entropy_gpu.h"
#include "custom_ops/tf/cut_cross_entropy_checks.h"
#include "custom_ops/tf/gpu_op_util.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace {

namespace tk = tfrec_fast::kernels;
using tfrec_fast_internal::AllocateGpuWorkspace;
using tfrec_fast_internal::CheckCutCrossEntropyGradInputs;
using tfrec_fast_internal::CheckCutCrossEntropyInputs;
using tfrec_fast_internal::CudaStatus;
using tfrec_fast_internal::DeviceIdRangeChecks;
using tfrec_fast_internal::GetGpuContext;
using tfrec_fast_internal::GpuContext;
using tfrec_fast_internal::GpuTypeOf;
using tfrec_fast_internal::IdData;

// Checks the range of targets on the device: one scan, one synchronisation.
Status CheckTargets(OpKernelContext* ctx, const char* op,
                    const GpuContext& gpu, const Tensor& targets,
                    int64_t num_items) {
  DeviceIdRangeChecks checks(op, gpu);
  checks.Add(&targets);
  return checks.Check(ctx, targets, "targets", num_items);
}

template <typename T>
tk::CutCrossEntropyGpuDims Dims(const Tensor& h, const Tensor& w,
                                const Tensor& bias, const Tensor& targets,
                                int device) {
  tk::CutCrossEntropyGpuDims d;
  d.num_rows = h.dim_size(0);
  d.num_items = w.dim_size(0);
  d.dim = h.dim_size(1);
  d.type = GpuTypeOf<tk::CrossEntropyGpuType, T>();
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
  return AllocateGpuWorkspace(ctx, *bytes, workspace);
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
    OP_REQUIRES_OK(ctx, CheckCutCrossEntropyInputs(h, w, bias, targets));
    const int64_t n = h.dim_size(0);
    Tensor *loss = nullptr, *lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n}), &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n}), &lse));
    if (n == 0) return;
    GpuContext gpu;
    OP_REQUIRES_OK(ctx, GetGpuContext(ctx, kOp, &gpu));
    OP_REQUIRES_OK(ctx, CheckTargets(ctx, kOp, gpu, targets, w.dim_size(0)));
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
                            IdData(targets),
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
    OP_REQUIRES_OK(ctx, CheckCutCrossEntropyInputs(h, w, bias, targets));
    OP_REQUIRES_OK(ctx, CheckCutCrossEntropyGradInputs(h, lse, d_loss));
    GpuContext gpu;
    OP_REQUIRES_OK(ctx, GetGpuContext(ctx, kOp, &gpu));
    OP_REQUIRES_OK(ctx, CheckTargets(ctx, kOp, gpu, targets, w.dim_size(0)));
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
                            IdData(targets),
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
