// GPU kernel of TfrecFastValidateIds (the op and its CPU kernel are in
// validate_ids_op.cc). Compiled by g++ with -DGOOGLE_CUDA=1 only when the
// GPU kernels are built; the CUDA code itself is in
// custom_ops/kernels/validate_ids.cu.cc (nvcc). Without GOOGLE_CUDA this
// file compiles to nothing, so CPU-only builds (Bazel's included) ignore it.
#if GOOGLE_CUDA

#include <cstdint>
#include <string>

#include "custom_ops/kernels/validate_ids_gpu.h"
#include "custom_ops/tf/gpu_op_util.h"
#include "custom_ops/tf/validate_ids_message.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace tensorflow {
namespace {

template <typename Id>
class ValidateIdsGpuOp : public OpKernel {
 public:
  explicit ValidateIdsGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("arg_name", &arg_name_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& ids = ctx->input(0);
    const Tensor& num_items_t = ctx->input(1);  // HostMemory
    int64_t num_items = 0;
    OP_REQUIRES_OK(ctx,
                   tfrec_fast_internal::ReadNumItems(num_items_t, &num_items));
    const int64_t n = ids.NumElements();
    if (n == 0) {
      ctx->set_output(0, ids);
      return;
    }

    tfrec_fast_internal::GpuContext gpu;
    OP_REQUIRES_OK(ctx, tfrec_fast_internal::GetGpuContext(
                            ctx, "TfrecFastValidateIds", &gpu));

    Tensor scratch;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_INT64, TensorShape({}),
                                           &scratch));
    int64_t bad = n;
    int64_t bad_value = 0;
    // Waits for the scan: this is a check op, its answer decides whether the
    // step may go on.
    const cudaError_t err = tfrec_fast::kernels::FindFirstOutOfRange<Id>(
        ids.flat<Id>().data(), n, num_items,
        reinterpret_cast<unsigned long long*>(
            scratch.scalar<int64_t>().data()),
        gpu.stream, &bad, &bad_value);
    OP_REQUIRES_OK(ctx, tfrec_fast_internal::CudaStatus(
                            err, "TfrecFastValidateIds"));
    OP_REQUIRES(ctx, bad == n,
                tfrec_fast_internal::OutOfRangeError(
                    arg_name_, ids.shape(), bad, bad_value, num_items));
    ctx->set_output(0, ids);
  }

 private:
  std::string arg_name_;
};

#define REGISTER_GPU(Id)                                          \
  REGISTER_KERNEL_BUILDER(Name("TfrecFastValidateIds")            \
                              .Device(DEVICE_GPU)                 \
                              .HostMemory("num_items")            \
                              .TypeConstraint<Id>("T"),           \
                          ValidateIdsGpuOp<Id>);
REGISTER_GPU(int32);
REGISTER_GPU(int64_t);
#undef REGISTER_GPU

}  // namespace
}  // namespace tensorflow

#endif  // GOOGLE_CUDA
