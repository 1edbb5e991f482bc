// TfrecFastRaggedAttention / TfrecFastRaggedAttentionGrad: padding-free
// softmax attention over packed sequences (values + row_splits), CPU kernels
// from custom_ops/kernels/ragged_attention.h on TF's intra-op thread pool.
// TfrecFastRaggedAttentionQkvPacked(Grad): the same on one [T, 3, H, D]
// q/k/v tensor, read and differentiated in place (CPU only; on a GPU the
// Python wrapper slices it for TfrecFastRaggedAttention's CUDA kernels).
//
// Half and bfloat16 inputs are converted to float32 for the kernel and the
// results back (the reference computes in float32 as well); logsumexp is
// always float32.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "custom_ops/kernels/ragged_attention.h"
#include "custom_ops/tf/op_util.h"
#include "custom_ops/tf/ragged_attention_checks.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace {

using tfrec_fast_internal::AllocateOutput;
using tfrec_fast_internal::AsFloat;
using tfrec_fast_internal::CheckGradInputs;
using tfrec_fast_internal::CheckPacked;
using tfrec_fast_internal::CheckQkvPacked;
using tfrec_fast_internal::CpuThreadPool;
using tfrec_fast_internal::FromFloat;
using tfrec_fast_internal::ReadRowSplits;
using tfrec_fast_internal::RunWorkers;

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// Checks ranks and matching dimensions of queries [T, H, Dh], keys
// [T, H, Dh], values [T, H, Dv] and row_splits [B + 1]. Sets *q (merged
// queries/keys shape) and *v (values shape merged on [T, H]).
Status PackedShapes(InferenceContext* c, ShapeHandle* q, ShapeHandle* v) {
  ShapeHandle k, splits;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, q));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &k));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 3, v));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &splits));
  TF_RETURN_IF_ERROR(c->Merge(*q, k, q));
  DimensionHandle t, h;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(*q, 0), c->Dim(*v, 0), &t));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(*q, 1), c->Dim(*v, 1), &h));
  TF_RETURN_IF_ERROR(c->ReplaceDim(*q, 0, t, q));
  TF_RETURN_IF_ERROR(c->ReplaceDim(*q, 1, h, q));
  TF_RETURN_IF_ERROR(c->ReplaceDim(*v, 0, t, v));
  TF_RETURN_IF_ERROR(c->ReplaceDim(*v, 1, h, v));
  return OkStatus();
}

REGISTER_OP("TfrecFastRaggedAttention")
    .Input("queries: T")
    .Input("keys: T")
    .Input("values: T")
    .Input("row_splits: Tsplits")
    .Output("out: T")
    .Output("logsumexp: float")
    .Attr("T: {float, half, bfloat16}")
    .Attr("Tsplits: {int32, int64} = DT_INT64")
    .Attr("causal: bool = true")
    .Attr("scale: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle q, v;
      TF_RETURN_IF_ERROR(PackedShapes(c, &q, &v));
      c->set_output(0, v);
      c->set_output(1, c->Matrix(c->Dim(q, 0), c->Dim(q, 1)));
      return OkStatus();
    })
    .Doc(R"doc(
Softmax attention within each packed sequence, without padding.

Token i of sequence b (tokens [row_splits[b], row_splits[b + 1])) attends to
the tokens j of the same sequence with j <= i (causal) or to all of them:
out_i = sum_j softmax_j(scale * q_i . k_j) v_j.

queries: [T, H, Dh] packed queries.
keys: [T, H, Dh] packed keys.
values: [T, H, Dv] packed values.
row_splits: [B + 1] sequence boundaries: 0, non-decreasing, ending at T.
out: [T, H, Dv] attention output.
logsumexp: [T, H] float32 log sum_j exp(scale * q_i . k_j) (for the gradient).
causal: Whether token i sees only tokens j <= i of its sequence.
scale: Score multiplier (usually 1 / sqrt(Dh)).
)doc");

REGISTER_OP("TfrecFastRaggedAttentionGrad")
    .Input("queries: T")
    .Input("keys: T")
    .Input("values: T")
    .Input("row_splits: Tsplits")
    .Input("out: T")
    .Input("logsumexp: float")
    .Input("d_out: T")
    .Output("d_queries: T")
    .Output("d_keys: T")
    .Output("d_values: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("Tsplits: {int32, int64} = DT_INT64")
    .Attr("causal: bool = true")
    .Attr("scale: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle q, v, out, d_out, lse;
      TF_RETURN_IF_ERROR(PackedShapes(c, &q, &v));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 3, &out));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 2, &lse));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(6), 3, &d_out));
      TF_RETURN_IF_ERROR(c->Merge(v, out, &v));
      TF_RETURN_IF_ERROR(c->Merge(v, d_out, &v));
      c->set_output(0, q);
      c->set_output(1, q);
      c->set_output(2, v);
      return OkStatus();
    })
    .Doc(R"doc(
Gradient of TfrecFastRaggedAttention with respect to queries, keys and values
(logsumexp is treated as an auxiliary output without gradient).

out: The forward op's `out`.
logsumexp: The forward op's `logsumexp`.
d_out: [T, H, Dv] gradient of the loss with respect to `out`.
)doc");

REGISTER_OP("TfrecFastRaggedAttentionQkvPacked")
    .Input("qkv: T")
    .Input("row_splits: Tsplits")
    .Output("out: T")
    .Output("logsumexp: float")
    .Attr("T: {float, half, bfloat16}")
    .Attr("Tsplits: {int32, int64} = DT_INT64")
    .Attr("causal: bool = true")
    .Attr("scale: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle qkv, splits;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &qkv));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &splits));
      DimensionHandle three;
      TF_RETURN_IF_ERROR(c->WithValue(c->Dim(qkv, 1), 3, &three));
      c->set_output(0, c->MakeShape({c->Dim(qkv, 0), c->Dim(qkv, 2),
                                     c->Dim(qkv, 3)}));
      c->set_output(1, c->Matrix(c->Dim(qkv, 0), c->Dim(qkv, 2)));
      return OkStatus();
    })
    .Doc(R"doc(
TfrecFastRaggedAttention on queries, keys and values packed in one tensor
(FlashAttention's qkvpacked): queries = qkv[:, 0], keys = qkv[:, 1],
values = qkv[:, 2], read in place (no split).

qkv: [T, 3, H, D] packed queries, keys and values.
row_splits: [B + 1] sequence boundaries: 0, non-decreasing, ending at T.
out: [T, H, D] attention output.
logsumexp: [T, H] float32 log sum_j exp(scale * q_i . k_j) (for the gradient).
causal: Whether token i sees only tokens j <= i of its sequence.
scale: Score multiplier (usually 1 / sqrt(D)).
)doc");

REGISTER_OP("TfrecFastRaggedAttentionQkvPackedGrad")
    .Input("qkv: T")
    .Input("row_splits: Tsplits")
    .Input("out: T")
    .Input("logsumexp: float")
    .Input("d_out: T")
    .Output("d_qkv: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("Tsplits: {int32, int64} = DT_INT64")
    .Attr("causal: bool = true")
    .Attr("scale: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle qkv;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &qkv));
      c->set_output(0, qkv);
      return OkStatus();
    })
    .Doc(R"doc(
Gradient of TfrecFastRaggedAttentionQkvPacked with respect to qkv, written
as one [T, 3, H, D] tensor (no concat).

out: The forward op's `out`.
logsumexp: The forward op's `logsumexp`.
d_out: [T, H, D] gradient of the loss with respect to `out`.
d_qkv: [T, 3, H, D] gradient with respect to qkv.
)doc");

tfrec_fast::kernels::RaggedAttentionDims Dims(const Tensor& q,
                                              const Tensor& v, bool causal,
                                              float scale) {
  tfrec_fast::kernels::RaggedAttentionDims dims;
  dims.num_tokens = q.dim_size(0);
  dims.num_heads = q.dim_size(1);
  dims.head_dim = q.dim_size(2);
  dims.value_dim = v.dim_size(2);
  dims.causal = causal;
  dims.scale = scale;
  return dims;
}

// Dims of qkv [T, 3, H, D]: q, k, v are its three slices, one token every
// 3 H D floats.
tfrec_fast::kernels::RaggedAttentionDims QkvPackedDims(const Tensor& qkv,
                                                       bool causal,
                                                       float scale) {
  tfrec_fast::kernels::RaggedAttentionDims dims;
  dims.num_tokens = qkv.dim_size(0);
  dims.num_heads = qkv.dim_size(2);
  dims.head_dim = qkv.dim_size(3);
  dims.value_dim = qkv.dim_size(3);
  dims.causal = causal;
  dims.scale = scale;
  dims.qkv_token_stride = 3 * dims.num_heads * dims.head_dim;
  return dims;
}

// The forward on the intra-op pool; `args` points at float32 data.
void RunForward(OpKernelContext* ctx, const std::vector<int64_t>& row_splits,
                const tfrec_fast::kernels::RaggedAttentionDims& dims,
                const tfrec_fast::kernels::RaggedAttentionForwardArgs& args) {
  const auto plan = tfrec_fast::kernels::PlanRaggedAttention(
      row_splits.data(), static_cast<int64_t>(row_splits.size()) - 1, dims,
      CpuThreadPool(ctx)->NumThreads());
  RunWorkers(ctx, static_cast<int64_t>(plan.items.size()),
             [&](std::atomic<int64_t>* next) {
               tfrec_fast::kernels::RaggedAttentionForwardWorker(
                   dims, args, plan, next);
             });
}

// The backward on the intra-op pool, then the sum of split items' partial
// dK, dV; `args` points at float32 data (workspace: allocated here).
void RunBackward(OpKernelContext* ctx, const std::vector<int64_t>& row_splits,
                 const tfrec_fast::kernels::RaggedAttentionDims& dims,
                 tfrec_fast::kernels::RaggedAttentionBackwardArgs args) {
  auto* pool = CpuThreadPool(ctx);
  const auto plan = tfrec_fast::kernels::PlanRaggedAttention(
      row_splits.data(), static_cast<int64_t>(row_splits.size()) - 1, dims,
      pool->NumThreads());
  Tensor workspace;
  if (plan.workspace_floats > 0) {
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(
                            DT_FLOAT, TensorShape({plan.workspace_floats}),
                            &workspace));
    args.workspace = workspace.flat<float>().data();
  }
  RunWorkers(ctx, static_cast<int64_t>(plan.items.size()),
             [&](std::atomic<int64_t>* next) {
               tfrec_fast::kernels::RaggedAttentionBackwardWorker(
                   dims, args, plan, next);
             });
  const int64_t units = static_cast<int64_t>(plan.reduce_units.size());
  if (units > 0) {
    const int64_t width = dims.head_dim + dims.value_dim;
    pool->ParallelFor(units, /*cost_per_unit=*/64 * 4 * width,
                      [&](int64_t begin, int64_t end) {
                        tfrec_fast::kernels::RaggedAttentionReduce(
                            dims, args, plan, begin, end);
                      });
  }
}

// The attributes every kernel here reads.
class RaggedAttentionKernel : public OpKernel {
 public:
  explicit RaggedAttentionKernel(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("causal", &causal_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
  }

 protected:
  bool causal_;
  float scale_;
};

// Allocates out [T, H, Dv] (type T) and logsumexp [T, H], then runs the
// forward on float32 q, k, v (pointers into one or three tensors).
template <typename T>
void ForwardToOutputs(OpKernelContext* ctx,
                      const std::vector<int64_t>& row_splits,
                      const tfrec_fast::kernels::RaggedAttentionDims& dims,
                      const float* q, const float* k, const float* v) {
  Tensor *out = nullptr, *lse = nullptr;
  Tensor out_f;
  OP_REQUIRES_OK(ctx, AllocateOutput<T>(
                          ctx, 0,
                          TensorShape({dims.num_tokens, dims.num_heads,
                                       dims.value_dim}),
                          &out, &out_f));
  OP_REQUIRES_OK(ctx, ctx->allocate_output(
                          1, TensorShape({dims.num_tokens, dims.num_heads}),
                          &lse));
  if (dims.num_tokens == 0 || dims.num_heads == 0) return;
  tfrec_fast::kernels::RaggedAttentionForwardArgs args;
  args.q = q;
  args.k = k;
  args.v = v;
  args.out = out_f.flat<float>().data();
  args.lse = lse->flat<float>().data();
  RunForward(ctx, row_splits, dims, args);
  FromFloat<T>(ctx, out_f, out);
}

// The backward's inputs from the forward: out and d_out as float32 (copies
// in *out_f, *d_out_f for half types) and logsumexp, set in *args.
template <typename T>
Status ForwardResultArgs(
    OpKernelContext* ctx, const Tensor& out, const Tensor& lse,
    const Tensor& d_out, Tensor* out_f, Tensor* d_out_f,
    tfrec_fast::kernels::RaggedAttentionBackwardArgs* args) {
  TF_RETURN_IF_ERROR(AsFloat<T>(ctx, out, out_f));
  TF_RETURN_IF_ERROR(AsFloat<T>(ctx, d_out, d_out_f));
  args->out = out_f->flat<float>().data();
  args->lse = lse.flat<float>().data();
  args->d_out = d_out_f->flat<float>().data();
  return OkStatus();
}

template <typename T>
class RaggedAttentionOp : public RaggedAttentionKernel {
 public:
  using RaggedAttentionKernel::RaggedAttentionKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& q = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& v = ctx->input(2);
    const Tensor& splits = ctx->input(3);
    OP_REQUIRES_OK(ctx, CheckPacked(q, k, v, splits));
    std::vector<int64_t> row_splits;
    OP_REQUIRES_OK(ctx, ReadRowSplits(splits, q.dim_size(0), &row_splits));
    Tensor qf, kf, vf;
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, q, &qf));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, k, &kf));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, v, &vf));
    ForwardToOutputs<T>(ctx, row_splits, Dims(q, v, causal_, scale_),
                        qf.flat<float>().data(), kf.flat<float>().data(),
                        vf.flat<float>().data());
  }
};

template <typename T>
class RaggedAttentionGradOp : public RaggedAttentionKernel {
 public:
  using RaggedAttentionKernel::RaggedAttentionKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& q = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& v = ctx->input(2);
    const Tensor& splits = ctx->input(3);
    const Tensor& out = ctx->input(4);
    const Tensor& lse = ctx->input(5);
    const Tensor& d_out = ctx->input(6);
    OP_REQUIRES_OK(ctx, CheckPacked(q, k, v, splits));
    OP_REQUIRES_OK(ctx, CheckGradInputs(v.shape(), out, lse, d_out));
    std::vector<int64_t> row_splits;
    OP_REQUIRES_OK(ctx, ReadRowSplits(splits, q.dim_size(0), &row_splits));
    const auto dims = Dims(q, v, causal_, scale_);

    Tensor *dq = nullptr, *dk = nullptr, *dv = nullptr;
    Tensor dq_f, dk_f, dv_f;
    OP_REQUIRES_OK(ctx, AllocateOutput<T>(ctx, 0, q.shape(), &dq, &dq_f));
    OP_REQUIRES_OK(ctx, AllocateOutput<T>(ctx, 1, k.shape(), &dk, &dk_f));
    OP_REQUIRES_OK(ctx, AllocateOutput<T>(ctx, 2, v.shape(), &dv, &dv_f));
    if (dims.num_tokens == 0 || dims.num_heads == 0) return;
    Tensor qf, kf, vf, of, df;
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, q, &qf));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, k, &kf));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, v, &vf));
    tfrec_fast::kernels::RaggedAttentionBackwardArgs args;
    OP_REQUIRES_OK(ctx, ForwardResultArgs<T>(ctx, out, lse, d_out, &of, &df,
                                             &args));
    args.q = qf.flat<float>().data();
    args.k = kf.flat<float>().data();
    args.v = vf.flat<float>().data();
    args.dq = dq_f.flat<float>().data();
    args.dk = dk_f.flat<float>().data();
    args.dv = dv_f.flat<float>().data();
    RunBackward(ctx, row_splits, dims, args);
    if (!ctx->status().ok()) return;
    FromFloat<T>(ctx, dq_f, dq);
    FromFloat<T>(ctx, dk_f, dk);
    FromFloat<T>(ctx, dv_f, dv);
  }
};

template <typename T>
class RaggedAttentionQkvPackedOp : public RaggedAttentionKernel {
 public:
  using RaggedAttentionKernel::RaggedAttentionKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& qkv = ctx->input(0);
    const Tensor& splits = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckQkvPacked(qkv, splits));
    std::vector<int64_t> row_splits;
    OP_REQUIRES_OK(ctx, ReadRowSplits(splits, qkv.dim_size(0), &row_splits));
    const auto dims = QkvPackedDims(qkv, causal_, scale_);
    Tensor qkv_f;
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, qkv, &qkv_f));
    const float* base = qkv_f.flat<float>().data();
    const int64_t slice = dims.num_heads * dims.head_dim;
    ForwardToOutputs<T>(ctx, row_splits, dims, base, base + slice,
                        base + 2 * slice);
  }
};

template <typename T>
class RaggedAttentionQkvPackedGradOp : public RaggedAttentionKernel {
 public:
  using RaggedAttentionKernel::RaggedAttentionKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& qkv = ctx->input(0);
    const Tensor& splits = ctx->input(1);
    const Tensor& out = ctx->input(2);
    const Tensor& lse = ctx->input(3);
    const Tensor& d_out = ctx->input(4);
    OP_REQUIRES_OK(ctx, CheckQkvPacked(qkv, splits));
    const auto dims = QkvPackedDims(qkv, causal_, scale_);
    OP_REQUIRES_OK(
        ctx, CheckGradInputs(TensorShape({dims.num_tokens, dims.num_heads,
                                          dims.value_dim}),
                             out, lse, d_out));
    std::vector<int64_t> row_splits;
    OP_REQUIRES_OK(ctx, ReadRowSplits(splits, qkv.dim_size(0), &row_splits));

    Tensor* d_qkv = nullptr;
    Tensor d_qkv_f;
    OP_REQUIRES_OK(ctx,
                   AllocateOutput<T>(ctx, 0, qkv.shape(), &d_qkv, &d_qkv_f));
    if (dims.num_tokens == 0 || dims.num_heads == 0) return;
    Tensor qkv_f, of, df;
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, qkv, &qkv_f));
    tfrec_fast::kernels::RaggedAttentionBackwardArgs args;
    OP_REQUIRES_OK(ctx, ForwardResultArgs<T>(ctx, out, lse, d_out, &of, &df,
                                             &args));
    const float* base = qkv_f.flat<float>().data();
    float* d_base = d_qkv_f.flat<float>().data();
    const int64_t slice = dims.num_heads * dims.head_dim;
    args.q = base;
    args.k = base + slice;
    args.v = base + 2 * slice;
    // Every token belongs to one sequence, so the three slices of d_qkv are
    // written in full (as the unpacked op's dq, dk, dv are).
    args.dq = d_base;
    args.dk = d_base + slice;
    args.dv = d_base + 2 * slice;
    RunBackward(ctx, row_splits, dims, args);
    if (!ctx->status().ok()) return;
    FromFloat<T>(ctx, d_qkv_f, d_qkv);
  }
};

#define REGISTER_CPU(T)                                                   \
  REGISTER_KERNEL_BUILDER(                                                \
      Name("TfrecFastRaggedAttention").Device(DEVICE_CPU).TypeConstraint<T>( \
          "T"),                                                           \
      RaggedAttentionOp<T>);                                              \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastRaggedAttentionGrad")            \
                              .Device(DEVICE_CPU)                         \
                              .TypeConstraint<T>("T"),                    \
                          RaggedAttentionGradOp<T>);                      \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastRaggedAttentionQkvPacked")       \
                              .Device(DEVICE_CPU)                         \
                              .TypeConstraint<T>("T"),                    \
                          RaggedAttentionQkvPackedOp<T>);                 \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastRaggedAttentionQkvPackedGrad")   \
                              .Device(DEVICE_CPU)                         \
                              .TypeConstraint<T>("T"),                    \
                          RaggedAttentionQkvPackedGradOp<T>);
REGISTER_CPU(float);
REGISTER_CPU(Eigen::half);
REGISTER_CPU(bfloat16);
#undef REGISTER_CPU

}  // namespace
}  // namespace tensorflow
