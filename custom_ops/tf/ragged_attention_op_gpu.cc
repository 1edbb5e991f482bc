// GPU kernels of TfrecFastRaggedAttention and TfrecFastRaggedAttentionGrad
// (the ops, their shape functions and CPU kernels are in
// ragged_attention_op.cc). Compiled by g++ with -DGOOGLE_CUDA=1 only when the
// GPU kernels are built; the CUDA code is in
// custom_ops/kernels/ragged_attention.cu.cc (nvcc). Without GOOGLE_CUDA this
// file compiles to nothing, so CPU-only builds (Bazel's included) ignore it.
//
// row_splits is a HostMemory input: TensorFlow hands it over in host memory
// (copying it from the GPU when it was produced there). That is the cheap
// check before launch: the kernel validates it on the host with the CPU
// kernel's own CheckRowSplits (same InvalidArgument message), builds the work
// list there (only non-empty sequences produce thread blocks; sorted by
// decreasing cost) and copies it to the device with one small asynchronous
// copy on the op's stream. No stream synchronisation, no device-side check.
//
// Half and bfloat16 are read and written in their own type by the kernels
// (float32 math inside); logsumexp is float32. Head dims Dh, Dv up to 128.
#if GOOGLE_CUDA

#include <cstdint>
#include <string>
#include <vector>

#include "custom_ops/kernels/ragged_attention.h"
#include "custom_ops/kernels/ragged_attention_gpu.h"
#include "custom_ops/tf/gpu_op_util.h"
#include "custom_ops/tf/ragged_attention_checks.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace {

namespace rak = tfrec_fast::kernels;
using tfrec_fast_internal::CudaStatus;
using tfrec_fast_internal::GetGpuContext;
using tfrec_fast_internal::GpuContext;
using tfrec_fast_internal::GpuTypeOf;

// CheckPacked (shared with the CPU kernels), then the GPU kernels' limits.
Status CheckPackedGpu(const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& splits) {
  TF_RETURN_IF_ERROR(tfrec_fast_internal::CheckPacked(q, k, v, splits));
  // Limits of the GPU kernels (the CPU kernels have none of these).
  if (q.dim_size(2) > rak::kRaggedAttentionGpuMaxHeadDim ||
      v.dim_size(2) > rak::kRaggedAttentionGpuMaxHeadDim) {
    return errors::InvalidArgument(
        "the GPU kernel of ragged attention takes head dims up to ",
        rak::kRaggedAttentionGpuMaxHeadDim, ", got queries ",
        q.shape().DebugString(), " and values ", v.shape().DebugString(),
        "; place the op on the CPU for larger heads");
  }
  if (q.dim_size(0) > INT32_MAX || q.dim_size(1) > 65535) {
    return errors::InvalidArgument(
        "the GPU kernel of ragged attention takes fewer than 2^31 tokens and "
        "at most 65535 heads, got queries ",
        q.shape().DebugString());
  }
  return OkStatus();
}

// Plans the work on the host and copies the list to the device (`storage`
// keeps the device copy alive for the op's kernels).
Status PrepareWork(OpKernelContext* ctx, const char* op,
                   const std::vector<int64_t>& row_splits,
                   const rak::RaggedAttentionGpuDims& dims,
                   const GpuContext& gpu, Tensor* storage,
                   rak::RaggedAttentionGpuWork* work) {
  int block_rows = 0;
  TF_RETURN_IF_ERROR(CudaStatus(
      rak::RaggedAttentionGpuBlockRows(dims.head_dim, dims.value_dim,
                                       gpu.device, &block_rows),
      op));
  std::vector<rak::RaggedAttentionGpuItem> items;
  if (!rak::PlanRaggedAttentionGpu(
          row_splits.data(), static_cast<int64_t>(row_splits.size()) - 1,
          dims.num_tokens, block_rows, dims.causal, &items)) {
    return errors::Internal(op, ": work planning rejected row_splits that "
                                "passed CheckRowSplits");
  }
  work->block_rows = block_rows;
  work->num_items = static_cast<int64_t>(items.size());
  work->count = nullptr;
  if (items.empty()) return OkStatus();
  static_assert(sizeof(rak::RaggedAttentionGpuItem) == 4 * sizeof(int32),
                "work item layout");
  TF_RETURN_IF_ERROR(ctx->allocate_temp(
      DT_INT32, TensorShape({work->num_items * 4}), storage));
  // From pageable memory: the copy has read `items` when it returns (CUDA
  // stages pageable host-to-device copies), so the vector may go.
  TF_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(storage->flat<int32>().data(), items.data(),
                      items.size() * sizeof(rak::RaggedAttentionGpuItem),
                      cudaMemcpyHostToDevice, gpu.stream),
      op));
  work->items = reinterpret_cast<const rak::RaggedAttentionGpuItem*>(
      storage->flat<int32>().data());
  return OkStatus();
}

template <typename T>
rak::RaggedAttentionGpuDims GpuDims(const Tensor& q, const Tensor& v,
                                    bool causal, float scale, int device) {
  rak::RaggedAttentionGpuDims dims;
  dims.num_tokens = q.dim_size(0);
  dims.num_heads = q.dim_size(1);
  dims.head_dim = q.dim_size(2);
  dims.value_dim = v.dim_size(2);
  dims.causal = causal;
  dims.scale = scale;
  dims.type = GpuTypeOf<rak::RaggedAttentionGpuType, T>();
  dims.device = device;
  return dims;
}

template <typename T>
class RaggedAttentionGpuOp : public OpKernel {
 public:
  explicit RaggedAttentionGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("causal", &causal_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    static constexpr char kOp[] = "TfrecFastRaggedAttention";
    const Tensor& q = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& v = ctx->input(2);
    const Tensor& splits = ctx->input(3);  // HostMemory
    OP_REQUIRES_OK(ctx, CheckPackedGpu(q, k, v, splits));
    std::vector<int64_t> row_splits;
    OP_REQUIRES_OK(ctx, tfrec_fast_internal::ReadRowSplits(
                            splits, q.dim_size(0), &row_splits));
    Tensor* out = nullptr;
    Tensor* lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, v.shape(), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, TensorShape({q.dim_size(0), q.dim_size(1)}),
                            &lse));
    if (q.dim_size(0) == 0 || q.dim_size(1) == 0) return;
    GpuContext gpu;
    OP_REQUIRES_OK(ctx, GetGpuContext(ctx, kOp, &gpu));
    const auto dims = GpuDims<T>(q, v, causal_, scale_, gpu.device);
    Tensor storage;
    rak::RaggedAttentionGpuWork work;
    OP_REQUIRES_OK(ctx, PrepareWork(ctx, kOp, row_splits, dims, gpu,
                                    &storage, &work));
    OP_REQUIRES_OK(
        ctx, CudaStatus(rak::RaggedAttentionGpuForward(
                            dims, work, q.flat<T>().data(),
                            k.flat<T>().data(), v.flat<T>().data(),
                            out->flat<T>().data(), lse->flat<float>().data(),
                            gpu.stream),
                        kOp));
  }

 private:
  bool causal_;
  float scale_;
};

template <typename T>
class RaggedAttentionGradGpuOp : public OpKernel {
 public:
  explicit RaggedAttentionGradGpuOp(OpKernelConstruction* ctx)
      : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("causal", &causal_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    static constexpr char kOp[] = "TfrecFastRaggedAttentionGrad";
    const Tensor& q = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& v = ctx->input(2);
    const Tensor& splits = ctx->input(3);  // HostMemory
    const Tensor& out = ctx->input(4);
    const Tensor& lse = ctx->input(5);
    const Tensor& d_out = ctx->input(6);
    OP_REQUIRES_OK(ctx, CheckPackedGpu(q, k, v, splits));
    OP_REQUIRES_OK(ctx, tfrec_fast_internal::CheckGradInputs(v.shape(), out,
                                                             lse, d_out));
    std::vector<int64_t> row_splits;
    OP_REQUIRES_OK(ctx, tfrec_fast_internal::ReadRowSplits(
                            splits, q.dim_size(0), &row_splits));
    Tensor *dq = nullptr, *dk = nullptr, *dv = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, q.shape(), &dq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, k.shape(), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, v.shape(), &dv));
    if (q.dim_size(0) == 0 || q.dim_size(1) == 0) return;
    GpuContext gpu;
    OP_REQUIRES_OK(ctx, GetGpuContext(ctx, kOp, &gpu));
    const auto dims = GpuDims<T>(q, v, causal_, scale_, gpu.device);
    Tensor storage;
    rak::RaggedAttentionGpuWork work;
    OP_REQUIRES_OK(ctx, PrepareWork(ctx, kOp, row_splits, dims, gpu,
                                    &storage, &work));
    const int64_t workspace_bytes =
        static_cast<int64_t>(rak::RaggedAttentionGpuBackwardWorkspaceBytes(
            dims));
    Tensor workspace;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(
                            DT_FLOAT, TensorShape({workspace_bytes / 4}),
                            &workspace));
    OP_REQUIRES_OK(
        ctx,
        CudaStatus(rak::RaggedAttentionGpuBackward(
                       dims, work, q.flat<T>().data(), k.flat<T>().data(),
                       v.flat<T>().data(), out.flat<T>().data(),
                       lse.flat<float>().data(), d_out.flat<T>().data(),
                       dq->flat<T>().data(), dk->flat<T>().data(),
                       dv->flat<T>().data(), workspace.flat<float>().data(),
                       gpu.stream),
                   kOp));
  }

 private:
  bool causal_;
  float scale_;
};

#define REGISTER_GPU(T)                                           \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastRaggedAttention")        \
                              .Device(DEVICE_GPU)                 \
                              .HostMemory("row_splits")           \
                              .TypeConstraint<T>("T"),            \
                          RaggedAttentionGpuOp<T>);               \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastRaggedAttentionGrad")    \
                              .Device(DEVICE_GPU)                 \
                              .HostMemory("row_splits")           \
                              .TypeConstraint<T>("T"),            \
                          RaggedAttentionGradGpuOp<T>);
REGISTER_GPU(float);
REGISTER_GPU(Eigen::half);
REGISTER_GPU(bfloat16);
#undef REGISTER_GPU

}  // namespace
}  // namespace tensorflow

#endif  // GOOGLE_CUDA
