// Input checks of TfrecFastRaggedAttention(Grad), shared by the CPU
// (ragged_attention_op.cc) and GPU (ragged_attention_op_gpu.cc) kernels so
// both check and say exactly the same thing.
#ifndef TFREC_FAST_TF_RAGGED_ATTENTION_CHECKS_H_
#define TFREC_FAST_TF_RAGGED_ATTENTION_CHECKS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "custom_ops/kernels/ragged_attention.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace tfrec_fast_internal {

// row_splits is a vector [B + 1] with at least one entry.
inline Status CheckRowSplitsShape(const Tensor& splits) {
  if (splits.dims() != 1 || splits.dim_size(0) < 1) {
    return errors::InvalidArgument(
        "row_splits must be a vector [B + 1] with at least one entry, got "
        "shape ",
        splits.shape().DebugString());
  }
  return OkStatus();
}

// "queries [T, H, Dh]" style shape checks of both ops, CPU and GPU.
inline Status CheckPacked(const Tensor& q, const Tensor& k, const Tensor& v,
                          const Tensor& splits) {
  const struct {
    const char* name;
    const Tensor* t;
    const char* layout;
  } packed[] = {{"queries", &q, "[T, H, Dh]"},
                {"keys", &k, "[T, H, Dh]"},
                {"values", &v, "[T, H, Dv]"}};
  for (const auto& p : packed) {
    if (p.t->dims() != 3) {
      return errors::InvalidArgument(p.name, " must be packed ", p.layout,
                                     " (rank 3), got shape ",
                                     p.t->shape().DebugString());
    }
  }
  if (k.shape() != q.shape()) {
    return errors::InvalidArgument("keys ", k.shape().DebugString(),
                                   " must have the shape of queries ",
                                   q.shape().DebugString());
  }
  if (v.dim_size(0) != q.dim_size(0) || v.dim_size(1) != q.dim_size(1)) {
    return errors::InvalidArgument(
        "values ", v.shape().DebugString(),
        " must have the [T, H] of queries and keys ",
        q.shape().DebugString());
  }
  return CheckRowSplitsShape(splits);
}

// "qkv [T, 3, H, D]" shape check of the q/k/v-packed ops.
inline Status CheckQkvPacked(const Tensor& qkv, const Tensor& splits) {
  if (qkv.dims() != 4 || qkv.dim_size(1) != 3) {
    return errors::InvalidArgument(
        "qkv must be packed [T, 3, H, D] (queries, keys, values), got shape ",
        qkv.shape().DebugString());
  }
  return CheckRowSplitsShape(splits);
}

// Shapes of the gradient ops' extra inputs: out and d_out of `out_shape`
// ([T, H, Dv], the shape of the forward's output), logsumexp [T, H].
inline Status CheckGradInputs(const TensorShape& out_shape, const Tensor& out,
                              const Tensor& lse, const Tensor& d_out) {
  const char* what = "the forward's out ";
  if (out.shape() != out_shape) {
    return errors::InvalidArgument("out ", out.shape().DebugString(),
                                   " must have the shape of ", what,
                                   out_shape.DebugString());
  }
  if (d_out.shape() != out_shape) {
    return errors::InvalidArgument("d_out ", d_out.shape().DebugString(),
                                   " must have the shape of ", what,
                                   out_shape.DebugString());
  }
  if (lse.dims() != 2 || lse.dim_size(0) != out_shape.dim_size(0) ||
      lse.dim_size(1) != out_shape.dim_size(1)) {
    return errors::InvalidArgument(
        "logsumexp must be [T, H] = [", out_shape.dim_size(0), ", ",
        out_shape.dim_size(1), "], got shape ", lse.shape().DebugString());
  }
  return OkStatus();
}

// Reads row_splits (int32 or int64) into int64 and validates it.
inline Status ReadRowSplits(const Tensor& splits, int64_t num_tokens,
                            std::vector<int64_t>* out) {
  const int64_t n = splits.dim_size(0);
  out->resize(n);
  if (splits.dtype() == DT_INT32) {
    const auto flat = splits.flat<int32>();
    for (int64_t i = 0; i < n; ++i) (*out)[i] = flat(i);
  } else {
    const auto flat = splits.flat<int64_t>();
    for (int64_t i = 0; i < n; ++i) (*out)[i] = flat(i);
  }
  const std::string problem = tfrec_fast::kernels::CheckRowSplits(
      out->data(), n - 1, num_tokens, "row_splits");
  if (!problem.empty()) return errors::InvalidArgument(problem);
  return OkStatus();
}

}  // namespace tfrec_fast_internal
}  // namespace tensorflow

#endif  // TFREC_FAST_TF_RAGGED_ATTENTION_CHECKS_H_
