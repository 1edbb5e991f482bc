// Attribute and input checks of TfrecFastKernelSamplerDraw, shared by the CPU
// (kernel_sampler_op.cc) and GPU (kernel_sampler_op_gpu.cc) kernels so both
// check in the same order and say exactly the same thing. The finiteness
// of the query is checked by each device its own way, after these.
#ifndef TFREC_FAST_TF_KERNEL_SAMPLER_CHECKS_H_
#define TFREC_FAST_TF_KERNEL_SAMPLER_CHECKS_H_

#include <cstdint>

#include <cmath>

#include "custom_ops/kernels/kernel_sampler.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace tfrec_fast_internal {

// The draw op's attributes: alpha (finite, > 0) and leaf_size.
inline Status ReadDrawAttrs(OpKernelConstruction* ctx, float* alpha,
                            int64_t* leaf_size) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("alpha", alpha));
  TF_RETURN_IF_ERROR(ctx->GetAttr("leaf_size", leaf_size));
  if (!(std::isfinite(*alpha) && *alpha > 0.0f)) {
    return errors::InvalidArgument("alpha must be a finite number > 0, got ",
                                   *alpha);
  }
  return OkStatus();
}

// Checks the layout sizes: tree [2 ceil(C / L), S(D)] for C items of width D.
inline Status CheckTreeShape(
    const TensorShape& tree, int64_t num_items, int64_t dim,
    int64_t leaf_size,
    ::tfrec_fast::kernels::kernel_sampler::TreeLayout* layout) {
  if (num_items < 1 || dim < 1) {
    return errors::InvalidArgument(
        "the item table must have at least one row and one column, got [",
        num_items, ", ", dim, "]");
  }
  *layout = ::tfrec_fast::kernels::kernel_sampler::MakeLayout(
      num_items, dim, leaf_size);
  if (tree.dims() != 2 || tree.dim_size(0) != layout->num_rows ||
      tree.dim_size(1) != layout->stride) {
    return errors::InvalidArgument(
        "tree must have shape [", layout->num_rows, ", ", layout->stride,
        "] for C = ", num_items, " items of dimension D = ", dim,
        " in leaves of ", leaf_size, ", got ", tree.DebugString());
  }
  return OkStatus();
}

// Shapes of the draw op's inputs (query, tree, counts, snapshot, key, num);
// sets K and the tree layout.
inline Status CheckDrawInputs(
    const Tensor& query, const Tensor& tree, const Tensor& counts,
    const Tensor& snapshot, const Tensor& key, const Tensor& num_t,
    int64_t leaf_size, int64_t* num,
    ::tfrec_fast::kernels::kernel_sampler::TreeLayout* layout) {
  if (!TensorShapeUtils::IsMatrix(query.shape())) {
    return errors::InvalidArgument("query must be [T, D], got ",
                                   query.shape().DebugString());
  }
  if (!TensorShapeUtils::IsMatrix(snapshot.shape())) {
    return errors::InvalidArgument("snapshot must be [C, D], got ",
                                   snapshot.shape().DebugString());
  }
  if (key.NumElements() != 2) {
    return errors::InvalidArgument("key must have 2 elements, got ",
                                   key.shape().DebugString());
  }
  if (!TensorShapeUtils::IsScalar(num_t.shape())) {
    return errors::InvalidArgument("num must be a scalar");
  }
  *num = num_t.scalar<int32>()();
  if (*num <= 0) {
    return errors::InvalidArgument("num must be > 0, got ", *num);
  }
  const int64_t num_items = snapshot.dim_size(0);
  const int64_t dim = snapshot.dim_size(1);
  if (query.dim_size(1) != dim) {
    return errors::InvalidArgument(
        "query [T, D] and the item table [C, D] must have the same D, got "
        "query ", query.shape().DebugString(),
        " and item rows of dimension ", dim);
  }
  TF_RETURN_IF_ERROR(
      CheckTreeShape(tree.shape(), num_items, dim, leaf_size, layout));
  if (counts.dims() != 1 || counts.dim_size(0) != layout->num_rows) {
    return errors::InvalidArgument("counts must have shape [",
                                   layout->num_rows, "], got ",
                                   counts.shape().DebugString());
  }
  return OkStatus();
}

}  // namespace tfrec_fast_internal
}  // namespace tensorflow

#endif  // TFREC_FAST_TF_KERNEL_SAMPLER_CHECKS_H_
