// TfrecFastCutCrossEntropy / TfrecFastCutCrossEntropyGrad: full-catalog
// softmax cross-entropy without the [N, C] logits
// (docs/fused_cross_entropy.md), CPU kernels from
// custom_ops/kernels/cut_cross_entropy.h on TF's intra-op thread pool.
//
// Forward: pack W^T (parallel over item blocks), then workers pull row
// chunks. Backward: pick and pack the live rows (d_loss != 0), then workers
// pull groups of item blocks (each group writes its own dW rows, db entries
// and dH partial), then the partials are summed per row.
//
// Half and bfloat16 inputs are converted to float32 for the kernel and the
// gradients back; loss, logsumexp, item_bias and its gradient are float32.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "custom_ops/kernels/cut_cross_entropy.h"
#include "custom_ops/tf/cut_cross_entropy_checks.h"
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
using tfrec_fast_internal::AllocateOutput;
using tfrec_fast_internal::AsFloat;
using tfrec_fast_internal::CheckCutCrossEntropyGradInputs;
using tfrec_fast_internal::CheckCutCrossEntropyInputs;
using tfrec_fast_internal::CheckIdsInRange;
using tfrec_fast_internal::CpuThreadPool;
using tfrec_fast_internal::FromFloat;
using tfrec_fast_internal::RunWorkers;
using tfrec_fast::kernels::CutCrossEntropyBackwardArgs;
using tfrec_fast::kernels::CutCrossEntropyBackwardPlan;
using tfrec_fast::kernels::CutCrossEntropyDims;
using tfrec_fast::kernels::CutCrossEntropyForwardArgs;

// Checks hidden [N, D], item_table [C, D], item_bias [C] or [0] (not known
// to be which: only its rank) and targets [N]. Sets *h (hidden merged on N
// with targets and on D with item_table) and *w (item_table merged on D).
Status LogitShapes(InferenceContext* c, ShapeHandle* h, ShapeHandle* w) {
  ShapeHandle bias, targets;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, h));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, w));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &bias));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &targets));
  DimensionHandle n, d;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(*h, 0), c->Dim(targets, 0), &n));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(*h, 1), c->Dim(*w, 1), &d));
  TF_RETURN_IF_ERROR(c->ReplaceDim(*h, 0, n, h));
  TF_RETURN_IF_ERROR(c->ReplaceDim(*h, 1, d, h));
  TF_RETURN_IF_ERROR(c->ReplaceDim(*w, 1, d, w));
  return OkStatus();
}

REGISTER_OP("TfrecFastCutCrossEntropy")
    .Input("hidden: T")
    .Input("item_table: T")
    .Input("item_bias: float")
    .Input("targets: Tidx")
    .Output("loss: float")
    .Output("logsumexp: float")
    .Attr("T: {float, half, bfloat16}")
    .Attr("Tidx: {int32, int64} = DT_INT64")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle h, w;
      TF_RETURN_IF_ERROR(LogitShapes(c, &h, &w));
      c->set_output(0, c->Vector(c->Dim(h, 0)));
      c->set_output(1, c->Vector(c->Dim(h, 0)));
      return OkStatus();
    })
    .Doc(R"doc(
Full-catalog softmax cross-entropy, without the [N, C] logits.

s_tc = hidden_t . item_table_c + item_bias_c, lse_t = log sum_c exp(s_tc),
loss_t = lse_t - s_{t, targets_t}; computed in float32.

hidden: [N, D] hidden states.
item_table: [C, D] item embeddings.
item_bias: [C] item bias, or [0] for none.
targets: [N] target ids in [0, C).
loss: [N] float32 per-row loss.
logsumexp: [N] float32 lse_t (for the gradient).
)doc");

REGISTER_OP("TfrecFastCutCrossEntropyGrad")
    .Input("hidden: T")
    .Input("item_table: T")
    .Input("item_bias: float")
    .Input("targets: Tidx")
    .Input("logsumexp: float")
    .Input("d_loss: float")
    .Output("d_hidden: T")
    .Output("d_item_table: T")
    .Output("d_item_bias: float")
    .Attr("T: {float, half, bfloat16}")
    .Attr("Tidx: {int32, int64} = DT_INT64")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle h, w, lse, d_loss;
      TF_RETURN_IF_ERROR(LogitShapes(c, &h, &w));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 1, &lse));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 1, &d_loss));
      DimensionHandle n;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(h, 0), c->Dim(lse, 0), &n));
      TF_RETURN_IF_ERROR(c->Merge(n, c->Dim(d_loss, 0), &n));
      TF_RETURN_IF_ERROR(c->ReplaceDim(h, 0, n, &h));
      c->set_output(0, h);
      c->set_output(1, w);
      c->set_output(2, c->input(2));
      return OkStatus();
    })
    .Doc(R"doc(
Gradient of TfrecFastCutCrossEntropy's loss with respect to hidden,
item_table and item_bias (logsumexp is an auxiliary output without
gradient). The logits are recomputed from logsumexp.

logsumexp: The forward op's `logsumexp`.
d_loss: [N] gradient of the objective with respect to `loss`.
d_hidden: [N, D].
d_item_table: [C, D] (dense: every item has a gradient).
d_item_bias: [C], or [0] when item_bias is [0].
)doc");

// The targets as int64 (checked to lie in [0, C)): the tensor's own memory
// for int64, else a converted copy in *copy.
template <typename Tidx>
Status ReadTargets(const Tensor& targets, int64_t num_items,
                   std::vector<int64_t>* copy, const int64_t** out) {
  TF_RETURN_IF_ERROR(CheckIdsInRange(targets, "targets", num_items));
  const auto flat = targets.flat<Tidx>();
  if constexpr (std::is_same<Tidx, int64_t>::value) {
    *out = flat.data();
  } else {
    copy->assign(flat.data(), flat.data() + flat.size());
    *out = copy->data();
  }
  return OkStatus();
}

CutCrossEntropyDims Dims(const Tensor& h, const Tensor& w,
                         const Tensor& bias) {
  CutCrossEntropyDims dims;
  dims.num_rows = h.dim_size(0);
  dims.dim = h.dim_size(1);
  dims.num_items = w.dim_size(0);
  dims.has_bias = bias.dim_size(0) > 0;
  return dims;
}

template <typename T, typename Tidx>
class CutCrossEntropyOp : public OpKernel {
 public:
  explicit CutCrossEntropyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h = ctx->input(0);
    const Tensor& w = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    const Tensor& targets = ctx->input(3);
    OP_REQUIRES_OK(ctx, CheckCutCrossEntropyInputs(h, w, bias, targets));
    std::vector<int64_t> target_copy;
    const int64_t* target_ids = nullptr;
    OP_REQUIRES_OK(ctx, ReadTargets<Tidx>(targets, w.dim_size(0),
                                          &target_copy, &target_ids));
    const CutCrossEntropyDims dims = Dims(h, w, bias);
    Tensor *loss = nullptr, *lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({dims.num_rows}), &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, TensorShape({dims.num_rows}), &lse));
    if (dims.num_rows == 0) return;

    Tensor hf, wf, workspace;
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, h, &hf));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, w, &wf));
    OP_REQUIRES_OK(
        ctx, ctx->allocate_temp(
                 DT_FLOAT,
                 TensorShape({std::max<int64_t>(
                     1, tfrec_fast::kernels::CutCrossEntropyForwardWorkspace(
                            dims))}),
                 &workspace));
    CutCrossEntropyForwardArgs args;
    args.hidden = hf.flat<float>().data();
    args.item_table = wf.flat<float>().data();
    args.item_bias = dims.has_bias ? bias.flat<float>().data() : nullptr;
    args.targets = target_ids;
    args.loss = loss->flat<float>().data();
    args.lse = lse->flat<float>().data();
    args.workspace = workspace.flat<float>().data();

    const int64_t blocks = tfrec_fast::kernels::CutCrossEntropyItemBlocks(dims);
    CpuThreadPool(ctx)->ParallelFor(
        blocks,
        /*cost_per_unit=*/4 * tfrec_fast::kernels::kCceItemBlock *
            (dims.dim + 1),
        [&](int64_t begin, int64_t end) {
          tfrec_fast::kernels::CutCrossEntropyPackForward(dims, args, begin,
                                                          end);
        });
    RunWorkers(ctx, tfrec_fast::kernels::CutCrossEntropyForwardUnits(dims),
               [&](std::atomic<int64_t>* next) {
                 tfrec_fast::kernels::CutCrossEntropyForwardWorker(dims, args,
                                                                   next);
               });
  }
};

template <typename T, typename Tidx>
class CutCrossEntropyGradOp : public OpKernel {
 public:
  explicit CutCrossEntropyGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h = ctx->input(0);
    const Tensor& w = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    const Tensor& targets = ctx->input(3);
    const Tensor& lse = ctx->input(4);
    const Tensor& d_loss = ctx->input(5);
    OP_REQUIRES_OK(ctx, CheckCutCrossEntropyInputs(h, w, bias, targets));
    OP_REQUIRES_OK(ctx, CheckCutCrossEntropyGradInputs(h, lse, d_loss));
    const int64_t N = h.dim_size(0);
    std::vector<int64_t> target_copy;
    const int64_t* target_ids = nullptr;
    OP_REQUIRES_OK(ctx, ReadTargets<Tidx>(targets, w.dim_size(0),
                                          &target_copy, &target_ids));
    const CutCrossEntropyDims dims = Dims(h, w, bias);

    Tensor *dh = nullptr, *dw = nullptr, *db = nullptr;
    Tensor dh_f, dw_f;
    OP_REQUIRES_OK(ctx, AllocateOutput<T>(ctx, 0, h.shape(), &dh, &dh_f));
    OP_REQUIRES_OK(ctx, AllocateOutput<T>(ctx, 1, w.shape(), &dw, &dw_f));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, bias.shape(), &db));
    if (N == 0) {
      // No rows: every gradient is zero (C may be anything, D too).
      dw->flat<T>().setZero();
      db->flat<float>().setZero();
      return;
    }

    Tensor hf, wf, workspace;
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, h, &hf));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, w, &wf));
    auto* pool = CpuThreadPool(ctx);
    const CutCrossEntropyBackwardPlan plan =
        tfrec_fast::kernels::PlanCutCrossEntropyBackward(
            dims, d_loss.flat<float>().data(), pool->NumThreads());
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(
                            DT_FLOAT,
                            TensorShape({std::max<int64_t>(
                                1, plan.workspace_floats)}),
                            &workspace));
    CutCrossEntropyBackwardArgs args;
    args.hidden = hf.flat<float>().data();
    args.item_table = wf.flat<float>().data();
    args.item_bias = dims.has_bias ? bias.flat<float>().data() : nullptr;
    args.targets = target_ids;
    args.lse = lse.flat<float>().data();
    args.d_loss = d_loss.flat<float>().data();
    args.d_hidden = dh_f.flat<float>().data();
    args.d_item_table = dw_f.flat<float>().data();
    args.d_item_bias = dims.has_bias ? db->flat<float>().data() : nullptr;
    args.workspace = workspace.flat<float>().data();

    const int64_t row_cost = 4 * (dims.dim + 1);
    pool->ParallelFor(plan.padded_rows, row_cost,
                      [&](int64_t begin, int64_t end) {
                        tfrec_fast::kernels::CutCrossEntropyPackBackward(
                            dims, args, plan, begin, end);
                      });
    RunWorkers(ctx, plan.num_workers, [&](std::atomic<int64_t>* next) {
      tfrec_fast::kernels::CutCrossEntropyBackwardWorker(dims, args, plan,
                                                         next);
    });
    pool->ParallelFor(N, row_cost * plan.num_groups,
                      [&](int64_t begin, int64_t end) {
                        tfrec_fast::kernels::CutCrossEntropyBackwardReduce(
                            dims, args, plan, begin, end);
                      });
    FromFloat<T>(ctx, dh_f, dh);
    FromFloat<T>(ctx, dw_f, dw);
  }
};

#define REGISTER_CPU(T, Tidx)                                        \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastCutCrossEntropy")           \
                              .Device(DEVICE_CPU)                    \
                              .TypeConstraint<T>("T")                \
                              .TypeConstraint<Tidx>("Tidx"),         \
                          CutCrossEntropyOp<T, Tidx>);               \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastCutCrossEntropyGrad")       \
                              .Device(DEVICE_CPU)                    \
                              .TypeConstraint<T>("T")                \
                              .TypeConstraint<Tidx>("Tidx"),         \
                          CutCrossEntropyGradOp<T, Tidx>);
#define REGISTER_CPU_ALL(T) \
  REGISTER_CPU(T, int32)    \
  REGISTER_CPU(T, int64_t)
REGISTER_CPU_ALL(float);
REGISTER_CPU_ALL(Eigen::half);
REGISTER_CPU_ALL(bfloat16);
#undef REGISTER_CPU_ALL
#undef REGISTER_CPU

}  // namespace
}  // namespace tensorflow
