// TfrecFastValidateIds: passes `ids` through unchanged if every id lies in
// [0, num_items); otherwise fails with InvalidArgument naming the argument,
// the first bad id and its position. Later fused ops call the same kernel
// (custom_ops/kernels/validate_ids.h) on their id inputs.
#include <algorithm>
#include <atomic>
#include <string>

#include "custom_ops/kernels/validate_ids.h"
#include "custom_ops/tf/validate_ids_message.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tensorflow {
namespace {

REGISTER_OP("TfrecFastValidateIds")
    .Input("ids: T")
    .Input("num_items: int64")
    .Output("valid_ids: T")
    .Attr("T: {int32, int64}")
    .Attr("arg_name: string = 'ids'")
    // Stateful, as Assert is: the check is the point of the op. A stateless
    // op whose output is read only for its (static) shape, e.g. Uniform's
    // log q, is pruned from a tf.function graph and its check never runs.
    .SetIsStateful()
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &unused));
      c->set_output(0, c->input(0));
      return OkStatus();
    })
    .Doc(R"doc(
Checks that every id lies in [0, num_items) and forwards `ids` unchanged.

ids: Item ids of any shape.
num_items: Scalar catalog size C.
valid_ids: The same tensor as `ids`.
arg_name: Name of the checked argument, used in the error message.
)doc");

template <typename Id>
class ValidateIdsOp : public OpKernel {
 public:
  explicit ValidateIdsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("arg_name", &arg_name_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& ids = ctx->input(0);
    const Tensor& num_items_t = ctx->input(1);
    int64_t num_items = 0;
    OP_REQUIRES_OK(ctx,
                   tfrec_fast_internal::ReadNumItems(num_items_t, &num_items));

    const Id* data = ids.flat<Id>().data();
    const int64_t n = ids.NumElements();
    // Smallest bad position found by any shard; shards that start past it
    // stop early.
    std::atomic<int64_t> first_bad(n);
    auto scan = [&](int64_t begin, int64_t end) {
      if (begin >= first_bad.load(std::memory_order_relaxed)) return;
      const int64_t p =
          tfrec_fast::kernels::FirstOutOfRange(data, begin, end, num_items);
      if (p < 0) return;
      int64_t seen = first_bad.load(std::memory_order_relaxed);
      while (p < seen && !first_bad.compare_exchange_weak(seen, p)) {
      }
    };
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    // Cost per id in cycles, roughly: a load and two compares.
    workers->ParallelFor(n, /*cost_per_unit=*/2, scan);

    const int64_t bad = first_bad.load();
    OP_REQUIRES(ctx, bad == n,
                tfrec_fast_internal::OutOfRangeError(
                    arg_name_, ids.shape(), bad,
                    static_cast<int64_t>(data[bad]), num_items));
    ctx->set_output(0, ids);
  }

 private:
  std::string arg_name_;
};

#define REGISTER_CPU(Id)                                          \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastValidateIds")            \
                              .Device(DEVICE_CPU)                 \
                              .TypeConstraint<Id>("T"),           \
                          ValidateIdsOp<Id>);
REGISTER_CPU(int32);
REGISTER_CPU(int64_t);
#undef REGISTER_CPU

}  // namespace
}  // namespace tensorflow
