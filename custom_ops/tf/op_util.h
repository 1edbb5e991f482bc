// Helpers of the CPU OpKernels (cce_minus_op.cc, cut_cross_entropy_op.cc,
// ragged_attention_op.cc): float32 views of half / bfloat16 tensors for the
// float32 kernels and the copy back, running kernel workers on TF's
// intra-op thread pool, and the id-range check of id inputs. Include it
// with EIGEN_USE_THREADS defined (first thing in the op's .cc), as the
// conversions run on the CPU device's Eigen thread pool.
#ifndef TFREC_FAST_TF_OP_UTIL_H_
#define TFREC_FAST_TF_OP_UTIL_H_

#ifndef EIGEN_USE_THREADS
#error "define EIGEN_USE_THREADS before including op_util.h"
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>

#include "custom_ops/kernels/validate_ids.h"
#include "custom_ops/tf/validate_ids_message.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tensorflow {
namespace tfrec_fast_internal {

// ---------------------------------------------------------------------------
// float32 views: the kernels compute in float32; half and bfloat16 inputs
// are converted for them and their outputs converted back.

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

// Copies the float32 `buffer` of AllocateOutput into `output` (nothing to
// do for float).
template <typename T>
void FromFloat(OpKernelContext* ctx, const Tensor& buffer, Tensor* output) {
  if constexpr (!std::is_same<T, float>::value) {
    output->flat<T>().device(ctx->eigen_cpu_device()) =
        buffer.flat<float>().template cast<T>();
  }
}

// ---------------------------------------------------------------------------
// The intra-op thread pool.

inline thread::ThreadPool* CpuThreadPool(OpKernelContext* ctx) {
  return ctx->device()->tensorflow_cpu_worker_threads()->workers;
}

// Threads of the intra-op pool.
inline int NumWorkers(OpKernelContext* ctx) {
  return CpuThreadPool(ctx)->NumThreads();
}

// Runs fn(k) for k in [0, tasks), each on a pool thread of its own (inline
// when tasks <= 1).
template <typename Fn>
void RunTasks(OpKernelContext* ctx, int64_t tasks, Fn fn) {
  if (tasks <= 1) {
    if (tasks == 1) fn(0);
    return;
  }
  // A huge cost per unit makes ParallelFor run one task per unit.
  CpuThreadPool(ctx)->ParallelFor(tasks, /*cost_per_unit=*/int64_t{1} << 40,
                                  [&](int64_t begin, int64_t end) {
                                    for (int64_t k = begin; k < end; ++k) {
                                      fn(k);
                                    }
                                  });
}

// Runs worker(&next) on min(NumWorkers, max_workers) pool threads (at least
// one), all with the same counter `next` (starting at 0) from which they
// pull their work items.
template <typename Fn>
void RunWorkers(OpKernelContext* ctx, int64_t max_workers, Fn worker) {
  std::atomic<int64_t> next(0);
  const int64_t tasks = std::max<int64_t>(
      1, std::min<int64_t>(NumWorkers(ctx), max_workers));
  RunTasks(ctx, tasks, [&](int64_t) { worker(&next); });
}

// Runs fn(i) for every i in [0, n) on up to NumWorkers pool threads, which
// pull the indices from a shared counter (uneven items balance out).
inline void PullParallelFor(OpKernelContext* ctx, int64_t n,
                            const std::function<void(int64_t)>& fn) {
  RunWorkers(ctx, n, [&](std::atomic<int64_t>* next) {
    for (int64_t i = next->fetch_add(1); i < n; i = next->fetch_add(1)) fn(i);
  });
}

// ---------------------------------------------------------------------------
// Id inputs.

// OkStatus if every id of `ids` (int32 or int64, any shape) lies in
// [0, num_items); else TfrecFastValidateIds's InvalidArgument for the first
// one outside, naming it `name`.
inline Status CheckIdsInRange(const Tensor& ids, const std::string& name,
                              int64_t num_items) {
  const int64_t n = ids.NumElements();
  int64_t bad = -1, value = 0;
  if (ids.dtype() == DT_INT32) {
    const int32* data = ids.flat<int32>().data();
    bad = tfrec_fast::kernels::FirstOutOfRange(data, 0, n, num_items);
    if (bad >= 0) value = data[bad];
  } else {
    const int64_t* data = ids.flat<int64_t>().data();
    bad = tfrec_fast::kernels::FirstOutOfRange(data, 0, n, num_items);
    if (bad >= 0) value = data[bad];
  }
  if (bad < 0) return OkStatus();
  return OutOfRangeError(name, ids.shape(), bad, value, num_items);
}

}  // namespace tfrec_fast_internal
}  // namespace tensorflow

#endif  // TFREC_FAST_TF_OP_UTIL_H_
