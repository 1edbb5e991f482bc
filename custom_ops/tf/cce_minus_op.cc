// TfrecFastCceMinus / TfrecFastCceMinusGrad: sampled-negatives softmax
// cross-entropy without [N, K] logits (docs/fused_cross_entropy.md), CPU
// kernels from custom_ops/kernels/cce_minus.h on TF's intra-op thread pool.
//
// Half and bfloat16 hidden / item_table are converted to float32 for the
// kernel and the gradients back; loss, logsumexp, bias and its gradient are
// always float32.
#define EIGEN_USE_THREADS

#include <cstdint>
#include <functional>
#include <string>

#include "custom_ops/kernels/cce_minus.h"
#include "custom_ops/tf/cce_minus_checks.h"
#include "custom_ops/tf/op_util.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;
using tfrec_fast::kernels::CceMinusArgs;
using tfrec_fast::kernels::CceMinusSampling;
using tfrec_fast_internal::AllocateOutput;
using tfrec_fast_internal::AsFloat;
using tfrec_fast_internal::CceMinusAttrs;
using tfrec_fast_internal::CceMinusOpKernelBase;
using tfrec_fast_internal::CceMinusSamplingAttr;
using tfrec_fast_internal::CceMinusShape;
using tfrec_fast_internal::CheckCceMinusGradInputs;
using tfrec_fast_internal::CheckCceMinusInputs;
using tfrec_fast_internal::CheckIdsInRange;
using tfrec_fast_internal::FromFloat;
using tfrec_fast_internal::NumWorkers;
using tfrec_fast_internal::PullParallelFor;
using In = tfrec_fast_internal::CceMinusInput;

// Checks what the shape functions of both ops share; sets *n (rows), *d
// (hidden size), *c (items) and *table_rows (rows of d_item_table).
Status CceMinusShapes(InferenceContext* c, DimensionHandle* n,
                      DimensionHandle* d, DimensionHandle* table_rows) {
  ShapeHandle hidden, table, bias, targets, ids, log_kq, unused;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(In::kHidden), 2, &hidden));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(In::kItemTable), 2, &table));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(In::kItemBias), 1, &bias));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(In::kTargets), 1, &targets));
  TF_RETURN_IF_ERROR(c->Merge(c->input(In::kNegativeIds),
                              c->input(In::kNegativeLogKq), &ids));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(In::kAliasAccept), 1, &unused));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(In::kAliasIndex), 1, &unused));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(In::kLogQTable), 1, &unused));
  ShapeHandle key;
  DimensionHandle key_size;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(In::kRngKey), 1, &key));
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(key, 0), 3, &key_size));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(hidden, 0), c->Dim(targets, 0), n));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(hidden, 1), c->Dim(table, 1), d));
  const DimensionHandle items = c->Dim(table, 0);
  std::string sampling;
  TF_RETURN_IF_ERROR(c->GetAttr("sampling", &sampling));
  *table_rows = items;
  if (sampling == "given") {
    if (!c->RankKnown(ids)) {
      *table_rows = c->UnknownDim();
    } else if (c->Rank(ids) == 1) {
      TF_RETURN_IF_ERROR(c->Add(c->Dim(ids, 0), *n, table_rows));
    } else if (c->Rank(ids) == 2) {
      DimensionHandle merged;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(ids, 0), *n, &merged));
    } else {
      return errors::InvalidArgument(
          "negative_ids must be [N, K] (per row) or [K] (shared) when "
          "sampling = \"given\", got rank ",
          c->Rank(ids));
    }
  }
  return OkStatus();
}

REGISTER_OP("TfrecFastCceMinus")
    .Input("hidden: T")
    .Input("item_table: T")
    .Input("item_bias: float")
    .Input("targets: Tidx")
    .Input("negative_ids: Tidx")
    .Input("negative_log_kq: float")
    .Input("alias_accept: float")
    .Input("alias_index: int64")
    .Input("log_q_table: float")
    .Input("rng_key: int64")
    .Output("loss: float")
    .Output("logsumexp: float")
    .Attr("T: {float, half, bfloat16}")
    .Attr("Tidx: {int32, int64} = DT_INT64")
    .Attr("sampling: {'given', 'uniform', 'unigram'}")
    .Attr("num_negatives: int >= 0 = 0")
    .Attr("remove_accidental_hits: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle n, d, rows;
      TF_RETURN_IF_ERROR(CceMinusShapes(c, &n, &d, &rows));
      c->set_output(0, c->Vector(n));
      c->set_output(1, c->Vector(n));
      return OkStatus();
    })
    .Doc(R"doc(
Sampled-negatives softmax cross-entropy ("CCE-") without [N, K] logits.

For row t: s_tc = hidden_t . item_table_c + item_bias_c,
s'_tj = s_{t, n_tj} - log(K q(n_tj)) (-inf for accidental hits),
loss_t = log(exp(s_{t, y_t}) + sum_j exp(s'_tj)) - s_{t, y_t}.
See docs/fused_cross_entropy.md.

hidden: [N, D] hidden states.
item_table: [C, D] item embeddings.
item_bias: [C] item bias, or [0] for none.
targets: [N] target ids in [0, C).
negative_ids: sampling = "given": [N, K] (per row) or [K] (shared) ids in
  [0, C); otherwise empty.
negative_log_kq: log(K q) of each given negative (shape of negative_ids).
alias_accept: [C] Walker alias table acceptance (sampling = "unigram"), or [0].
alias_index: [C] alias ids in [0, C) (sampling = "unigram"), or [0].
log_q_table: [C] log q of every item (sampling = "unigram"), or [0].
rng_key: [3] (seed, step, row_offset) of the generated negatives.
loss: [N] per-row loss.
logsumexp: [N] log(exp(s_pos) + sum_j exp(s'_j)) (for the gradient).
sampling: "given", "uniform" or "unigram" (generated in the kernel).
num_negatives: K per row for "uniform" / "unigram" (ignored for "given").
remove_accidental_hits: Whether negatives equal to the target get
  probability 0.
)doc");

REGISTER_OP("TfrecFastCceMinusGrad")
    .Input("hidden: T")
    .Input("item_table: T")
    .Input("item_bias: float")
    .Input("targets: Tidx")
    .Input("negative_ids: Tidx")
    .Input("negative_log_kq: float")
    .Input("alias_accept: float")
    .Input("alias_index: int64")
    .Input("log_q_table: float")
    .Input("rng_key: int64")
    .Input("logsumexp: float")
    .Input("d_loss: float")
    .Output("d_hidden: T")
    .Output("d_item_table: T")
    .Output("d_item_bias: float")
    .Attr("T: {float, half, bfloat16}")
    .Attr("Tidx: {int32, int64} = DT_INT64")
    .Attr("sampling: {'given', 'uniform', 'unigram'}")
    .Attr("num_negatives: int >= 0 = 0")
    .Attr("remove_accidental_hits: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle n, d, rows;
      TF_RETURN_IF_ERROR(CceMinusShapes(c, &n, &d, &rows));
      ShapeHandle lse, d_loss, bias;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(In::kLogSumExp), 1, &lse));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(In::kDLoss), 1, &d_loss));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(lse, 0), n, &n));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(d_loss, 0), n, &n));
      c->set_output(0, c->Matrix(n, d));
      c->set_output(1, c->Matrix(rows, d));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(In::kItemBias), 1, &bias));
      const DimensionHandle bias_size = c->Dim(bias, 0);
      if (c->ValueKnown(bias_size) && c->Value(bias_size) == 0) {
        c->set_output(2, c->Vector(0));
      } else if (c->ValueKnown(bias_size)) {
        c->set_output(2, c->Vector(rows));
      } else {
        c->set_output(2, c->Vector(c->UnknownDim()));
      }
      return OkStatus();
    })
    .Doc(R"doc(
Gradient of TfrecFastCceMinus (logsumexp is an auxiliary output without
gradient). d_item_table and d_item_bias have C rows for per-row negatives
(given [N, K] or generated) and K + N rows for shared given negatives: the
rows of concat(negative_ids, targets).

logsumexp: The forward op's `logsumexp`.
d_loss: [N] gradient of the objective with respect to `loss`.
)doc");

// Checks every input of both ops (cce_minus_checks.h) and fills the kernel
// arguments (pointers to the float32 hidden / table are set by the caller).
Status ReadArgs(OpKernelContext* ctx, const CceMinusAttrs& attrs,
                CceMinusArgs* a) {
  CceMinusShape shape;
  TF_RETURN_IF_ERROR(
      CheckCceMinusInputs(ctx, attrs, CheckIdsInRange, &shape));
  const Tensor& targets = ctx->input(In::kTargets);
  const Tensor& ids = ctx->input(In::kNegativeIds);
  a->num_rows = shape.num_rows;
  a->dim = shape.dim;
  a->num_items = shape.num_items;
  a->num_negatives = shape.num_negatives;
  a->remove_accidental_hits = attrs.remove_hits;
  a->bias = shape.has_bias ? ctx->input(In::kItemBias).flat<float>().data()
                           : nullptr;
  if (targets.dtype() == DT_INT32) {
    a->targets32 = targets.flat<int32>().data();
  } else {
    a->targets64 = targets.flat<int64_t>().data();
  }
  const auto key = ctx->input(In::kRngKey).flat<int64_t>();
  a->seed = key(0);
  a->step = key(1);
  a->row_offset = key(2);
  switch (attrs.sampling) {
    case CceMinusSamplingAttr::kGiven:
      a->sampling = shape.shared_negatives ? CceMinusSampling::kGivenShared
                                           : CceMinusSampling::kGivenPerRow;
      if (ids.dtype() == DT_INT32) {
        a->negative_ids32 = ids.flat<int32>().data();
      } else {
        a->negative_ids64 = ids.flat<int64_t>().data();
      }
      a->negative_log_kq = ctx->input(In::kNegativeLogKq).flat<float>().data();
      break;
    case CceMinusSamplingAttr::kUniform:
      a->sampling = CceMinusSampling::kUniform;
      break;
    case CceMinusSamplingAttr::kUnigram:
      a->sampling = CceMinusSampling::kUnigram;
      a->alias_accept = ctx->input(In::kAliasAccept).flat<float>().data();
      a->alias_index = ctx->input(In::kAliasIndex).flat<int64_t>().data();
      a->log_q_table = ctx->input(In::kLogQTable).flat<float>().data();
      break;
  }
  return OkStatus();
}

// The kernel's parallel-for: PullParallelFor on the intra-op pool.
tfrec_fast::kernels::CceMinusParallelFor MakeParallelFor(
    OpKernelContext* ctx) {
  return [ctx](int64_t n, const std::function<void(int64_t)>& fn) {
    PullParallelFor(ctx, n, fn);
  };
}

class CceMinusOpBase : public CceMinusOpKernelBase {
 public:
  explicit CceMinusOpBase(OpKernelConstruction* ctx)
      : CceMinusOpKernelBase(ctx) {}

 protected:
  Status Read(OpKernelContext* ctx, CceMinusArgs* args) {
    return ReadArgs(ctx, attrs_, args);
  }
};

template <typename T>
class CceMinusOp : public CceMinusOpBase {
 public:
  explicit CceMinusOp(OpKernelConstruction* ctx) : CceMinusOpBase(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    CceMinusArgs args;
    OP_REQUIRES_OK(ctx, Read(ctx, &args));
    const TensorShape rows({args.num_rows});
    Tensor *loss = nullptr, *lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, rows, &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, rows, &lse));
    if (args.num_rows == 0) return;
    Tensor hf, wf;
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, ctx->input(In::kHidden), &hf));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, ctx->input(In::kItemTable), &wf));
    args.hidden = hf.flat<float>().data();
    args.table = wf.flat<float>().data();
    tfrec_fast::kernels::CceMinusForward(
        args, loss->flat<float>().data(), lse->flat<float>().data(),
        NumWorkers(ctx), MakeParallelFor(ctx));
  }
};

template <typename T>
class CceMinusGradOp : public CceMinusOpBase {
 public:
  explicit CceMinusGradOp(OpKernelConstruction* ctx) : CceMinusOpBase(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    CceMinusArgs args;
    OP_REQUIRES_OK(ctx, Read(ctx, &args));
    OP_REQUIRES_OK(ctx, CheckCceMinusGradInputs(ctx, args.num_rows));
    const Tensor& lse = ctx->input(In::kLogSumExp);
    const Tensor& d_loss = ctx->input(In::kDLoss);
    const int64_t rows = tfrec_fast::kernels::CceMinusGradTableRows(args);
    const bool has_bias = ctx->input(In::kItemBias).dim_size(0) != 0;

    Tensor *dh = nullptr, *dw = nullptr, *db = nullptr;
    Tensor dh_f, dw_f;
    OP_REQUIRES_OK(ctx, AllocateOutput<T>(ctx, 0,
                                          TensorShape({args.num_rows,
                                                       args.dim}),
                                          &dh, &dh_f));
    OP_REQUIRES_OK(ctx, AllocateOutput<T>(ctx, 1,
                                          TensorShape({rows, args.dim}), &dw,
                                          &dw_f));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            2, TensorShape({has_bias ? rows : 0}), &db));
    Tensor hf, wf;
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, ctx->input(In::kHidden), &hf));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, ctx->input(In::kItemTable), &wf));
    args.hidden = hf.flat<float>().data();
    args.table = wf.flat<float>().data();
    tfrec_fast::kernels::CceMinusGrads grads;
    grads.d_hidden = dh_f.flat<float>().data();
    grads.d_table = dw_f.flat<float>().data();
    grads.d_bias = has_bias ? db->flat<float>().data() : nullptr;
    tfrec_fast::kernels::CceMinusBackward(
        args, lse.flat<float>().data(), d_loss.flat<float>().data(), grads,
        NumWorkers(ctx), MakeParallelFor(ctx));
    FromFloat<T>(ctx, dh_f, dh);
    FromFloat<T>(ctx, dw_f, dw);
  }
};

#define REGISTER_CPU(T)                                                \
  REGISTER_KERNEL_BUILDER(                                             \
      Name("TfrecFastCceMinus").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      CceMinusOp<T>);                                                  \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastCceMinusGrad")                \
                              .Device(DEVICE_CPU)                      \
                              .TypeConstraint<T>("T"),                 \
                          CceMinusGradOp<T>);
REGISTER_CPU(float);
REGISTER_CPU(Eigen::half);
REGISTER_CPU(bfloat16);
#undef REGISTER_CPU

}  // namespace
}  // namespace tensorflow
