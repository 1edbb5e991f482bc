// Packed attention on the CPU: work planning, the reduction of split
// (sequence, head)s, and the dispatch to the vector code in
// ragged_attention_impl.h (one copy per instruction set: cpu_isa.h). See
// ragged_attention.h.
#include "custom_ops/kernels/ragged_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "custom_ops/kernels/aligned_floats.h"
#include "custom_ops/kernels/cpu_isa.h"

namespace tfrec_fast {
namespace kernels {

namespace ra_impl {
#define TFREC_ISA_IMPL "custom_ops/kernels/ragged_attention_impl.h"
#include "custom_ops/kernels/cpu_isa_variants.h"
}  // namespace ra_impl

namespace {

// Pairs (query, key) one (sequence, head) of `n` tokens computes.
double Pairs(int64_t n, bool causal) {
  const double x = static_cast<double>(n);
  return causal ? x * (x + 1) / 2 : x * x;
}

// Fewest query rows per chunk when a (sequence, head) is split.
constexpr int64_t kMinChunkRows = 64;
// Key rows summed by one reduce unit.
constexpr int64_t kReduceRows = 64;
// Cap on the backward workspace for partial dK, dV (floats; 128 MiB): past
// it, long rows are split into fewer chunks.
constexpr double kMaxWorkspaceFloats = 32.0 * 1024 * 1024;

}  // namespace

std::string CheckRowSplits(const int64_t* row_splits, int64_t num_rows,
                           int64_t num_tokens, const std::string& arg_name) {
  if (num_rows < 0) {
    return arg_name + " must have at least one entry (B + 1 >= 1)";
  }
  if (row_splits[0] != 0) {
    return arg_name + "[0] must be 0, got " + std::to_string(row_splits[0]);
  }
  for (int64_t b = 0; b < num_rows; ++b) {
    if (row_splits[b + 1] < row_splits[b]) {
      return arg_name + " must be non-decreasing, but " + arg_name + "[" +
             std::to_string(b + 1) + "] = " +
             std::to_string(row_splits[b + 1]) + " < " + arg_name + "[" +
             std::to_string(b) + "] = " + std::to_string(row_splits[b]);
    }
  }
  if (row_splits[num_rows] != num_tokens) {
    return arg_name + "[-1] = " + arg_name + "[" + std::to_string(num_rows) +
           "] = " + std::to_string(row_splits[num_rows]) +
           " must equal the number of packed tokens T = " +
           std::to_string(num_tokens) + " (dimension 0 of queries)";
  }
  return "";
}

RaggedAttentionPlan PlanRaggedAttention(const int64_t* row_splits,
                                        int64_t num_rows,
                                        const RaggedAttentionDims& dims,
                                        int num_workers) {
  RaggedAttentionPlan plan;
  const int64_t H = dims.num_heads;
  const double width = static_cast<double>(dims.head_dim + dims.value_dim);
  // Cycles are roughly proportional to pairs * (Dh + Dv) plus the exps, and
  // the per-item packing of keys and values.
  auto cost = [&](double pairs, int64_t keys) {
    return pairs * (width + 8.0) + 3.0 * static_cast<double>(keys) * width;
  };
  double total = 0;
  for (int64_t b = 0; b < num_rows; ++b) {
    const int64_t n = row_splits[b + 1] - row_splits[b];
    total += static_cast<double>(H) * cost(Pairs(n, dims.causal), n);
  }
  plan.total_cost = total;
  const double target = num_workers > 1
                            ? total / (4.0 * num_workers)
                            : std::numeric_limits<double>::infinity();

  std::vector<RaggedAttentionItem> items;
  std::vector<int64_t> split_of;  // per item: split index or -1
  for (int64_t b = 0; b < num_rows; ++b) {
    const int64_t start = row_splits[b];
    const int64_t n = row_splits[b + 1] - start;
    if (n == 0 || H == 0) continue;
    const double c = cost(Pairs(n, dims.causal), n);
    int64_t chunks = 1;
    if (c > target) {
      chunks = static_cast<int64_t>(std::ceil(c / target));
      chunks = std::min(chunks, (n + kMinChunkRows - 1) / kMinChunkRows);
      const double per_chunk = static_cast<double>(n) * width;
      const double budget =
          kMaxWorkspaceFloats - static_cast<double>(plan.workspace_floats);
      chunks = std::min<int64_t>(
          chunks, std::max<int64_t>(
                      1, static_cast<int64_t>(budget / (H * per_chunk))));
      chunks = std::max<int64_t>(chunks, 1);
    }
    for (int64_t h = 0; h < H; ++h) {
      if (chunks == 1) {
        RaggedAttentionItem it;
        it.start = start;
        it.length = n;
        it.head = h;
        it.q_begin = 0;
        it.q_end = n;
        it.key_end = n;
        it.cost = c;
        items.push_back(it);
        split_of.push_back(-1);
        continue;
      }
      RaggedAttentionSplit split;
      split.start = start;
      split.length = n;
      split.head = h;
      const int64_t split_index = static_cast<int64_t>(plan.splits.size());
      int64_t begin = 0;
      for (int64_t k = 1; k <= chunks; ++k) {
        // Equal pairs per chunk: causal rows cost more further down.
        const double f = static_cast<double>(k) / chunks;
        int64_t end = k == chunks ? n
                                  : static_cast<int64_t>(std::llround(
                                        n * (dims.causal ? std::sqrt(f) : f)));
        end = std::min(std::max(end, begin + 1), n);
        if (end <= begin) break;
        RaggedAttentionItem it;
        it.start = start;
        it.length = n;
        it.head = h;
        it.q_begin = begin;
        it.q_end = end;
        it.key_end = dims.causal ? end : n;
        it.partial = plan.workspace_floats;
        plan.workspace_floats += it.key_end * (dims.head_dim + dims.value_dim);
        const double pairs =
            dims.causal ? Pairs(end, true) - Pairs(begin, true)
                        : static_cast<double>(end - begin) * n;
        it.cost = cost(pairs, it.key_end);
        split.items.push_back(static_cast<int64_t>(items.size()));
        items.push_back(it);
        split_of.push_back(split_index);
        begin = end;
      }
      plan.splits.push_back(std::move(split));
    }
  }
  // Longest first, then pulled in order by the workers (greedy LPT).
  std::vector<int64_t> order(items.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return items[a].cost > items[b].cost;
  });
  std::vector<int64_t> position(items.size());
  plan.items.reserve(items.size());
  for (size_t i = 0; i < order.size(); ++i) {
    position[order[i]] = static_cast<int64_t>(i);
    plan.items.push_back(items[order[i]]);
  }
  for (size_t s = 0; s < plan.splits.size(); ++s) {
    for (int64_t& index : plan.splits[s].items) index = position[index];
    const int64_t n = plan.splits[s].length;
    for (int64_t r = 0; r < n; r += kReduceRows) {
      plan.reduce_units.push_back(
          {static_cast<int64_t>(s), r, std::min(n, r + kReduceRows)});
    }
  }
  return plan;
}

void RaggedAttentionForwardWorker(const RaggedAttentionDims& dims,
                                  const RaggedAttentionForwardArgs& args,
                                  const RaggedAttentionPlan& plan,
                                  std::atomic<int64_t>* next) {
  TFREC_FAST_ISA_DISPATCH(ra_impl, ForwardWorker(dims, args, plan, next));
}

void RaggedAttentionBackwardWorker(const RaggedAttentionDims& dims,
                                   const RaggedAttentionBackwardArgs& args,
                                   const RaggedAttentionPlan& plan,
                                   std::atomic<int64_t>* next) {
  TFREC_FAST_ISA_DISPATCH(ra_impl, BackwardWorker(dims, args, plan, next));
}

void RaggedAttentionReduce(const RaggedAttentionDims& dims,
                           const RaggedAttentionBackwardArgs& args,
                           const RaggedAttentionPlan& plan, int64_t begin,
                           int64_t end) {
  const int64_t Dh = dims.head_dim, Dv = dims.value_dim;
  const int64_t qs = dims.QKStride(), vs = dims.VStride();
  std::vector<float> acc(static_cast<size_t>(Dh + Dv));
  for (int64_t u = begin; u < end; ++u) {
    const RaggedAttentionReduceUnit& unit = plan.reduce_units[u];
    const RaggedAttentionSplit& split = plan.splits[unit.split];
    for (int64_t j = unit.row_begin; j < unit.row_end; ++j) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (const int64_t index : split.items) {
        const RaggedAttentionItem& it = plan.items[index];
        if (j >= it.key_end) continue;
        const float* pk = args.workspace + it.partial + j * Dh;
        const float* pv = args.workspace + it.partial + it.key_end * Dh +
                          j * Dv;
        for (int64_t d = 0; d < Dh; ++d) acc[d] += pk[d];
        for (int64_t c = 0; c < Dv; ++c) acc[Dh + c] += pv[c];
      }
      const int64_t t = split.start + j;
      std::copy(acc.begin(), acc.begin() + Dh,
                args.dk + t * qs + split.head * Dh);
      std::copy(acc.begin() + Dh, acc.end(),
                args.dv + t * vs + split.head * Dv);
    }
  }
}

void RaggedAttentionForward(const int64_t* row_splits, int64_t num_rows,
                            const RaggedAttentionDims& dims,
                            const RaggedAttentionForwardArgs& args) {
  const RaggedAttentionPlan plan =
      PlanRaggedAttention(row_splits, num_rows, dims, 1);
  std::atomic<int64_t> next(0);
  RaggedAttentionForwardWorker(dims, args, plan, &next);
}

void RaggedAttentionBackward(const int64_t* row_splits, int64_t num_rows,
                             const RaggedAttentionDims& dims,
                             RaggedAttentionBackwardArgs args) {
  const RaggedAttentionPlan plan =
      PlanRaggedAttention(row_splits, num_rows, dims, 1);
  std::vector<float> workspace(static_cast<size_t>(plan.workspace_floats));
  args.workspace = workspace.data();
  std::atomic<int64_t> next(0);
  RaggedAttentionBackwardWorker(dims, args, plan, &next);
  RaggedAttentionReduce(dims, args, plan, 0,
                        static_cast<int64_t>(plan.reduce_units.size()));
}

}  // namespace kernels
}  // namespace tfrec_fast
