// Cut cross-entropy on the CPU: workspace layout, the backward's plan and
// reduction, and the runtime choice of instruction set for the vector code
// in cut_cross_entropy_impl.h. See cut_cross_entropy.h.
#include "custom_ops/kernels/cut_cross_entropy.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "custom_ops/kernels/ragged_attention.h"

namespace tfrec_fast {
namespace kernels {
namespace {

// A growable, 64-byte aligned float buffer for per-thread tiles, kept across
// the work units of one worker.
class AlignedFloats {
 public:
  AlignedFloats() = default;
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  ~AlignedFloats() { std::free(data_); }

  // At least `count` floats (contents unspecified), valid until the next Get.
  float* Get(int64_t count) {
    const size_t need = static_cast<size_t>(std::max<int64_t>(count, 1));
    if (need > size_) {
      std::free(data_);
      size_ = need;
      const size_t bytes = (size_ * sizeof(float) + 63) / 64 * 64;
      data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (data_ == nullptr) std::abort();
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace

namespace cce_impl {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TFREC_CCE_X86_MULTI 1

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi,bmi2")
#define TFREC_CCE_NS avx512
#define TFREC_CCE_W 16
#define TFREC_CCE_R 8
#include "custom_ops/kernels/cut_cross_entropy_impl.h"
#undef TFREC_CCE_NS
#undef TFREC_CCE_W
#undef TFREC_CCE_R
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2")
#define TFREC_CCE_NS avx2
#define TFREC_CCE_W 8
#define TFREC_CCE_R 4
#include "custom_ops/kernels/cut_cross_entropy_impl.h"
#undef TFREC_CCE_NS
#undef TFREC_CCE_W
#undef TFREC_CCE_R
#pragma GCC pop_options
#endif

// The build's own target (SSE2 on x86-64, NEON on arm64, ...).
#define TFREC_CCE_NS generic
#define TFREC_CCE_W 4
#define TFREC_CCE_R 4
#include "custom_ops/kernels/cut_cross_entropy_impl.h"
#undef TFREC_CCE_NS
#undef TFREC_CCE_W
#undef TFREC_CCE_R

}  // namespace cce_impl

namespace {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The attention kernels' choice (CPU features capped by TFREC_FAST_CPU_ISA),
// so that both op families always run the same instruction set.
Isa GetIsa() {
  static const Isa isa = [] {
    const std::string name = RaggedAttentionIsa();
#ifdef TFREC_CCE_X86_MULTI
    if (name == "avx512") return Isa::kAvx512;
    if (name == "avx2") return Isa::kAvx2;
#endif
    return Isa::kGeneric;
  }();
  return isa;
}

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
  switch (GetIsa()) {
#ifdef TFREC_CCE_X86_MULTI
    case Isa::kAvx512:
      return cce_impl::avx512::PackForward(dims, args, begin, end);
    case Isa::kAvx2:
      return cce_impl::avx2::PackForward(dims, args, begin, end);
#endif
    default:
      return cce_impl::generic::PackForward(dims, args, begin, end);
  }
}

void CutCrossEntropyForwardWorker(const CutCrossEntropyDims& dims,
                                  const CutCrossEntropyForwardArgs& args,
                                  std::atomic<int64_t>* next) {
  switch (GetIsa()) {
#ifdef TFREC_CCE_X86_MULTI
    case Isa::kAvx512:
      return cce_impl::avx512::ForwardWorker(dims, args, next);
    case Isa::kAvx2:
      return cce_impl::avx2::ForwardWorker(dims, args, next);
#endif
    default:
      return cce_impl::generic::ForwardWorker(dims, args, next);
  }
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
  switch (GetIsa()) {
#ifdef TFREC_CCE_X86_MULTI
    case Isa::kAvx512:
      return cce_impl::avx512::BackwardWorker(dims, args, plan, next);
    case Isa::kAvx2:
      return cce_impl::avx2::BackwardWorker(dims, args, plan, next);
#endif
    default:
      return cce_impl::generic::BackwardWorker(dims, args, plan, next);
  }
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
