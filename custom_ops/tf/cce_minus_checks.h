// Attributes and input checks of TfrecFastCceMinus(Grad), shared by the CPU
// (cce_minus_op.cc) and GPU (cce_minus_op_gpu.cc) kernels so both check in
// the same order and say exactly the same thing. Each device checks the
// range of the id inputs its own way (a host scan, or device scans) through
// the `check_ids` callback of CheckCceMinusInputs, at the same points.
#ifndef TFREC_FAST_TF_CCE_MINUS_CHECKS_H_
#define TFREC_FAST_TF_CCE_MINUS_CHECKS_H_

#include <cstdint>
#include <string>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace tfrec_fast_internal {

// Input positions of both ops (the gradient op has two more).
struct CceMinusInput {
  enum : int {
    kHidden = 0,
    kItemTable,
    kItemBias,
    kTargets,
    kNegativeIds,
    kNegativeLogKq,
    kAliasAccept,
    kAliasIndex,
    kLogQTable,
    kRngKey,
    kNumInputs,
    // Gradient op only.
    kLogSumExp = kNumInputs,
    kDLoss,
  };
};

// The `sampling` attribute.
enum class CceMinusSamplingAttr { kGiven, kUniform, kUnigram };

// The attributes of both ops.
struct CceMinusAttrs {
  CceMinusSamplingAttr sampling = CceMinusSamplingAttr::kGiven;
  int64_t num_negatives = 0;  // K per row for the generated modes
  bool remove_hits = true;    // remove_accidental_hits
};

// Reads and checks the attributes of both ops.
inline Status ReadCceMinusAttrs(OpKernelConstruction* ctx,
                                CceMinusAttrs* attrs) {
  std::string name;
  TF_RETURN_IF_ERROR(ctx->GetAttr("sampling", &name));
  TF_RETURN_IF_ERROR(ctx->GetAttr("num_negatives", &attrs->num_negatives));
  TF_RETURN_IF_ERROR(
      ctx->GetAttr("remove_accidental_hits", &attrs->remove_hits));
  if (attrs->num_negatives < 0) {
    return errors::InvalidArgument("num_negatives must be >= 0, got ",
                                   attrs->num_negatives);
  }
  if (name == "given") {
    attrs->sampling = CceMinusSamplingAttr::kGiven;
  } else if (name == "uniform") {
    attrs->sampling = CceMinusSamplingAttr::kUniform;
  } else if (name == "unigram") {
    attrs->sampling = CceMinusSamplingAttr::kUnigram;
  } else {
    return errors::InvalidArgument(
        "sampling must be \"given\", \"uniform\" or \"unigram\", got \"",
        name, "\"");
  }
  return OkStatus();
}

// An OpKernel of either op on either device: the attributes, read and
// checked at construction.
class CceMinusOpKernelBase : public OpKernel {
 public:
  explicit CceMinusOpKernelBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadCceMinusAttrs(ctx, &attrs_));
  }

 protected:
  CceMinusAttrs attrs_;
};

// `t` is a vector of `size` entries ("<name> must be <what> = [size]").
inline Status CheckVector(const Tensor& t, const char* name, int64_t size,
                          const char* what) {
  if (t.dims() != 1 || t.dim_size(0) != size) {
    return errors::InvalidArgument(name, " must be ", what, " = [", size,
                                   "], got shape ", t.shape().DebugString());
  }
  return OkStatus();
}

// The sizes CheckCceMinusInputs found.
struct CceMinusShape {
  int64_t num_rows = 0;       // N
  int64_t num_items = 0;      // C
  int64_t dim = 0;            // D
  int64_t num_negatives = 0;  // K (per row, or shared)
  bool has_bias = false;
  bool shared_negatives = false;  // given [K] (else [N, K] or generated)
};

// Checks every input of both ops (ranks, sizes, the mode's inputs), in one
// fixed order; the first failure is returned. `check_ids(ids, name, C)`
// (returning Status) checks that the ids of the tensor `ids` lie in
// [0, C); it is called for targets right after the checks every mode
// shares, for given negative_ids after their shape checks and for
// alias_index after the unigram tables' shape checks.
template <typename CheckIds>
Status CheckCceMinusInputs(OpKernelContext* ctx, const CceMinusAttrs& attrs,
                           CheckIds&& check_ids, CceMinusShape* shape) {
  using In = CceMinusInput;
  const CceMinusSamplingAttr sampling = attrs.sampling;
  const int64_t num_negatives = attrs.num_negatives;
  const Tensor& hidden = ctx->input(In::kHidden);
  const Tensor& table = ctx->input(In::kItemTable);
  const Tensor& bias = ctx->input(In::kItemBias);
  const Tensor& targets = ctx->input(In::kTargets);
  const Tensor& ids = ctx->input(In::kNegativeIds);
  const Tensor& log_kq = ctx->input(In::kNegativeLogKq);
  const Tensor& accept = ctx->input(In::kAliasAccept);
  const Tensor& alias = ctx->input(In::kAliasIndex);
  const Tensor& log_q = ctx->input(In::kLogQTable);
  const Tensor& rng_key = ctx->input(In::kRngKey);
  if (hidden.dims() != 2) {
    return errors::InvalidArgument("hidden must be [N, D] (rank 2), got shape ",
                                   hidden.shape().DebugString());
  }
  if (table.dims() != 2 || table.dim_size(1) != hidden.dim_size(1)) {
    return errors::InvalidArgument(
        "item_table must be [C, D] with the D = ", hidden.dim_size(1),
        " of hidden, got shape ", table.shape().DebugString());
  }
  const int64_t N = hidden.dim_size(0), C = table.dim_size(0);
  if (bias.dims() != 1 ||
      (bias.dim_size(0) != 0 && bias.dim_size(0) != C)) {
    return errors::InvalidArgument(
        "item_bias must be [C] = [", C, "] or [0] (no bias), got shape ",
        bias.shape().DebugString());
  }
  TF_RETURN_IF_ERROR(CheckVector(targets, "targets", N, "[N]"));
  if (log_kq.shape() != ids.shape()) {
    return errors::InvalidArgument(
        "negative_log_kq ", log_kq.shape().DebugString(),
        " must have the shape of negative_ids ", ids.shape().DebugString());
  }
  if (rng_key.dims() != 1 || rng_key.dim_size(0) != 3) {
    return errors::InvalidArgument(
        "rng_key must be [3] = (seed, step, row_offset), got shape ",
        rng_key.shape().DebugString());
  }
  TF_RETURN_IF_ERROR(check_ids(targets, "targets", C));
  shape->num_rows = N;
  shape->num_items = C;
  shape->dim = hidden.dim_size(1);
  shape->has_bias = bias.dim_size(0) != 0;
  shape->shared_negatives = false;

  if (sampling == CceMinusSamplingAttr::kGiven) {  // the rank decides
    if (ids.dims() == 1) {
      shape->shared_negatives = true;
    } else if (ids.dims() != 2) {
      return errors::InvalidArgument(
          "negative_ids must be [N, K] (per row) or [K] (shared) when "
          "sampling = \"given\", got shape ",
          ids.shape().DebugString());
    } else if (ids.dim_size(0) != N) {
      return errors::InvalidArgument(
          "per-row negative_ids must be [N, K] with the N = ", N,
          " of hidden, got shape ", ids.shape().DebugString());
    }
    TF_RETURN_IF_ERROR(check_ids(ids, "negative_ids", C));
    shape->num_negatives =
        ids.dims() == 1 ? ids.dim_size(0) : ids.dim_size(1);
    return OkStatus();
  }
  const char* mode =
      sampling == CceMinusSamplingAttr::kUniform ? "uniform" : "unigram";
  if (ids.NumElements() != 0) {
    return errors::InvalidArgument(
        "negative_ids must be empty when sampling = \"", mode,
        "\" (the kernel draws num_negatives per row), got shape ",
        ids.shape().DebugString());
  }
  shape->num_negatives = num_negatives;
  if (sampling == CceMinusSamplingAttr::kUnigram) {
    TF_RETURN_IF_ERROR(CheckVector(accept, "alias_accept", C,
                                   "[C] for sampling = \"unigram\""));
    TF_RETURN_IF_ERROR(CheckVector(alias, "alias_index", C,
                                   "[C] for sampling = \"unigram\""));
    TF_RETURN_IF_ERROR(CheckVector(log_q, "log_q_table", C,
                                   "[C] for sampling = \"unigram\""));
    TF_RETURN_IF_ERROR(check_ids(alias, "alias_index", C));
  }
  if (N > 0 && num_negatives > 0 && C == 0) {
    return errors::InvalidArgument("sampling = \"", mode,
                                   "\" needs a non-empty item_table");
  }
  return OkStatus();
}

// The gradient op's extra inputs: logsumexp and d_loss [N].
inline Status CheckCceMinusGradInputs(OpKernelContext* ctx,
                                      int64_t num_rows) {
  TF_RETURN_IF_ERROR(CheckVector(ctx->input(CceMinusInput::kLogSumExp),
                                 "logsumexp", num_rows, "[N]"));
  return CheckVector(ctx->input(CceMinusInput::kDLoss), "d_loss", num_rows,
                     "[N]");
}

}  // namespace tfrec_fast_internal
}  // namespace tensorflow

#endif  // TFREC_FAST_TF_CCE_MINUS_CHECKS_H_
