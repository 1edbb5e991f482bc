// Cut cross-entropy on the CPU: workspace layout, the backward's plan and
// reduction, and the dispatch to the vector code in cut_cross_entropy_impl.h
// (one copy per instruction set: cpu_isa.h). See cut_cross_entropy.h.
#include "custom_ops/kernels/cut_cross_entropy.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "custom_ops/kernels/aligned_floats.h"
#include "custom_ops/kernels/cpu_isa.h"

namespace tfrec_fast {
namespace kernels {

namespace cce_impl {
#define TFREC_ISA_IMPL "custom_ops/kernels/cut_cross_entropy_impl.h"
#include "custom_ops/kernels/cpu_isa_variants.h"
}  // namespace cce_impl

namespace {

// Backward groups per thread: enough for a thread slowed by other work to
// hand its share to the others, few enough that the dH partials (one per
// group) stay small.
constexpr int64_t kGroupsPerThread = 4;
// Cap on the backward's dH partials (floats; 256 MiB): with many threads
// and many rows, fewer groups share the items.
constexpr int64_t kMaxPartialFloats = int64_t{64} * 1024 * 1024;

int64_t RoundUpTo(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace

int64_t CutCrossEntropyItemBlocks(const CutCrossEntropyDims& dims) {
  return (dims.num_items + kCceItemBlock - 1) / kCceItemBlock;
}

int64_t CutCrossEntropyForwardWorkspace(const CutCrossEntropyDims& dims) {
  const int64_t blocks = CutCrossEntropyItemBlocks(dims);
  return blocks * dims.dim * kCceItemStride + blocks * kCceItemBlock;
}

int64_t CutCrossEntropyForwardUnits(const CutCrossEntropyDims& dims) {
  return (dims.num_rows + kCceRowChunk - 1) / kCceRowChunk;
}

void CutCrossEntropyPackForward(const CutCrossEntropyDims& dims,
                                const CutCrossEntropyForwardArgs& args,
                                int64_t begin, int64_t end) {
  TFREC_FAST_ISA_DISPATCH(cce_impl, PackForward(dims, args, begin, end));
}

void CutCrossEntropyForwardWorker(const CutCrossEntropyDims& dims,
                                  const CutCrossEntropyForwardArgs& args,
                                  std::atomic<int64_t>* next) {
  TFREC_FAST_ISA_DISPATCH(cce_impl, ForwardWorker(dims, args, next));
}

CutCrossEntropyBackwardPlan PlanCutCrossEntropyBackward(
    const CutCrossEntropyDims& dims, const float* d_loss, int max_workers) {
  CutCrossEntropyBackwardPlan plan;
  const int64_t N = dims.num_rows;
  plan.num_blocks = CutCrossEntropyItemBlocks(dims);
  plan.padded_dim = RoundUpTo(dims.dim, 16);
  plan.compact.assign(static_cast<size_t>(N), -1);
  for (int64_t t = 0; t < N; ++t) {
    // NaN != 0: a NaN upstream gradient is live and propagates.
    if (d_loss[t] != 0.0f) {
      plan.compact[t] = static_cast<int64_t>(plan.rows.size());
      plan.rows.push_back(t);
    }
  }
  plan.padded_rows =
      RoundUpTo(static_cast<int64_t>(plan.rows.size()), kCceRowAlign);
  const int64_t rows_floats = plan.padded_rows * plan.padded_dim;
  const int64_t threads = std::max(1, max_workers);
  int64_t groups = std::min(plan.num_blocks, kGroupsPerThread * threads);
  if (rows_floats > 0) {
    groups = std::min(groups, kMaxPartialFloats / rows_floats);
  }
  groups = std::max<int64_t>(groups, 1);
  plan.num_groups = groups;
  plan.num_workers = static_cast<int>(std::min(threads, groups));
  plan.partial_offset = rows_floats;
  plan.workspace_floats = rows_floats + groups * rows_floats;
  // Contiguous, equal shares of blocks, fixed by the plan: which thread
  // runs a group does not change any sum.
  plan.block_begin.resize(static_cast<size_t>(groups) + 1);
  for (int64_t k = 0; k <= groups; ++k) {
    plan.block_begin[k] = plan.num_blocks * k / groups;
  }
  return plan;
}

void CutCrossEntropyPackBackward(const CutCrossEntropyDims& dims,
                                 const CutCrossEntropyBackwardArgs& args,
                                 const CutCrossEntropyBackwardPlan& plan,
                                 int64_t begin, int64_t end) {
  const int64_t D = dims.dim, Dp = plan.padded_dim;
  const int64_t live = static_cast<int64_t>(plan.rows.size());
  for (int64_t i = begin; i < end; ++i) {
    float* dst = args.workspace + i * Dp;
    if (i < live) {
      std::memcpy(dst, args.hidden + plan.rows[i] * D, sizeof(float) * D);
      std::memset(dst + D, 0, sizeof(float) * (Dp - D));
    } else {
      std::memset(dst, 0, sizeof(float) * Dp);
    }
  }
}

void CutCrossEntropyBackwardWorker(const CutCrossEntropyDims& dims,
                                   const CutCrossEntropyBackwardArgs& args,
                                   const CutCrossEntropyBackwardPlan& plan,
                                   std::atomic<int64_t>* next) {
  TFREC_FAST_ISA_DISPATCH(cce_impl, BackwardWorker(dims, args, plan, next));
}

void CutCrossEntropyBackwardReduce(const CutCrossEntropyDims& dims,
                                   const CutCrossEntropyBackwardArgs& args,
                                   const CutCrossEntropyBackwardPlan& plan,
                                   int64_t begin, int64_t end) {
  const int64_t D = dims.dim, Dp = plan.padded_dim;
  const int64_t stride = plan.padded_rows * Dp;
  const float* partials = args.workspace + plan.partial_offset;
  for (int64_t t = begin; t < end; ++t) {
    float* dst = args.d_hidden + t * D;
    const int64_t i = plan.compact[t];
    if (i < 0) {
      std::memset(dst, 0, sizeof(float) * D);
      continue;
    }
    const float* src = partials + i * Dp;
    std::memcpy(dst, src, sizeof(float) * D);
    for (int64_t k = 1; k < plan.num_groups; ++k) {
      const float* p = src + k * stride;
      for (int64_t d = 0; d < D; ++d) dst[d] += p[d];
    }
  }
}

void CutCrossEntropyForward(const CutCrossEntropyDims& dims,
                            CutCrossEntropyForwardArgs args) {
  std::vector<float> workspace(
      static_cast<size_t>(CutCrossEntropyForwardWorkspace(dims)));
  args.workspace = workspace.data();
  CutCrossEntropyPackForward(dims, args, 0, CutCrossEntropyItemBlocks(dims));
  std::atomic<int64_t> next(0);
  CutCrossEntropyForwardWorker(dims, args, &next);
}

void CutCrossEntropyBackward(const CutCrossEntropyDims& dims,
                             CutCrossEntropyBackwardArgs args) {
  const CutCrossEntropyBackwardPlan plan =
      PlanCutCrossEntropyBackward(dims, args.d_loss, 1);
  std::vector<float> workspace(static_cast<size_t>(plan.workspace_floats));
  args.workspace = workspace.data();
  CutCrossEntropyPackBackward(dims, args, plan, 0, plan.padded_rows);
  std::atomic<int64_t> next(0);
  CutCrossEntropyBackwardWorker(dims, args, plan, &next);
  CutCrossEntropyBackwardReduce(dims, args, plan, 0, dims.num_rows);
}

}  // namespace kernels
}  // namespace tfrec_fast
