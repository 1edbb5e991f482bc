// GPU kernels of TfrecFastCceMinus and TfrecFastCceMinusGrad (the ops,
// their shape functions and CPU kernels are in cce_minus_op.cc). Compiled
// by g++ with -DGOOGLE_CUDA=1 only when the GPU kernels are built; the CUDA
// code is in custom_ops/kernels/cce_minus.cu.cc and, for shared negatives,
// cut_cross_entropy.cu.cc (nvcc). Without GOOGLE_CUDA this file compiles to
// nothing.
//
// rng_key is a HostMemory input (three int64 the launch needs on the host).
// Checks: the CPU kernel's checks in its order with its messages (copied
// from cce_minus_op.cc, where they are file-local). The ids that live on
// the device (targets, given negative_ids, unigram alias_index) are scanned
// for the first one outside [0, C) by validate_ids_gpu.h's kernel, all
// scans launched together and their answers copied back with one stream
// synchronisation per call, before the loss kernels are launched; the first
// failing check (shape or range, in the CPU kernel's order) is reported.
// The kernels themselves never read out of bounds for a bad id.
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
#include <string>
#include <type_traits>

#include "custom_ops/kernels/cce_minus_gpu.h"
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

// Inputs shared by both ops (as in cce_minus_op.cc).
enum Input {
  kHidden = 0,
  kItemTable,
  kItemBias,
  kTargets,
  kNegativeIds,
  kNegativeLogKq,
  kAliasAccept,
  kAliasIndex,
  kLogQTable,
  kRngKey,
  kNumInputs,
  // Gradient op only.
  kLogSumExp = kNumInputs,
  kDLoss,
};

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

const void* IdData(const Tensor& t) {
  return t.dtype() == DT_INT32
             ? static_cast<const void*>(t.flat<int32>().data())
             : static_cast<const void*>(t.flat<int64_t>().data());
}

// Device scans of up to three id tensors for their first id outside
// [0, C): launched together, answered with one synchronisation.
class IdScans {
 public:
  // Scans `ids` (int32 or int64, any shape); returns its slot.
  int Add(const Tensor* ids) {
    tensors_[count_] = ids;
    return count_++;
  }

  Status Run(OpKernelContext* ctx, const char* op, const GpuContext& gpu,
             int64_t num_items) {
    num_items_ = num_items;
    if (count_ == 0) return OkStatus();
    Tensor scratch;
    TF_RETURN_IF_ERROR(
        ctx->allocate_temp(DT_INT64, TensorShape({count_}), &scratch));
    auto* slots =
        reinterpret_cast<unsigned long long*>(scratch.flat<int64_t>().data());
    for (int i = 0; i < count_; ++i) {
      const Tensor& t = *tensors_[i];
      const int64_t n = t.NumElements();
      const cudaError_t err =
          t.dtype() == DT_INT32
              ? tk::LaunchFirstOutOfRange<int32_t>(t.flat<int32>().data(), n,
                                                   num_items, slots + i,
                                                   gpu.stream)
              : tk::LaunchFirstOutOfRange<int64_t>(t.flat<int64_t>().data(),
                                                   n, num_items, slots + i,
                                                   gpu.stream);
      TF_RETURN_IF_ERROR(CudaStatus(err, op));
    }
    cudaError_t err =
        cudaMemcpyAsync(found_, slots, sizeof(unsigned long long) * count_,
                        cudaMemcpyDeviceToHost, gpu.stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(gpu.stream);
    return CudaStatus(err, op);
  }

  // OkStatus, or the CPU kernel's InvalidArgument for the first bad id of
  // slot `i` (copies that id back).
  Status Check(int i, const char* name, const GpuContext& gpu,
               const char* op) const {
    const Tensor& t = *tensors_[i];
    const int64_t n = t.NumElements();
    if (found_[i] >= static_cast<unsigned long long>(n)) return OkStatus();
    const int64_t bad = static_cast<int64_t>(found_[i]);
    int64_t value = 0;
    cudaError_t err;
    if (t.dtype() == DT_INT32) {
      int32 v = 0;
      err = cudaMemcpyAsync(&v, t.flat<int32>().data() + bad, sizeof(v),
                            cudaMemcpyDeviceToHost, gpu.stream);
      if (err == cudaSuccess) err = cudaStreamSynchronize(gpu.stream);
      value = v;
    } else {
      err = cudaMemcpyAsync(&value, t.flat<int64_t>().data() + bad,
                            sizeof(value), cudaMemcpyDeviceToHost,
                            gpu.stream);
      if (err == cudaSuccess) err = cudaStreamSynchronize(gpu.stream);
    }
    TF_RETURN_IF_ERROR(CudaStatus(err, op));
    return tfrec_fast_internal::OutOfRangeError(name, t.shape(), bad, value,
                                                num_items_);
  }

 private:
  const Tensor* tensors_[3] = {nullptr, nullptr, nullptr};
  unsigned long long found_[3] = {0, 0, 0};
  int count_ = 0;
  int64_t num_items_ = 0;
};

Status CheckVector(const Tensor& t, const char* name, int64_t size,
                   const char* what) {
  if (t.dims() != 1 || t.dim_size(0) != size) {
    return errors::InvalidArgument(name, " must be ", what, " = [", size,
                                   "], got shape ", t.shape().DebugString());
  }
  return OkStatus();
}

enum class Sampling { kGiven, kUniform, kUnigram };

// Checks every input of both ops, in the order and with the messages of
// ReadArgs in cce_minus_op.cc, and fills the launch dims and inputs.
Status ReadArgs(OpKernelContext* ctx, const char* op, const GpuContext& gpu,
                Sampling sampling, int64_t num_negatives, bool remove_hits,
                tk::CceMinusGpuDims* d, tk::CceMinusGpuInputs* in) {
  const Tensor& hidden = ctx->input(kHidden);
  const Tensor& table = ctx->input(kItemTable);
  const Tensor& bias = ctx->input(kItemBias);
  const Tensor& targets = ctx->input(kTargets);
  const Tensor& ids = ctx->input(kNegativeIds);
  const Tensor& log_kq = ctx->input(kNegativeLogKq);
  const Tensor& accept = ctx->input(kAliasAccept);
  const Tensor& alias = ctx->input(kAliasIndex);
  const Tensor& log_q = ctx->input(kLogQTable);
  const Tensor& rng_key = ctx->input(kRngKey);  // HostMemory
  if (hidden.dims() != 2) {
    return errors::InvalidArgument("hidden must be [N, D] (rank 2), got shape ",
                                   hidden.shape().DebugString());
  }
  if (table.dims() != 2 || table.dim_size(1) != hidden.dim_size(1)) {
    return errors::InvalidArgument(
        "item_table must be [C, D] with the D = ", hidden.dim_size(1),
        " of hidden, got shape ", table.shape().DebugString());
  }
  const int64_t N = hidden.dim_size(0), C = table.dim_size(0);
  if (bias.dims() != 1 ||
      (bias.dim_size(0) != 0 && bias.dim_size(0) != C)) {
    return errors::InvalidArgument(
        "item_bias must be [C] = [", C, "] or [0] (no bias), got shape ",
        bias.shape().DebugString());
  }
  TF_RETURN_IF_ERROR(CheckVector(targets, "targets", N, "[N]"));
  if (log_kq.shape() != ids.shape()) {
    return errors::InvalidArgument(
        "negative_log_kq ", log_kq.shape().DebugString(),
        " must have the shape of negative_ids ", ids.shape().DebugString());
  }
  if (rng_key.dims() != 1 || rng_key.dim_size(0) != 3) {
    return errors::InvalidArgument(
        "rng_key must be [3] = (seed, step, row_offset), got shape ",
        rng_key.shape().DebugString());
  }
  // Range scans of every device id tensor the mode reads, at once.
  IdScans scans;
  const int targets_slot = scans.Add(&targets);
  const int ids_slot = sampling == Sampling::kGiven ? scans.Add(&ids) : -1;
  const int alias_slot =
      sampling == Sampling::kUnigram ? scans.Add(&alias) : -1;
  TF_RETURN_IF_ERROR(scans.Run(ctx, op, gpu, C));
  TF_RETURN_IF_ERROR(scans.Check(targets_slot, "targets", gpu, op));

  d->num_rows = N;
  d->num_items = C;
  d->dim = hidden.dim_size(1);
  d->targets_int64 = targets.dtype() == DT_INT64;
  d->negative_ids_int64 = ids.dtype() == DT_INT64;
  d->has_bias = bias.dim_size(0) != 0;
  d->remove_hits = remove_hits;
  const auto key = rng_key.flat<int64_t>();
  d->seed = key(0);
  d->step = key(1);
  d->row_offset = key(2);
  d->device = gpu.device;
  in->item_bias = d->has_bias ? bias.flat<float>().data() : nullptr;
  in->targets = IdData(targets);

  if (sampling == Sampling::kGiven) {
    if (ids.dims() == 1) {
      d->shared_negatives = true;
    } else if (ids.dims() != 2) {
      return errors::InvalidArgument(
          "negative_ids must be [N, K] (per row) or [K] (shared) when "
          "sampling = \"given\", got shape ",
          ids.shape().DebugString());
    } else if (ids.dim_size(0) != N) {
      return errors::InvalidArgument(
          "per-row negative_ids must be [N, K] with the N = ", N,
          " of hidden, got shape ", ids.shape().DebugString());
    }
    TF_RETURN_IF_ERROR(scans.Check(ids_slot, "negative_ids", gpu, op));
    d->sampling = tk::CceMinusGpuSampling::kGiven;
    d->num_negatives = ids.dims() == 1 ? ids.dim_size(0) : ids.dim_size(1);
    in->negative_ids = IdData(ids);
    in->negative_log_kq = log_kq.flat<float>().data();
  } else {
    const char* mode = sampling == Sampling::kUniform ? "uniform" : "unigram";
    if (ids.NumElements() != 0) {
      return errors::InvalidArgument(
          "negative_ids must be empty when sampling = \"", mode,
          "\" (the kernel draws num_negatives per row), got shape ",
          ids.shape().DebugString());
    }
    d->num_negatives = num_negatives;
    d->sampling = tk::CceMinusGpuSampling::kUniform;
    if (sampling == Sampling::kUnigram) {
      TF_RETURN_IF_ERROR(CheckVector(accept, "alias_accept", C,
                                     "[C] for sampling = \"unigram\""));
      TF_RETURN_IF_ERROR(CheckVector(alias, "alias_index", C,
                                     "[C] for sampling = \"unigram\""));
      TF_RETURN_IF_ERROR(CheckVector(log_q, "log_q_table", C,
                                     "[C] for sampling = \"unigram\""));
      TF_RETURN_IF_ERROR(scans.Check(alias_slot, "alias_index", gpu, op));
      d->sampling = tk::CceMinusGpuSampling::kUnigram;
      in->alias_accept = accept.flat<float>().data();
      in->alias_index = alias.flat<int64_t>().data();
      in->log_q_table = log_q.flat<float>().data();
    }
    if (N > 0 && num_negatives > 0 && C == 0) {
      return errors::InvalidArgument(
          "sampling = \"", mode, "\" needs a non-empty item_table");
    }
  }
  return OkStatus();
}

class CceMinusGpuOpBase : public OpKernel {
 public:
  explicit CceMinusGpuOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string sampling;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sampling", &sampling));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_negatives", &num_negatives_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("remove_accidental_hits", &remove_hits_));
    OP_REQUIRES(ctx, num_negatives_ >= 0,
                errors::InvalidArgument("num_negatives must be >= 0, got ",
                                        num_negatives_));
    if (sampling == "given") {
      sampling_ = Sampling::kGiven;
    } else if (sampling == "uniform") {
      sampling_ = Sampling::kUniform;
    } else if (sampling == "unigram") {
      sampling_ = Sampling::kUnigram;
    } else {
      ctx->CtxFailure(errors::InvalidArgument(
          "sampling must be \"given\", \"uniform\" or \"unigram\", got \"",
          sampling, "\""));
    }
  }

 protected:
  template <typename T>
  Status Read(OpKernelContext* ctx, const char* op, const GpuContext& gpu,
              tk::CceMinusGpuDims* d, tk::CceMinusGpuInputs* in) {
    TF_RETURN_IF_ERROR(ReadArgs(ctx, op, gpu, sampling_, num_negatives_,
                                remove_hits_, d, in));
    d->type = GpuType<T>();
    in->hidden = ctx->input(kHidden).flat<T>().data();
    in->item_table = ctx->input(kItemTable).flat<T>().data();
    return OkStatus();
  }

  static Status Workspace(OpKernelContext* ctx, const char* op,
                          const tk::CceMinusGpuDims& d, bool backward,
                          Tensor* workspace, size_t* bytes) {
    TF_RETURN_IF_ERROR(
        CudaStatus(tk::CceMinusGpuWorkspaceBytes(d, backward, bytes), op));
    return ctx->allocate_temp(
        DT_INT8,
        TensorShape({static_cast<int64_t>(std::max<size_t>(*bytes, 1))}),
        workspace);
  }

  Sampling sampling_ = Sampling::kGiven;
  int64_t num_negatives_ = 0;
  bool remove_hits_ = true;
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
    const Tensor& lse = ctx->input(kLogSumExp);
    const Tensor& d_loss = ctx->input(kDLoss);
    OP_REQUIRES_OK(ctx, CheckVector(lse, "logsumexp", d.num_rows, "[N]"));
    OP_REQUIRES_OK(ctx, CheckVector(d_loss, "d_loss", d.num_rows, "[N]"));
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
