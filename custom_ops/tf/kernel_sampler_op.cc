// Quadratic-kernel sampler ops (tfrec_fast.samplers.KernelSampler), CPU
// kernels from custom_ops/kernels/kernel_sampler.h on TF's intra-op pool:
//
//   TfrecFastKernelSamplerDraw     K draws per query row from the tree, with
//                                  exact log q. Pure function of its inputs.
//   TfrecFastKernelSamplerRefresh  brings the tree variable up to date with
//                                  the item table: updates the changed rows
//                                  along their paths, or rebuilds when more
//                                  than `max_changed` rows changed.
//   TfrecFastKernelSamplerUpdate   updates the listed rows along their paths.
//
// Refresh and Update write the tree and snapshot variables in place (under
// their mutexes, copying first only when a reader still holds the buffer),
// not through TF's scatter ops: a sparse op puts a variable in
// copy-on-read mode for good, after which every read of the tree (every
// draw) would copy all of it.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "custom_ops/kernels/kernel_sampler.h"
#include "custom_ops/tf/kernel_sampler_checks.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/platform/mutex.h"

namespace tensorflow {
namespace {

namespace ks = ::tfrec_fast::kernels::kernel_sampler;
using tfrec_fast_internal::CheckDrawInputs;
using tfrec_fast_internal::ReadDrawAttrs;
using tfrec_fast_internal::CheckTreeShape;
using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

REGISTER_OP("TfrecFastKernelSamplerDraw")
    .Input("query: float")
    .Input("tree: float")
    .Input("counts: int64")
    .Input("snapshot: float")
    .Input("key: int32")
    .Input("num: int32")
    .Output("ids: int64")
    .Output("log_q: float")
    .Attr("alpha: float")
    .Attr("leaf_size: int >= 1")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle query, unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &query));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 1, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 0, &unused));
      DimensionHandle num;
      TF_RETURN_IF_ERROR(c->MakeDimForScalarInput(5, &num));
      ShapeHandle out = c->Matrix(c->Dim(query, 0), num);
      c->set_output(0, out);
      c->set_output(1, out);
      return OkStatus();
    })
    .Doc(R"doc(
K draws with replacement per query row from the quadratic-kernel proposal
q_i(h) = (alpha (h . w_i)^2 + 1) / sum_j (alpha (h . w_j)^2 + 1) over the
snapshot rows w, by descending the tree of packed outer-product sums.

query: [T, D] query rows (finite).
tree: [2 ceil(C / leaf_size), S] packed node sums (see kernel_sampler.h).
counts: [2 ceil(C / leaf_size)] items under each node.
snapshot: [C, D] the item rows the tree describes.
key: [2] random key (int32 pair); draws are a pure function of it.
num: K, draws per row (> 0).
ids: [T, K] drawn item ids.
log_q: [T, K] log q of each drawn id.
)doc");

REGISTER_OP("TfrecFastKernelSamplerRefresh")
    .Input("tree: resource")
    .Input("snapshot: resource")
    .Input("table: float")
    .Input("max_changed: int64")
    .Output("num_changed: int64")
    .Output("rebuilt: bool")
    .Attr("leaf_size: int >= 1")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &unused));
      c->set_output(0, c->Scalar());
      c->set_output(1, c->Scalar());
      return OkStatus();
    })
    .Doc(R"doc(
Brings the tree and snapshot variables up to date with `table`: rows where
the snapshot differs from the table are updated along their tree paths, or,
when more than `max_changed` rows differ (max_changed < 0: always), the tree
is rebuilt from the table.

tree: resource of the float [2 ceil(C / leaf_size), S] tree variable.
snapshot: resource of the float [C, D] snapshot variable.
table: [C, D] current item table (finite).
max_changed: rebuild when more rows than this changed.
num_changed: rows that differed.
rebuilt: whether the tree was rebuilt.
)doc");

REGISTER_OP("TfrecFastKernelSamplerUpdate")
    .Input("tree: resource")
    .Input("snapshot: resource")
    .Input("table: float")
    .Input("ids: int64")
    .Output("num_updated: int64")
    .Attr("leaf_size: int >= 1")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &unused));
      c->set_output(0, c->Scalar());
      return OkStatus();
    })
    .Doc(R"doc(
Moves the tree from the snapshot to `table` on the rows `ids` (repeats are
ignored): their changes are applied along their tree paths and the rows are
copied into the snapshot.

tree: resource of the float [2 ceil(C / leaf_size), S] tree variable.
snapshot: resource of the float [C, D] snapshot variable.
table: [C, D] current item table; the listed rows must be finite.
ids: [R] rows to update, in [0, C).
num_updated: distinct rows updated.
)doc");

ks::ParallelFor PoolFor(OpKernelContext* ctx) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [workers](int64_t n, int64_t cost,
                   const std::function<void(int64_t, int64_t)>& fn) {
    if (n > 0) workers->ParallelFor(n, cost, fn);
  };
}

// "name[i, j] = v is not finite" for flat position `flat` of [rows, dim].
Status NonFiniteError(const std::string& name, const float* x, int64_t flat,
                      int64_t dim, const std::string& advice) {
  return errors::InvalidArgument(name, "[", flat / dim, ", ", flat % dim,
                                 "] = ", x[flat], " is not finite; ", advice);
}

class KernelSamplerDrawOp : public OpKernel {
 public:
  explicit KernelSamplerDrawOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadDrawAttrs(ctx, &alpha_, &leaf_size_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& query = ctx->input(0);
    const Tensor& tree = ctx->input(1);
    const Tensor& counts = ctx->input(2);
    const Tensor& snapshot = ctx->input(3);
    const Tensor& key = ctx->input(4);
    const Tensor& num_t = ctx->input(5);
    int64_t num = 0;
    ks::TreeLayout layout;
    OP_REQUIRES_OK(ctx, CheckDrawInputs(query, tree, counts, snapshot, key,
                                        num_t, leaf_size_, &num, &layout));
    const int64_t num_items = snapshot.dim_size(0);
    const int64_t dim = snapshot.dim_size(1);
    const int64_t rows = query.dim_size(0);
    const float* q = query.flat<float>().data();
    const ks::ParallelFor pfor = PoolFor(ctx);
    const int64_t bad = ks::FirstNonFinite(q, rows * dim, pfor);
    OP_REQUIRES(ctx, bad < 0,
                NonFiniteError("query", q, bad, dim,
                               "the kernel sampler needs finite query rows"));

    Tensor* ids = nullptr;
    Tensor* log_q = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({rows, num}),
                                             &ids));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({rows, num}),
                                             &log_q));
    ks::DrawArgs args;
    args.alpha = alpha_;
    args.num_draws = num;
    const auto k = key.flat<int32>();
    args.seed = (static_cast<uint64_t>(static_cast<uint32_t>(k(0))) << 32) |
                static_cast<uint64_t>(static_cast<uint32_t>(k(1)));
    const float* tree_p = tree.flat<float>().data();
    const int64_t* counts_p = counts.flat<int64_t>().data();
    const float* snapshot_p = snapshot.flat<float>().data();
    int64_t* ids_p = ids->flat<int64_t>().data();
    float* log_q_p = log_q->flat<float>().data();
    pfor(rows, ks::DrawCostPerRow(layout, num),
         [&](int64_t begin, int64_t end) {
           ks::DrawRows(layout, args, q, tree_p, counts_p, snapshot_p, begin,
                        end, ids_p, log_q_p);
         });
  }

 private:
  float alpha_ = 1.0f;
  int64_t leaf_size_ = 1;
};

REGISTER_KERNEL_BUILDER(Name("TfrecFastKernelSamplerDraw").Device(DEVICE_CPU),
                        KernelSamplerDrawOp);

// The tree and snapshot variables, locked for writing (in address order, as
// TF locks several variables) and ready to be written in place.
class LockedState {
 public:
  Status Acquire(OpKernelContext* ctx) {
    TF_RETURN_IF_ERROR(LookupResource(ctx, HandleFromInput(ctx, 0), &tree_));
    TF_RETURN_IF_ERROR(
        LookupResource(ctx, HandleFromInput(ctx, 1), &snapshot_));
    Var* first = tree_.get();
    Var* second = snapshot_.get();
    if (first == second) {
      return errors::InvalidArgument("tree and snapshot must be different "
                                     "variables");
    }
    if (second->mu() < first->mu()) std::swap(first, second);
    first_lock_ = std::make_unique<mutex_lock>(*first->mu());
    second_lock_ = std::make_unique<mutex_lock>(*second->mu());
    for (Var* var : {tree_.get(), snapshot_.get()}) {
      if (!var->is_initialized || var->tensor()->dtype() != DT_FLOAT) {
        return errors::FailedPrecondition(
            "the kernel sampler's tree / snapshot variable is not an "
            "initialized float32 variable");
      }
    }
    return OkStatus();
  }

  // Copies the variable's buffer first when anything else may read it
  // (TF's copy-on-write rule for dense in-place updates).
  Status PrepareToWrite(OpKernelContext* ctx) {
    for (Var* var : {tree_.get(), snapshot_.get()}) {
      Tensor* t = var->tensor();
      if (var->copy_on_read_mode.load() || !t->RefCountIsOne()) {
        Tensor copy;
        AllocatorAttributes attr;
        attr.set_gpu_compatible(true);
        attr.set_nic_compatible(true);
        TF_RETURN_IF_ERROR(
            ctx->allocate_temp(t->dtype(), t->shape(), &copy, attr));
        std::memcpy(copy.flat<float>().data(), t->flat<float>().data(),
                    t->TotalBytes());
        *t = copy;
      }
    }
    return OkStatus();
  }

  Tensor* tree() { return tree_->tensor(); }
  Tensor* snapshot() { return snapshot_->tensor(); }

 private:
  core::RefCountPtr<Var> tree_, snapshot_;
  // Released before the RefCountPtrs (declared after them).
  std::unique_ptr<mutex_lock> first_lock_, second_lock_;
};

// Checks table [C, D] against the snapshot and the tree; sets *layout.
Status CheckState(LockedState* state, const Tensor& table, int64_t leaf_size,
                  ks::TreeLayout* layout) {
  if (!TensorShapeUtils::IsMatrix(table.shape())) {
    return errors::InvalidArgument("item_table must be [C, D], got ",
                                   table.shape().DebugString());
  }
  if (state->snapshot()->shape() != table.shape()) {
    return errors::InvalidArgument(
        "item_table must have the sampler's shape ",
        state->snapshot()->shape().DebugString(), " ([num_items, dim]), got ",
        table.shape().DebugString());
  }
  return CheckTreeShape(state->tree()->shape(), table.dim_size(0),
                        table.dim_size(1), leaf_size, layout);
}

constexpr char kTableAdvice[] =
    "the kernel sampler cannot build its tree from NaN/Inf item embeddings "
    "(check the learning rate / loss for divergence)";

class KernelSamplerRefreshOp : public OpKernel {
 public:
  explicit KernelSamplerRefreshOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("leaf_size", &leaf_size_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& table = ctx->input(2);
    const Tensor& max_changed_t = ctx->input(3);
    OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(max_changed_t.shape()),
                errors::InvalidArgument("max_changed must be a scalar"));
    const int64_t max_changed = max_changed_t.scalar<int64_t>()();
    LockedState state;
    OP_REQUIRES_OK(ctx, state.Acquire(ctx));
    ks::TreeLayout layout;
    OP_REQUIRES_OK(ctx, CheckState(&state, table, leaf_size_, &layout));
    const ks::ParallelFor pfor = PoolFor(ctx);
    const float* w = table.flat<float>().data();
    const int64_t bad =
        ks::FirstNonFinite(w, layout.num_items * layout.dim, pfor);
    OP_REQUIRES(ctx, bad < 0,
                NonFiniteError("item_table", w, bad, layout.dim,
                               kTableAdvice));
    const std::vector<int64_t> changed = ks::ChangedRows(
        layout, state.snapshot()->flat<float>().data(), w, pfor);
    const int64_t num_changed = static_cast<int64_t>(changed.size());
    const bool rebuild = num_changed > max_changed;
    if (rebuild || num_changed > 0) {
      OP_REQUIRES_OK(ctx, state.PrepareToWrite(ctx));
      float* snapshot = state.snapshot()->flat<float>().data();
      float* tree = state.tree()->flat<float>().data();
      if (rebuild) {
        ks::BuildTree(layout, w, snapshot, tree, pfor);
      } else {
        ks::UpdateRows(layout, changed.data(), num_changed, w, snapshot, tree,
                       pfor);
      }
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<int64_t>()() = num_changed;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &out));
    out->scalar<bool>()() = rebuild;
  }

 private:
  int64_t leaf_size_ = 1;
};

REGISTER_KERNEL_BUILDER(
    Name("TfrecFastKernelSamplerRefresh").Device(DEVICE_CPU),
    KernelSamplerRefreshOp);

class KernelSamplerUpdateOp : public OpKernel {
 public:
  explicit KernelSamplerUpdateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("leaf_size", &leaf_size_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& table = ctx->input(2);
    const Tensor& ids_t = ctx->input(3);
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(ids_t.shape()),
                errors::InvalidArgument("ids must be [R], got ",
                                        ids_t.shape().DebugString()));
    LockedState state;
    OP_REQUIRES_OK(ctx, state.Acquire(ctx));
    ks::TreeLayout layout;
    OP_REQUIRES_OK(ctx, CheckState(&state, table, leaf_size_, &layout));
    const auto flat = ids_t.flat<int64_t>();
    std::vector<int64_t> ids(flat.data(), flat.data() + flat.size());
    for (int64_t r = 0; r < static_cast<int64_t>(ids.size()); ++r) {
      OP_REQUIRES(ctx, ids[r] >= 0 && ids[r] < layout.num_items,
                  errors::InvalidArgument(
                      "ids[", r, "] = ", ids[r], " is out of range [0, ",
                      layout.num_items, ")"));
    }
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    const float* w = table.flat<float>().data();
    for (int64_t id : ids) {
      const int64_t bad = ks::FirstNonFinite(w + id * layout.dim, layout.dim,
                                             ks::SerialFor);
      OP_REQUIRES(ctx, bad < 0,
                  NonFiniteError("item_table", w, id * layout.dim + bad,
                                 layout.dim, kTableAdvice));
    }
    const int64_t num_ids = static_cast<int64_t>(ids.size());
    if (num_ids > 0) {
      OP_REQUIRES_OK(ctx, state.PrepareToWrite(ctx));
      ks::UpdateRows(layout, ids.data(), num_ids, w,
                     state.snapshot()->flat<float>().data(),
                     state.tree()->flat<float>().data(), PoolFor(ctx));
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<int64_t>()() = num_ids;
  }

 private:
  int64_t leaf_size_ = 1;
};

REGISTER_KERNEL_BUILDER(Name("TfrecFastKernelSamplerUpdate").Device(DEVICE_CPU),
                        KernelSamplerUpdateOp);

}  // namespace
}  // namespace tensorflow
