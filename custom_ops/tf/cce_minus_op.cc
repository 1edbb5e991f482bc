// TfrecFastCceMinus / TfrecFastCceMinusGrad: sampled-negatives softmax
// cross-entropy without [N, K] logits (docs/fused_cross_entropy.md), CPU
// kernels from custom_ops/kernels/cce_minus.h on TF's intra-op thread pool.
//
// Half and bfloat16 hidden / item_table are converted to float32 for the
// kernel and the gradients back; loss, logsumexp, bias and its gradient are
// always float32.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>

#include "custom_ops/kernels/cce_minus.h"
#include "custom_ops/tf/validate_ids_message.h"
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

// Inputs shared by both ops.
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

// Checks what the shape functions of both ops share; sets *n (rows), *d
// (hidden size), *c (items) and *table_rows (rows of d_item_table).
Status CceMinusShapes(InferenceContext* c, DimensionHandle* n,
                      DimensionHandle* d, DimensionHandle* table_rows) {
  ShapeHandle hidden, table, bias, targets, ids, log_kq, unused;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(kHidden), 2, &hidden));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(kItemTable), 2, &table));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(kItemBias), 1, &bias));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(kTargets), 1, &targets));
  TF_RETURN_IF_ERROR(c->Merge(c->input(kNegativeIds),
                              c->input(kNegativeLogKq), &ids));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(kAliasAccept), 1, &unused));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(kAliasIndex), 1, &unused));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(kLogQTable), 1, &unused));
  ShapeHandle key;
  DimensionHandle key_size;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(kRngKey), 1, &key));
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
      TF_RETURN_IF_ERROR(c->WithRank(c->input(kLogSumExp), 1, &lse));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(kDLoss), 1, &d_loss));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(lse, 0), n, &n));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(d_loss, 0), n, &n));
      c->set_output(0, c->Matrix(n, d));
      c->set_output(1, c->Matrix(rows, d));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(kItemBias), 1, &bias));
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

// A float32 view of `t`: the tensor itself for float, else a converted copy.
template <typename T>
Status AsFloat(OpKernelContext* ctx, const Tensor& t, Tensor* out) {
  if constexpr (std::is_same<T, float>::value) {
    *out = t;
    return OkStatus();
  } else {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_FLOAT, t.shape(), out));
    out->flat<float>().device(ctx->eigen_cpu_device()) =
        t.flat<T>().template cast<float>();
    return OkStatus();
  }
}

// Output `index` of type T, written through a float32 buffer `*buffer`
// (the output itself for float; copied back by FromFloat otherwise).
template <typename T>
Status AllocateOutput(OpKernelContext* ctx, int index,
                      const TensorShape& shape, Tensor** output,
                      Tensor* buffer) {
  TF_RETURN_IF_ERROR(ctx->allocate_output(index, shape, output));
  if constexpr (std::is_same<T, float>::value) {
    *buffer = **output;
    return OkStatus();
  }
  return ctx->allocate_temp(DT_FLOAT, shape, buffer);
}

template <typename T>
void FromFloat(OpKernelContext* ctx, const Tensor& buffer, Tensor* output) {
  if constexpr (!std::is_same<T, float>::value) {
    output->flat<T>().device(ctx->eigen_cpu_device()) =
        buffer.flat<float>().template cast<T>();
  }
}

// The first id of `t` outside [0, num_items), as an InvalidArgument error
// naming `name`, the position and the value.
template <typename Index>
Status CheckIdRange(const Tensor& t, const char* name, int64_t num_items) {
  const auto flat = t.flat<Index>();
  const int64_t size = flat.size();
  for (int64_t i = 0; i < size; ++i) {
    const int64_t v = static_cast<int64_t>(flat(i));
    if (v < 0 || v >= num_items) {
      return tfrec_fast_internal::OutOfRangeError(name, t.shape(), i, v,
                                                  num_items);
    }
  }
  return OkStatus();
}

Status CheckVector(const Tensor& t, const char* name, int64_t size,
                   const char* what) {
  if (t.dims() != 1 || t.dim_size(0) != size) {
    return errors::InvalidArgument(name, " must be ", what, " = [", size,
                                   "], got shape ", t.shape().DebugString());
  }
  return OkStatus();
}

// Checks every input of both ops and fills the kernel arguments (pointers
// to the float32 hidden / table are set by the caller).
template <typename Index>
Status ReadArgs(OpKernelContext* ctx, CceMinusSampling sampling,
                int64_t num_negatives, bool remove_hits, CceMinusArgs* a) {
  const Tensor& hidden = ctx->input(kHidden);
  const Tensor& table = ctx->input(kItemTable);
  const Tensor& bias = ctx->input(kItemBias);
  const Tensor& targets = ctx->input(kTargets);
  const Tensor& ids = ctx->input(kNegativeIds);
  const Tensor& log_kq = ctx->input(kNegativeLogKq);
  const Tensor& accept = ctx->input(kAliasAccept);
  const Tensor& alias = ctx->input(kAliasIndex);
  const Tensor& log_q = ctx->input(kLogQTable);
  const Tensor& rng_key = ctx->input(kRngKey);
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
  TF_RETURN_IF_ERROR(CheckIdRange<Index>(targets, "targets", C));
  a->num_rows = N;
  a->dim = hidden.dim_size(1);
  a->num_items = C;
  a->remove_accidental_hits = remove_hits;
  a->bias = bias.dim_size(0) != 0 ? bias.flat<float>().data() : nullptr;
  if constexpr (std::is_same<Index, int32>::value) {
    a->targets32 = targets.flat<int32>().data();
  } else {
    a->targets64 = targets.flat<int64_t>().data();
  }
  const auto key = rng_key.flat<int64_t>();
  a->seed = key(0);
  a->step = key(1);
  a->row_offset = key(2);

  if (sampling == CceMinusSampling::kGivenPerRow) {  // given: rank decides
    if (ids.dims() == 1) {
      sampling = CceMinusSampling::kGivenShared;
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
    TF_RETURN_IF_ERROR(CheckIdRange<Index>(ids, "negative_ids", C));
    a->num_negatives = ids.dims() == 1 ? ids.dim_size(0) : ids.dim_size(1);
    if constexpr (std::is_same<Index, int32>::value) {
      a->negative_ids32 = ids.flat<int32>().data();
    } else {
      a->negative_ids64 = ids.flat<int64_t>().data();
    }
    a->negative_log_kq = log_kq.flat<float>().data();
  } else {
    const char* mode =
        sampling == CceMinusSampling::kUniform ? "uniform" : "unigram";
    if (ids.NumElements() != 0) {
      return errors::InvalidArgument(
          "negative_ids must be empty when sampling = \"", mode,
          "\" (the kernel draws num_negatives per row), got shape ",
          ids.shape().DebugString());
    }
    a->num_negatives = num_negatives;
    if (sampling == CceMinusSampling::kUnigram) {
      TF_RETURN_IF_ERROR(CheckVector(accept, "alias_accept", C,
                                     "[C] for sampling = \"unigram\""));
      TF_RETURN_IF_ERROR(CheckVector(alias, "alias_index", C,
                                     "[C] for sampling = \"unigram\""));
      TF_RETURN_IF_ERROR(CheckVector(log_q, "log_q_table", C,
                                     "[C] for sampling = \"unigram\""));
      TF_RETURN_IF_ERROR(CheckIdRange<int64_t>(alias, "alias_index", C));
      a->alias_accept = accept.flat<float>().data();
      a->alias_index = alias.flat<int64_t>().data();
      a->log_q_table = log_q.flat<float>().data();
    }
    if (N > 0 && num_negatives > 0 && C == 0) {
      return errors::InvalidArgument(
          "sampling = \"", mode, "\" needs a non-empty item_table");
    }
  }
  a->sampling = sampling;
  return OkStatus();
}

// Runs fn(i), i < n, on up to NumThreads() threads of the intra-op pool
// (each thread pulls indices from a shared counter).
tfrec_fast::kernels::CceMinusParallelFor MakeParallelFor(
    OpKernelContext* ctx) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [pool](int64_t n, const std::function<void(int64_t)>& fn) {
    std::atomic<int64_t> next(0);
    const int64_t tasks = std::min<int64_t>(pool->NumThreads(), n);
    auto worker = [&]() {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
    };
    if (tasks <= 1) {
      worker();
      return;
    }
    // A huge cost per unit makes ParallelFor run one task per unit.
    pool->ParallelFor(tasks, /*cost_per_unit=*/int64_t{1} << 40,
                      [&](int64_t begin, int64_t end) {
                        for (int64_t i = begin; i < end; ++i) worker();
                      });
  };
}

int NumWorkers(OpKernelContext* ctx) {
  return ctx->device()->tensorflow_cpu_worker_threads()->workers->NumThreads();
}

class CceMinusOpBase : public OpKernel {
 public:
  explicit CceMinusOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string sampling;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sampling", &sampling));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_negatives", &num_negatives_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("remove_accidental_hits", &remove_hits_));
    OP_REQUIRES(ctx, num_negatives_ >= 0,
                errors::InvalidArgument("num_negatives must be >= 0, got ",
                                        num_negatives_));
    if (sampling == "given") {
      sampling_ = CceMinusSampling::kGivenPerRow;  // or shared, by rank
    } else if (sampling == "uniform") {
      sampling_ = CceMinusSampling::kUniform;
    } else if (sampling == "unigram") {
      sampling_ = CceMinusSampling::kUnigram;
    } else {
      ctx->CtxFailure(errors::InvalidArgument(
          "sampling must be \"given\", \"uniform\" or \"unigram\", got \"",
          sampling, "\""));
    }
  }

 protected:
  Status Read(OpKernelContext* ctx, CceMinusArgs* args) {
    if (ctx->input(kTargets).dtype() == DT_INT32) {
      return ReadArgs<int32>(ctx, sampling_, num_negatives_, remove_hits_,
                             args);
    }
    return ReadArgs<int64_t>(ctx, sampling_, num_negatives_, remove_hits_,
                             args);
  }

  CceMinusSampling sampling_ = CceMinusSampling::kGivenPerRow;
  int64_t num_negatives_ = 0;
  bool remove_hits_ = true;
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
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, ctx->input(kHidden), &hf));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, ctx->input(kItemTable), &wf));
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
    const Tensor& lse = ctx->input(kLogSumExp);
    const Tensor& d_loss = ctx->input(kDLoss);
    OP_REQUIRES_OK(ctx, CheckVector(lse, "logsumexp", args.num_rows, "[N]"));
    OP_REQUIRES_OK(ctx, CheckVector(d_loss, "d_loss", args.num_rows, "[N]"));
    const int64_t rows = tfrec_fast::kernels::CceMinusGradTableRows(args);
    const bool has_bias = ctx->input(kItemBias).dim_size(0) != 0;

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
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, ctx->input(kHidden), &hf));
    OP_REQUIRES_OK(ctx, AsFloat<T>(ctx, ctx->input(kItemTable), &wf));
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
