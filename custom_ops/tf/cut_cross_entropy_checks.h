// Input checks of TfrecFastCutCrossEntropy(Grad), shared by the CPU
// (cut_cross_entropy_op.cc) and GPU (cut_cross_entropy_op_gpu.cc) kernels so
// both check in the same order and say exactly the same thing. (The range
// of targets is checked by each device its own way, with
// validate_ids_message.h's wording.)
#ifndef TFREC_FAST_TF_CUT_CROSS_ENTROPY_CHECKS_H_
#define TFREC_FAST_TF_CUT_CROSS_ENTROPY_CHECKS_H_

#include <cstdint>

#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace tfrec_fast_internal {

// Ranks and sizes of hidden [N, D], item_table [C, D], item_bias [C] or
// [0], targets [N]; C = 0 only with N = 0.
inline Status CheckCutCrossEntropyInputs(const Tensor& h, const Tensor& w,
                                         const Tensor& bias,
                                         const Tensor& targets) {
  if (h.dims() != 2) {
    return errors::InvalidArgument("hidden must be a matrix [N, D], got shape ",
                                   h.shape().DebugString());
  }
  if (w.dims() != 2) {
    return errors::InvalidArgument(
        "item_table must be a matrix [C, D], got shape ",
        w.shape().DebugString());
  }
  if (h.dim_size(1) != w.dim_size(1)) {
    return errors::InvalidArgument(
        "hidden ", h.shape().DebugString(), " and item_table ",
        w.shape().DebugString(), " must have the same D (dimension 1)");
  }
  if (bias.dims() != 1 ||
      (bias.dim_size(0) != w.dim_size(0) && bias.dim_size(0) != 0)) {
    return errors::InvalidArgument(
        "item_bias must be [C] = [", w.dim_size(0),
        "] (dimension 0 of item_table) or [0] for no bias, got shape ",
        bias.shape().DebugString());
  }
  if (targets.dims() != 1 || targets.dim_size(0) != h.dim_size(0)) {
    return errors::InvalidArgument(
        "targets must be [N] = [", h.dim_size(0),
        "] (dimension 0 of hidden), got shape ", targets.shape().DebugString());
  }
  if (w.dim_size(0) == 0 && h.dim_size(0) > 0) {
    return errors::InvalidArgument(
        "item_table has no items (C = 0, shape ", w.shape().DebugString(),
        ") but hidden has N = ", h.dim_size(0),
        " rows: the softmax over an empty catalog is undefined");
  }
  return OkStatus();
}

// The gradient op's extra inputs: logsumexp and d_loss [N] (after
// CheckCutCrossEntropyInputs).
inline Status CheckCutCrossEntropyGradInputs(const Tensor& h,
                                             const Tensor& lse,
                                             const Tensor& d_loss) {
  const int64_t n = h.dim_size(0);
  if (lse.dims() != 1 || lse.dim_size(0) != n) {
    return errors::InvalidArgument("logsumexp must be [N] = [", n,
                                   "] (dimension 0 of hidden), got shape ",
                                   lse.shape().DebugString());
  }
  if (d_loss.dims() != 1 || d_loss.dim_size(0) != n) {
    return errors::InvalidArgument("d_loss must be [N] = [", n,
                                   "] (dimension 0 of hidden), got shape ",
                                   d_loss.shape().DebugString());
  }
  return OkStatus();
}

}  // namespace tfrec_fast_internal
}  // namespace tensorflow

#endif  // TFREC_FAST_TF_CUT_CROSS_ENTROPY_CHECKS_H_
