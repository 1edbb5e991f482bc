// Input checks and the InvalidArgument message of TfrecFastValidateIds, shared
// by its CPU (validate_ids_op.cc) and GPU (validate_ids_op_gpu.cc) kernels so
// both check and say exactly the same thing.
#ifndef TFREC_FAST_TF_VALIDATE_IDS_MESSAGE_H_
#define TFREC_FAST_TF_VALIDATE_IDS_MESSAGE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace tfrec_fast_internal {

// Reads the scalar `num_items` input (host memory) into `*num_items`.
inline Status ReadNumItems(const Tensor& num_items_t, int64_t* num_items) {
  if (!TensorShapeUtils::IsScalar(num_items_t.shape())) {
    return errors::InvalidArgument("num_items must be a scalar, got shape ",
                                   num_items_t.shape().DebugString());
  }
  *num_items = num_items_t.scalar<int64_t>()();
  if (*num_items < 0) {
    return errors::InvalidArgument("num_items must be >= 0, got ",
                                   *num_items);
  }
  return OkStatus();
}

// "[i, j, k]" for flat position `flat` in a tensor of shape `shape`.
inline std::string MultiIndex(const TensorShape& shape, int64_t flat) {
  std::vector<int64_t> index(shape.dims());
  for (int d = shape.dims() - 1; d >= 0; --d) {
    const int64_t size = shape.dim_size(d);
    index[d] = flat % size;
    flat /= size;
  }
  std::string out;
  for (size_t d = 0; d < index.size(); ++d) {
    if (d > 0) out += ", ";
    out += std::to_string(index[d]);
  }
  return out;
}

// "<arg_name>[i, j] = v is out of range [0, C): the first bad id is at flat
// position p of <arg_name> with shape [..]"
inline Status OutOfRangeError(const std::string& arg_name,
                              const TensorShape& shape, int64_t flat,
                              int64_t value, int64_t num_items) {
  return errors::InvalidArgument(
      arg_name, "[", MultiIndex(shape, flat), "] = ", value,
      " is out of range [0, ", num_items,
      "): the first bad id is at flat position ", flat, " of ", arg_name,
      " with shape ", shape.DebugString());
}

}  // namespace tfrec_fast_internal
}  // namespace tensorflow

#endif  // TFREC_FAST_TF_VALIDATE_IDS_MESSAGE_H_
