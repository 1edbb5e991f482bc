// GPU kernels of TfrecFastCceMinus and TfrecFastCceMinusGrad (the ops,
// their shape functions and CPU kernels are in cce_minus_op.cc). Compiled
// by g++ with -DGOOGLE_CUDA=1 only when the GPU kernels are built; the CUDA
// code is in custom_ops/kernels/cce_minus.cu.cc and, for shared negatives,
// cut_cross_entropy.cu.cc (nvcc). Without GOOGLE_CUDA this file compiles to
// nothing.
//
// rng_key is a HostMemory input (three int64 the launch needs on the host).
// Checks: the CPU kernel's checks in its order with its messages
// (cce_minus_checks.h). The ids that live on the device (targets, given
// negative_ids, unigram alias_index) are scanned for the first one outside
// [0, C) by validate_ids_gpu.h's kernel (gpu_op_util.h's
// DeviceIdRangeChecks), all scans launched together and their answers
// copied back with one stream synchronisation per call, before the loss
// kernels are launched; the first failing check (shape or range, in the
// CPU kernel's order) is reported. The kernels themselves never read out of
// bounds for a bad id.
//
// Half and bfloat16 are read and written in their own type (float32 math
// inside); loss, logsumexp, item_bias and its gradient are float32. The
// per-row modes accumulate dW with float32 atomics (into a float32
// workspace for half types): not bitwise deterministic. Shared negatives
// use the deterministic tile engine and return the compact [K + N, D]
// gradient.
#if GOOGLE_CUDA

#include <algorithm>
#include <cstdint>

#include "custom_ops/kernels/cce_minus_gpu.h"
#include "custom_ops/kernels/cut_cross_entropy_gpu.h"
#include "custom_ops/tf/cce_minus_checks.h"
#include "custom_ops/tf/gpu_op_util.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace {

namespace tk = tfrec_fast::kernels;
using tfrec_fast_internal::AllocateGpuWorkspace;
using tfrec_fast_internal::CceMinusAttrs;
using tfrec_fast_internal::CceMinusOpKernelBase;
using tfrec_fast_internal::CceMinusSamplingAttr;
using tfrec_fast_internal::CceMinusShape;
using tfrec_fast_internal::CheckCceMinusGradInputs;
using tfrec_fast_internal::CheckCceMinusInputs;
using tfrec_fast_internal::CudaStatus;
using tfrec_fast_internal::DeviceIdRangeChecks;
using tfrec_fast_internal::GetGpuContext;
using tfrec_fast_internal::GpuContext;
using tfrec_fast_internal::GpuTypeOf;
using tfrec_fast_internal::IdData;
using In = tfrec_fast_internal::CceMinusInput;

// Checks every input of both ops (cce_minus_checks.h; the id ranges by
// device scans, launched together at the first range check) and fills the
// launch dims and inputs.
Status ReadArgs(OpKernelContext* ctx, const char* op, const GpuContext& gpu,
                const CceMinusAttrs& attrs, tk::CceMinusGpuDims* d,
                tk::CceMinusGpuInputs* in) {
  const Tensor& targets = ctx->input(In::kTargets);
  const Tensor& ids = ctx->input(In::kNegativeIds);
  // Range scans of every device id tensor the mode reads, at once.
  DeviceIdRangeChecks scans(op, gpu);
  scans.Add(&targets);
  if (attrs.sampling == CceMinusSamplingAttr::kGiven) scans.Add(&ids);
  if (attrs.sampling == CceMinusSamplingAttr::kUnigram) {
    scans.Add(&ctx->input(In::kAliasIndex));
  }
  CceMinusShape shape;
  TF_RETURN_IF_ERROR(CheckCceMinusInputs(
      ctx, attrs,
      [&](const Tensor& t, const char* name, int64_t num_items) {
        return scans.Check(ctx, t, name, num_items);
      },
      &shape));
  d->num_rows = shape.num_rows;
  d->num_items = shape.num_items;
  d->dim = shape.dim;
  d->num_negatives = shape.num_negatives;
  d->shared_negatives = shape.shared_negatives;
  d->targets_int64 = targets.dtype() == DT_INT64;
  d->negative_ids_int64 = ids.dtype() == DT_INT64;
  d->has_bias = shape.has_bias;
  d->remove_hits = attrs.remove_hits;
  const auto key = ctx->input(In::kRngKey).flat<int64_t>();  // HostMemory
  d->seed = key(0);
  d->step = key(1);
  d->row_offset = key(2);
  d->device = gpu.device;
  in->item_bias =
      d->has_bias ? ctx->input(In::kItemBias).flat<float>().data() : nullptr;
  in->targets = IdData(targets);
  switch (attrs.sampling) {
    case CceMinusSamplingAttr::kGiven:
      d->sampling = tk::CceMinusGpuSampling::kGiven;
      in->negative_ids = IdData(ids);
      in->negative_log_kq = ctx->input(In::kNegativeLogKq).flat<float>().data();
      break;
    case CceMinusSamplingAttr::kUniform:
      d->sampling = tk::CceMinusGpuSampling::kUniform;
      break;
    case CceMinusSamplingAttr::kUnigram:
      d->sampling = tk::CceMinusGpuSampling::kUnigram;
      in->alias_accept = ctx->input(In::kAliasAccept).flat<float>().data();
      in->alias_index = ctx->input(In::kAliasIndex).flat<int64_t>().data();
      in->log_q_table = ctx->input(In::kLogQTable).flat<float>().data();
      break;
  }
  return OkStatus();
}

class CceMinusGpuOpBase : public CceMinusOpKernelBase {
 public:
  explicit CceMinusGpuOpBase(OpKernelConstruction* ctx)
      : CceMinusOpKernelBase(ctx) {}

 protected:
  template <typename T>
  Status Read(OpKernelContext* ctx, const char* op, const GpuContext& gpu,
              tk::CceMinusGpuDims* d, tk::CceMinusGpuInputs* in) {
    TF_RETURN_IF_ERROR(ReadArgs(ctx, op, gpu, attrs_, d, in));
    d->type = GpuTypeOf<tk::CrossEntropyGpuType, T>();
    in->hidden = ctx->input(In::kHidden).flat<T>().data();
    in->item_table = ctx->input(In::kItemTable).flat<T>().data();
    return OkStatus();
  }

  static Status Workspace(OpKernelContext* ctx, const char* op,
                          const tk::CceMinusGpuDims& d, bool backward,
                          Tensor* workspace, size_t* bytes) {
    TF_RETURN_IF_ERROR(
        CudaStatus(tk::CceMinusGpuWorkspaceBytes(d, backward, bytes), op));
    return AllocateGpuWorkspace(ctx, *bytes, workspace);
  }
};

template <typename T>
class CceMinusGpuOp : public CceMinusGpuOpBase {
 public:
  explicit CceMinusGpuOp(OpKernelConstruction* ctx) : CceMinusGpuOpBase(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    static constexpr char kOp[] = "TfrecFastCceMinus";
    GpuContext gpu;
    OP_REQUIRES_OK(ctx, GetGpuContext(ctx, kOp, &gpu));
    tk::CceMinusGpuDims d;
    tk::CceMinusGpuInputs in;
    OP_REQUIRES_OK(ctx, Read<T>(ctx, kOp, gpu, &d, &in));
    const TensorShape rows({d.num_rows});
    Tensor *loss = nullptr, *lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, rows, &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, rows, &lse));
    if (d.num_rows == 0) return;
    Tensor workspace;
    size_t bytes = 0;
    OP_REQUIRES_OK(ctx, Workspace(ctx, kOp, d, false, &workspace, &bytes));
    OP_REQUIRES_OK(ctx, CudaStatus(tk::CceMinusGpuForward(
                                       d, in, loss->flat<float>().data(),
                                       lse->flat<float>().data(),
                                       workspace.flat<int8>().data(), bytes,
                                       gpu.stream),
                                   kOp));
  }
};

template <typename T>
class CceMinusGradGpuOp : public CceMinusGpuOpBase {
 public:
  explicit CceMinusGradGpuOp(OpKernelConstruction* ctx)
      : CceMinusGpuOpBase(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    static constexpr char kOp[] = "TfrecFastCceMinusGrad";
    GpuContext gpu;
    OP_REQUIRES_OK(ctx, GetGpuContext(ctx, kOp, &gpu));
    tk::CceMinusGpuDims d;
    tk::CceMinusGpuInputs in;
    OP_REQUIRES_OK(ctx, Read<T>(ctx, kOp, gpu, &d, &in));
    OP_REQUIRES_OK(ctx, CheckCceMinusGradInputs(ctx, d.num_rows));
    const Tensor& lse = ctx->input(In::kLogSumExp);
    const Tensor& d_loss = ctx->input(In::kDLoss);
    const int64_t rows = tk::CceMinusGpuItemGradRows(d);
    Tensor *dh = nullptr, *dw = nullptr, *db = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({d.num_rows, d.dim}), &dh));
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(1, TensorShape({rows, d.dim}), &dw));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            2, TensorShape({d.has_bias ? rows : 0}), &db));
    Tensor workspace;
    size_t bytes = 0;
    OP_REQUIRES_OK(ctx, Workspace(ctx, kOp, d, true, &workspace, &bytes));
    // N = 0 included: the launcher zeroes d_item_table and d_item_bias.
    OP_REQUIRES_OK(
        ctx, CudaStatus(tk::CceMinusGpuBackward(
                            d, in, lse.flat<float>().data(),
                            d_loss.flat<float>().data(), dh->flat<T>().data(),
                            dw->flat<T>().data(),
                            d.has_bias ? db->flat<float>().data() : nullptr,
                            workspace.flat<int8>().data(), bytes, gpu.stream),
                        kOp));
  }
};

#define REGISTER_GPU(T)                                             \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastCceMinus")                 \
                              .Device(DEVICE_GPU)                   \
                              .HostMemory("rng_key")                \
                              .TypeConstraint<T>("T"),              \
                          CceMinusGpuOp<T>);                        \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastCceMinusGrad")             \
                              .Device(DEVICE_GPU)                   \
                              .HostMemory("rng_key")                \
                              .TypeConstraint<T>("T"),              \
                          CceMinusGradGpuOp<T>);
REGISTER_GPU(float);
REGISTER_GPU(Eigen::half);
REGISTER_GPU(bfloat16);
#undef REGISTER_GPU

}  // namespace
}  // namespace tensorflow

#endif  // GOOGLE_CUDA
