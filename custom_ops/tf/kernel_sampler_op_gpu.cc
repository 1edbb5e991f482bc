// GPU kernel of TfrecFastKernelSamplerDraw (the op, its shape function and
// CPU kernel are in kernel_sampler_op.cc). Compiled by g++ with
// -DGOOGLE_CUDA=1 only when the GPU kernels are built; the CUDA code is in
// custom_ops/kernels/kernel_sampler.cu.cc (nvcc). Without GOOGLE_CUDA this
// file compiles to nothing.
//
// key and num are HostMemory inputs (the launch needs them on the host).
// query, tree, counts, snapshot and the outputs live on the device.
// Checks: the CPU kernel's, in its order, with its messages; the query's
// finiteness by a device scan (KernelSamplerGpuFirstNonFinite), whose answer
// is copied back with one stream synchronisation per call before the draw
// kernel is launched.
//
// Same draws as the CPU kernel of this process: the GPU kernel mirrors the
// rounding of the CPU copy that cpu_isa.h picks here (TFREC_FAST_CPU_ISA
// included), so ids are equal and log_q equal within float rounding,
// whichever device runs the op (kernel_sampler_gpu.h).
//
// Only the draw has a GPU kernel: Refresh and Update (which write the
// tree and snapshot variables) stay on the CPU.
#if GOOGLE_CUDA

#include <cmath>
#include <cstdint>
#include <string>

#include "custom_ops/kernels/cpu_isa.h"
#include "custom_ops/kernels/kernel_sampler.h"
#include "custom_ops/kernels/kernel_sampler_gpu.h"
#include "custom_ops/tf/kernel_sampler_checks.h"
#include "custom_ops/tf/gpu_op_util.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace {

namespace ks = ::tfrec_fast::kernels::kernel_sampler;
namespace tk = ::tfrec_fast::kernels;
using tfrec_fast_internal::AllocateGpuWorkspace;
using tfrec_fast_internal::CheckDrawInputs;
using tfrec_fast_internal::ReadDrawAttrs;
using tfrec_fast_internal::CudaStatus;
using tfrec_fast_internal::GetGpuContext;
using tfrec_fast_internal::GpuContext;

constexpr char kOp[] = "TfrecFastKernelSamplerDraw";

// The summation of the CPU copy of DrawRows this process runs: its vector
// width, and whether its compiler fused the products into the sums (the
// AVX2 / AVX-512 copies; the x86-64 baseline has no FMA; other targets
// fuse where the compiler has an FMA).
void MirrorCpuRounding(tk::KernelSamplerGpuDims* d) {
  const tk::CpuIsa isa = tk::GetCpuIsa();
  d->sum_lanes = tk::CpuIsaVectorFloats(isa);
#if defined(__FP_FAST_FMAF)
  d->fused = true;
#else
  d->fused = isa != tk::CpuIsa::kGeneric;
#endif
}

// OkStatus if query [rows, dim] (device) is finite, else the CPU kernel's
// InvalidArgument naming the first NaN / Inf. Waits for the scan.
Status CheckFiniteQuery(OpKernelContext* ctx, const GpuContext& gpu,
                        const Tensor& query, int64_t dim) {
  const int64_t n = query.NumElements();
  if (n == 0) return OkStatus();
  Tensor scratch;
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(DT_INT64, TensorShape({1}), &scratch));
  auto* slot =
      reinterpret_cast<unsigned long long*>(scratch.flat<int64_t>().data());
  const float* q = query.flat<float>().data();
  cudaError_t err =
      tk::KernelSamplerGpuFirstNonFinite(q, n, slot, gpu.stream);
  unsigned long long found = 0;
  if (err == cudaSuccess) {
    err = cudaMemcpyAsync(&found, slot, sizeof(found),
                          cudaMemcpyDeviceToHost, gpu.stream);
  }
  if (err == cudaSuccess) err = cudaStreamSynchronize(gpu.stream);
  TF_RETURN_IF_ERROR(CudaStatus(err, kOp));
  if (found >= static_cast<unsigned long long>(n)) return OkStatus();
  const int64_t flat = static_cast<int64_t>(found);
  float value = 0.0f;
  err = cudaMemcpyAsync(&value, q + flat, sizeof(value),
                        cudaMemcpyDeviceToHost, gpu.stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(gpu.stream);
  TF_RETURN_IF_ERROR(CudaStatus(err, kOp));
  return errors::InvalidArgument("query[", flat / dim, ", ", flat % dim,
                                 "] = ", value, " is not finite; the kernel "
                                 "sampler needs finite query rows");
}

class KernelSamplerDrawGpuOp : public OpKernel {
 public:
  explicit KernelSamplerDrawGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadDrawAttrs(ctx, &alpha_, &leaf_size_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& query = ctx->input(0);
    const Tensor& tree = ctx->input(1);
    const Tensor& counts = ctx->input(2);
    const Tensor& snapshot = ctx->input(3);
    const Tensor& key = ctx->input(4);    // HostMemory
    const Tensor& num_t = ctx->input(5);  // HostMemory
    int64_t num = 0;
    ks::TreeLayout layout;
    OP_REQUIRES_OK(ctx, CheckDrawInputs(query, tree, counts, snapshot, key,
                                        num_t, leaf_size_, &num, &layout));
    const int64_t num_items = snapshot.dim_size(0);
    const int64_t dim = snapshot.dim_size(1);
    GpuContext gpu;
    OP_REQUIRES_OK(ctx, GetGpuContext(ctx, kOp, &gpu));
    OP_REQUIRES_OK(ctx, CheckFiniteQuery(ctx, gpu, query, dim));

    const int64_t rows = query.dim_size(0);
    Tensor* ids = nullptr;
    Tensor* log_q = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({rows, num}),
                                             &ids));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({rows, num}),
                                             &log_q));
    if (rows == 0) return;

    tk::KernelSamplerGpuDims d;
    d.num_rows = rows;
    d.num_items = num_items;
    d.dim = dim;
    d.leaf_size = leaf_size_;
    d.num_draws = num;
    d.alpha = alpha_;
    const auto k = key.flat<int32>();
    d.seed = (static_cast<uint64_t>(static_cast<uint32_t>(k(0))) << 32) |
             static_cast<uint64_t>(static_cast<uint32_t>(k(1)));
    MirrorCpuRounding(&d);
    d.device = gpu.device;
    tk::KernelSamplerGpuInputs in;
    in.query = query.flat<float>().data();
    in.tree = tree.flat<float>().data();
    in.counts = counts.flat<int64_t>().data();
    in.snapshot = snapshot.flat<float>().data();

    size_t bytes = 0;
    OP_REQUIRES_OK(ctx,
                   CudaStatus(tk::KernelSamplerGpuWorkspaceBytes(d, &bytes),
                              kOp));
    Tensor workspace;
    OP_REQUIRES_OK(ctx, AllocateGpuWorkspace(ctx, bytes, &workspace));
    OP_REQUIRES_OK(ctx, CudaStatus(tk::KernelSamplerGpuDraw(
                                       d, in, ids->flat<int64_t>().data(),
                                       log_q->flat<float>().data(),
                                       workspace.flat<int8>().data(), bytes,
                                       gpu.stream),
                                   kOp));
  }

 private:
  float alpha_ = 1.0f;
  int64_t leaf_size_ = 1;
};

REGISTER_KERNEL_BUILDER(Name("TfrecFastKernelSamplerDraw")
                            .Device(DEVICE_GPU)
                            .HostMemory("key")
                            .HostMemory("num"),
                        KernelSamplerDrawGpuOp);

}  // namespace
}  // namespace tensorflow

#endif  // GOOGLE_CUDA
