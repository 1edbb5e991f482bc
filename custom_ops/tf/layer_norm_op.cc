// TfrecFastLayerNorm / TfrecFastLayerNormGrad: the transformer blocks'
// token-wise LayerNorm over the last axis of [N, D] float32 rows, CPU
// kernels from custom_ops/kernels/layer_norm.h on TF's intra-op thread pool
// (rows split into contiguous ranges, one per task). Each is one pass over
// its rows where TensorFlow's own ops take ~8 (forward) and ~11 (backward).
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cstdint>

#include "custom_ops/kernels/layer_norm.h"
#include "custom_ops/tf/op_util.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace {

using tfrec_fast_internal::NumWorkers;
using tfrec_fast_internal::RunTasks;

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// Rows per task at least: below it, thread hand-off costs more than it saves.
constexpr int64_t kMinRowsPerTask = 256;

// x [N, D] and the [D] vector `index`: merges D; sets *x.
Status RowsAndVector(InferenceContext* c, int index, ShapeHandle* x) {
  ShapeHandle v;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(index), 1, &v));
  DimensionHandle d;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(*x, 1), c->Dim(v, 0), &d));
  return c->ReplaceDim(*x, 1, d, x);
}

REGISTER_OP("TfrecFastLayerNorm")
    .Input("x: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Output("y: float")
    .Output("mean: float")
    .Output("rstd: float")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x;
      TF_RETURN_IF_ERROR(RowsAndVector(c, 1, &x));
      TF_RETURN_IF_ERROR(RowsAndVector(c, 2, &x));
      c->set_output(0, x);
      c->set_output(1, c->Vector(c->Dim(x, 0)));
      c->set_output(2, c->Vector(c->Dim(x, 0)));
      return OkStatus();
    })
    .Doc(R"doc(
Layer normalisation of each row of x over its last axis.

y = (x - mean) * rstd * gamma + beta with mean and variance per row and
rstd = 1 / sqrt(variance + epsilon).

x: [N, D] rows.
gamma: [D] scale.
beta: [D] offset.
y: [N, D].
mean: [N] row means (for the gradient).
rstd: [N] row 1 / sqrt(variance + epsilon) (for the gradient).
)doc");

REGISTER_OP("TfrecFastLayerNormGrad")
    .Input("x: float")
    .Input("gamma: float")
    .Input("mean: float")
    .Input("rstd: float")
    .Input("d_y: float")
    .Output("d_x: float")
    .Output("d_gamma: float")
    .Output("d_beta: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, dy, mean, rstd;
      TF_RETURN_IF_ERROR(RowsAndVector(c, 1, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 2, &dy));
      TF_RETURN_IF_ERROR(c->Merge(x, dy, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &mean));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &rstd));
      c->set_output(0, x);
      c->set_output(1, c->Vector(c->Dim(x, 1)));
      c->set_output(2, c->Vector(c->Dim(x, 1)));
      return OkStatus();
    })
    .Doc(R"doc(
Gradient of TfrecFastLayerNorm with respect to x, gamma and beta.

mean: The forward op's `mean`.
rstd: The forward op's `rstd`.
d_y: [N, D] gradient of the loss with respect to y.
)doc");

// OkStatus if x is [N, D] with D >= 1 and every vector input named in
// `vectors` (by input index) is [D], and `rows` ones are [N].
Status CheckShapes(OpKernelContext* ctx, std::initializer_list<int> vectors,
                   std::initializer_list<int> rows) {
  const Tensor& x = ctx->input(0);
  if (x.dims() != 2 || x.dim_size(1) < 1) {
    return errors::InvalidArgument("x must be [N, D] with D >= 1, got shape ",
                                   x.shape().DebugString());
  }
  // Input i must be the vector [name] = [x.dim_size(axis)].
  const auto check = [&](int i, const char* name, int axis) -> Status {
    const Tensor& v = ctx->input(i);
    if (v.dims() != 1 || v.dim_size(0) != x.dim_size(axis)) {
      return errors::InvalidArgument("input ", i, " must be [", name,
                                     "] = [", x.dim_size(axis),
                                     "], got shape ", v.shape().DebugString());
    }
    return OkStatus();
  };
  for (const int i : vectors) TF_RETURN_IF_ERROR(check(i, "D", 1));
  for (const int i : rows) TF_RETURN_IF_ERROR(check(i, "N", 0));
  return OkStatus();
}

// Tasks for n rows: contiguous ranges of at least kMinRowsPerTask rows.
int64_t NumTasks(OpKernelContext* ctx, int64_t n) {
  return std::max<int64_t>(
      1, std::min<int64_t>(NumWorkers(ctx),
                           (n + kMinRowsPerTask - 1) / kMinRowsPerTask));
}

// Rows [begin, end) of task k of `tasks` over n rows.
void TaskRows(int64_t k, int64_t tasks, int64_t n, int64_t* begin,
              int64_t* end) {
  *begin = n * k / tasks;
  *end = n * (k + 1) / tasks;
}

class LayerNormOp : public OpKernel {
 public:
  explicit LayerNormOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* ctx) override {
    OP_REQUIRES_OK(ctx, CheckShapes(ctx, {1, 2}, {}));
    const Tensor& x = ctx->input(0);
    const int64_t n = x.dim_size(0), dim = x.dim_size(1);
    Tensor *y = nullptr, *mean = nullptr, *rstd = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n}), &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({n}), &rstd));
    if (n == 0) return;
    const float* xp = x.flat<float>().data();
    const float* gamma = ctx->input(1).flat<float>().data();
    const float* beta = ctx->input(2).flat<float>().data();
    float* yp = y->flat<float>().data();
    float* mp = mean->flat<float>().data();
    float* sp = rstd->flat<float>().data();
    const int64_t tasks = NumTasks(ctx, n);
    RunTasks(ctx, tasks, [&](int64_t k) {
      int64_t begin, end;
      TaskRows(k, tasks, n, &begin, &end);
      tfrec_fast::kernels::LayerNormForward(xp, gamma, beta, dim, epsilon_,
                                            begin, end, yp, mp, sp);
    });
  }

 private:
  float epsilon_;
};

class LayerNormGradOp : public OpKernel {
 public:
  explicit LayerNormGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    OP_REQUIRES_OK(ctx, CheckShapes(ctx, {1}, {2, 3}));
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(4);
    OP_REQUIRES(ctx, dy.shape() == x.shape(),
                errors::InvalidArgument("d_y must have the shape of x ",
                                        x.shape().DebugString(), ", got ",
                                        dy.shape().DebugString()));
    const int64_t n = x.dim_size(0), dim = x.dim_size(1);
    Tensor *dx = nullptr, *d_gamma = nullptr, *d_beta = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({dim}), &d_gamma));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({dim}), &d_beta));
    float* dg = d_gamma->flat<float>().data();
    float* db = d_beta->flat<float>().data();
    std::fill(dg, dg + dim, 0.0f);
    std::fill(db, db + dim, 0.0f);
    if (n == 0) return;
    const int64_t tasks = NumTasks(ctx, n);
    // Per-task partial sums of d_gamma, d_beta, added in task order
    // (deterministic for a given thread count).
    Tensor partial;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(
                            DT_FLOAT, TensorShape({tasks, 2, dim}), &partial));
    float* pp = partial.flat<float>().data();
    const float* xp = x.flat<float>().data();
    const float* gamma = ctx->input(1).flat<float>().data();
    const float* mp = ctx->input(2).flat<float>().data();
    const float* sp = ctx->input(3).flat<float>().data();
    const float* dyp = dy.flat<float>().data();
    float* dxp = dx->flat<float>().data();
    RunTasks(ctx, tasks, [&](int64_t k) {
      int64_t begin, end;
      TaskRows(k, tasks, n, &begin, &end);
      tfrec_fast::kernels::LayerNormBackward(
          xp, gamma, mp, sp, dyp, dim, begin, end, dxp, pp + 2 * k * dim,
          pp + (2 * k + 1) * dim);
    });
    for (int64_t k = 0; k < tasks; ++k) {
      for (int64_t d = 0; d < dim; ++d) {
        dg[d] += pp[2 * k * dim + d];
        db[d] += pp[(2 * k + 1) * dim + d];
      }
    }
  }
};

REGISTER_KERNEL_BUILDER(Name("TfrecFastLayerNorm").Device(DEVICE_CPU),
                        LayerNormOp);
REGISTER_KERNEL_BUILDER(Name("TfrecFastLayerNormGrad").Device(DEVICE_CPU),
                        LayerNormGradOp);

}  // namespace
}  // namespace tensorflow
