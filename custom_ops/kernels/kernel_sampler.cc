// Quadratic-kernel sampler kernels: tree build, incremental update, draws.
// See kernel_sampler.h for the layout and the contracts.
//
// The two hot loops (the packed Frobenius product <Z, M'> of the descent and
// the item dot products of a leaf; the outer-product accumulation of build
// and update) are written once as always-inline templates over the vector
// width and compiled three times: inside functions with
// __attribute__((target("avx512f,..."))), target("avx2,fma") and the
// build's default target. Inlining puts the template bodies in the caller's
// instruction set, so GCC's vector extensions become zmm / ymm / xmm code;
// the widest one the CPU supports is picked once at run time
// (TFREC_FAST_CPU_ISA=generic|avx2 caps it, as for the attention kernels).
#include "custom_ops/kernels/kernel_sampler.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <numeric>

#include "custom_ops/kernels/counter_rng.h"
#include "custom_ops/kernels/cpu_isa.h"

// GCC on x86-64 (cpu_isa.h): the AVX-512 and AVX2 copies are compiled;
// elsewhere only the build's own target.
#ifdef TFREC_FAST_X86_MULTI_ISA
#define TFREC_KS_X86 1
// Load returns vectors by value from always-inline helpers that are only
// ever inlined into callers with the matching instruction set; the ABI note
// GCC prints for such signatures does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace tfrec_fast {
namespace kernels {
namespace kernel_sampler {
namespace {

#define TFREC_KS_INLINE inline __attribute__((always_inline))

namespace rng = ::tfrec_fast::kernels::counter_rng;

// Salt of the sampler's random stream: its draws never coincide with the
// CCEMinus negatives drawn from the same counter RNG with the same seed.
constexpr int64_t kStreamSalt = 0x6b65726e656c;  // "kernel"

template <int W>
struct Vec {
  typedef float type __attribute__((vector_size(W * sizeof(float))));
};

template <int W>
TFREC_KS_INLINE typename Vec<W>::type Load(const float* p) {
  typename Vec<W>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
TFREC_KS_INLINE float HorizontalSum(const typename Vec<W>::type& v) {
  float s = 0.0f;
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}

// sum a[i] b[i] over n = a multiple of W floats (packed tree rows), with
// four independent accumulators to hide the add latency.
template <int W>
TFREC_KS_INLINE double DotPacked(const float* a, const float* b, int64_t n) {
  typedef typename Vec<W>::type V;
  V s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    s0 += Load<W>(a + i) * Load<W>(b + i);
    s1 += Load<W>(a + i + W) * Load<W>(b + i + W);
    s2 += Load<W>(a + i + 2 * W) * Load<W>(b + i + 2 * W);
    s3 += Load<W>(a + i + 3 * W) * Load<W>(b + i + 3 * W);
  }
  for (; i < n; i += W) s0 += Load<W>(a + i) * Load<W>(b + i);
  return static_cast<double>(HorizontalSum<W>((s0 + s1) + (s2 + s3)));
}

// sum a[i] b[i] over any n (item rows of width D).
template <int W>
TFREC_KS_INLINE double DotAny(const float* a, const float* b, int64_t n) {
  typedef typename Vec<W>::type V;
  V s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    s0 += Load<W>(a + i) * Load<W>(b + i);
    s1 += Load<W>(a + i + W) * Load<W>(b + i + W);
  }
  for (; i + W <= n; i += W) s0 += Load<W>(a + i) * Load<W>(b + i);
  float s = HorizontalSum<W>(s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return static_cast<double>(s);
}

// acc (packed, double) += sign * w w^T. Products of two floats are exact in
// double, so the accumulation only rounds at the sums. The inner loop is a
// plain axpy that the compiler vectorises in the caller's instruction set.
TFREC_KS_INLINE void AccumulateOuter(const float* w, int64_t dim, double sign,
                                     double* acc) {
  double* out = acc;
  for (int64_t i = 0; i < dim; ++i) {
    const double wi = sign * static_cast<double>(w[i]);
    const int64_t n = dim - i;
    const float* wj = w + i;
    for (int64_t j = 0; j < n; ++j) out[j] += wi * static_cast<double>(wj[j]);
    out += n;
  }
}

// M' = alpha * packed(h h^T) with the off-diagonal doubled, zero-padded, so
// that <Z, alpha h h^T> = sum_p Z_p M'_p over the packed triangle.
TFREC_KS_INLINE void PackQuery(const float* h, int64_t dim, int64_t stride,
                               double alpha, float* m) {
  int64_t p = 0;
  for (int64_t i = 0; i < dim; ++i) {
    const double hi = static_cast<double>(h[i]) * alpha;
    m[p++] = static_cast<float>(hi * static_cast<double>(h[i]));
    const double twice = 2.0 * hi;
    for (int64_t j = i + 1; j < dim; ++j) {
      m[p++] = static_cast<float>(twice * static_cast<double>(h[j]));
    }
  }
  for (; p < stride; ++p) m[p] = 0.0f;
}

// Uniform double in [0, 1) with 53 random bits, for draw j at tree level
// `level` (the leaf pick uses the level after the last internal one).
TFREC_KS_INLINE double Uniform(uint64_t row_key, int64_t draw, int64_t level) {
  const uint64_t bits = rng::DrawBits(row_key, draw * kLevelsPerDraw + level);
  return static_cast<double>(bits >> 11) * 1.1102230246251565e-16;
}

// K summed over node's items: <Z_node, M'> + n_node. (A function, not a
// lambda: the vector code must be inlined into the ISA-specific caller.)
template <int W>
TFREC_KS_INLINE double Score(const float* tree, const int64_t* counts,
                             const float* m, int64_t stride, int64_t node) {
  const double z = DotPacked<W>(tree + node * stride, m, stride);
  // <Z, h h^T> >= 0 exactly; rounding may push it below when h is nearly
  // orthogonal to the node's items.
  return (z > 0.0 ? z : 0.0) + static_cast<double>(counts[node]);
}

struct Frame {
  int64_t node;
  int64_t begin, end;  // range of `order` holding the draws at this node
  int64_t level;
};

template <int W>
TFREC_KS_INLINE void DrawRowsImpl(const TreeLayout& layout,
                                  const DrawArgs& args, const float* query,
                                  const float* tree, const int64_t* counts,
                                  const float* snapshot, int64_t row_begin,
                                  int64_t row_end, int64_t* ids,
                                  float* log_q) {
  const int64_t D = layout.dim, S = layout.stride, K = args.num_draws;
  const int64_t num_leaves = layout.num_leaves;
  const double alpha = static_cast<double>(args.alpha);
  std::vector<float> m(S);
  std::vector<int64_t> order(K);
  std::vector<double> cumulative(layout.leaf_size), kernel(layout.leaf_size);
  // Depth-first with the right child pushed first: at most one pending
  // sibling per level plus the current frame.
  std::vector<Frame> stack(kLevelsPerDraw * 2 + 2);
  const uint64_t call_key = rng::CallKey(static_cast<int64_t>(args.seed),
                                         kStreamSalt);

  for (int64_t t = row_begin; t < row_end; ++t) {
    const float* h = query + t * D;
    PackQuery(h, D, S, alpha, m.data());
    const double log_root = std::log(Score<W>(tree, counts, m.data(), S, 1));
    const uint64_t row_key = rng::RowKey(call_key, t);
    int64_t* row_ids = ids + t * K;
    float* row_log_q = log_q + t * K;
    std::iota(order.begin(), order.end(), int64_t{0});

    int64_t top = 0;
    stack[top++] = Frame{1, 0, K, 0};
    while (top > 0) {
      const Frame f = stack[--top];
      if (f.node >= num_leaves) {
        // Leaf: kernel values of its items, then each draw's pick.
        const int64_t first = layout.ItemBegin(f.node);
        const int64_t n = layout.ItemEnd(f.node) - first;
        double total = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          const double dot = DotAny<W>(h, snapshot + (first + i) * D, D);
          kernel[i] = alpha * dot * dot + 1.0;
          total += kernel[i];
          cumulative[i] = total;
        }
        for (int64_t p = f.begin; p < f.end; ++p) {
          const int64_t j = order[p];
          const double target = Uniform(row_key, j, f.level) * total;
          int64_t i = std::upper_bound(cumulative.data(),
                                       cumulative.data() + n, target) -
                      cumulative.data();
          if (i >= n) i = n - 1;  // target rounded up to the total
          row_ids[j] = first + i;
          row_log_q[j] = static_cast<float>(std::log(kernel[i]) - log_root);
        }
        continue;
      }
      const int64_t left = 2 * f.node;
      const double s_left = Score<W>(tree, counts, m.data(), S, left);
      const double s_total =
          s_left + Score<W>(tree, counts, m.data(), S, left + 1);
      const int64_t level = f.level;
      int64_t* mid = std::partition(
          order.data() + f.begin, order.data() + f.end, [&](int64_t j) {
            return Uniform(row_key, j, level) * s_total < s_left;
          });
      const int64_t split = mid - order.data();
      if (split < f.end) {
        stack[top++] = Frame{left + 1, split, f.end, level + 1};
      }
      if (split > f.begin) {
        stack[top++] = Frame{left, f.begin, split, level + 1};
      }
    }
  }
}

// Leaves [leaf_begin, leaf_end) (leaf indices, not node ids) from the table.
TFREC_KS_INLINE void BuildLeavesImpl(const TreeLayout& layout,
                                     const float* table, float* tree,
                                     int64_t leaf_begin, int64_t leaf_end) {
  const int64_t D = layout.dim, S = layout.stride, P = PackedSize(D);
  std::vector<double> acc(P);
  for (int64_t leaf = leaf_begin; leaf < leaf_end; ++leaf) {
    const int64_t node = layout.num_leaves + leaf;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t i = layout.ItemBegin(node); i < layout.ItemEnd(node); ++i) {
      AccumulateOuter(table + i * D, D, 1.0, acc.data());
    }
    float* row = tree + node * S;
    for (int64_t p = 0; p < P; ++p) row[p] = static_cast<float>(acc[p]);
    for (int64_t p = P; p < S; ++p) row[p] = 0.0f;
  }
}

// Touched leaves [begin, end) of `leaves` (node ids), whose rows are
// ids[row_start[k], row_start[k + 1]).
TFREC_KS_INLINE void UpdateLeavesImpl(const TreeLayout& layout,
                                      const int64_t* ids,
                                      const int64_t* leaves,
                                      const int64_t* row_start,
                                      const float* table, float* snapshot,
                                      float* tree, int64_t begin,
                                      int64_t end) {
  const int64_t D = layout.dim, S = layout.stride, P = PackedSize(D);
  std::vector<double> acc(P);
  for (int64_t k = begin; k < end; ++k) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t r = row_start[k]; r < row_start[k + 1]; ++r) {
      const int64_t item = ids[r];
      AccumulateOuter(table + item * D, D, 1.0, acc.data());
      AccumulateOuter(snapshot + item * D, D, -1.0, acc.data());
      std::memcpy(snapshot + item * D, table + item * D, sizeof(float) * D);
    }
    float* row = tree + leaves[k] * S;
    for (int64_t p = 0; p < P; ++p) {
      row[p] = static_cast<float>(static_cast<double>(row[p]) + acc[p]);
    }
  }
}

#ifdef TFREC_KS_X86
#define TFREC_KS_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#define TFREC_KS_AVX2 __attribute__((target("avx2,fma")))

TFREC_KS_AVX512 void DrawRowsAvx512(const TreeLayout& layout,
                                    const DrawArgs& args, const float* query,
                                    const float* tree, const int64_t* counts,
                                    const float* snapshot, int64_t b,
                                    int64_t e, int64_t* ids, float* log_q) {
  DrawRowsImpl<16>(layout, args, query, tree, counts, snapshot, b, e, ids,
                   log_q);
}
TFREC_KS_AVX2 void DrawRowsAvx2(const TreeLayout& layout, const DrawArgs& args,
                                const float* query, const float* tree,
                                const int64_t* counts, const float* snapshot,
                                int64_t b, int64_t e, int64_t* ids,
                                float* log_q) {
  DrawRowsImpl<8>(layout, args, query, tree, counts, snapshot, b, e, ids,
                  log_q);
}
TFREC_KS_AVX512 void BuildLeavesAvx512(const TreeLayout& layout,
                                       const float* table, float* tree,
                                       int64_t b, int64_t e) {
  BuildLeavesImpl(layout, table, tree, b, e);
}
TFREC_KS_AVX2 void BuildLeavesAvx2(const TreeLayout& layout,
                                   const float* table, float* tree, int64_t b,
                                   int64_t e) {
  BuildLeavesImpl(layout, table, tree, b, e);
}
TFREC_KS_AVX512 void UpdateLeavesAvx512(const TreeLayout& layout,
                                        const int64_t* ids,
                                        const int64_t* leaves,
                                        const int64_t* row_start,
                                        const float* table, float* snapshot,
                                        float* tree, int64_t b, int64_t e) {
  UpdateLeavesImpl(layout, ids, leaves, row_start, table, snapshot, tree, b,
                   e);
}
TFREC_KS_AVX2 void UpdateLeavesAvx2(const TreeLayout& layout,
                                    const int64_t* ids, const int64_t* leaves,
                                    const int64_t* row_start,
                                    const float* table, float* snapshot,
                                    float* tree, int64_t b, int64_t e) {
  UpdateLeavesImpl(layout, ids, leaves, row_start, table, snapshot, tree, b,
                   e);
}
#endif  // TFREC_KS_X86

// The one process-wide choice of every CPU kernel (cpu_isa.h), so that
// TFREC_FAST_CPU_ISA caps this kernel like the others.
using Isa = CpuIsa;
inline Isa GetIsa() { return GetCpuIsa(); }

// Recomputes internal nodes `nodes` (all at one depth) as the sum of their
// children, in parallel.
void SumChildren(const TreeLayout& layout, const int64_t* nodes, int64_t n,
                 float* tree, const ParallelFor& pfor) {
  const int64_t S = layout.stride;
  pfor(n, 2 * S, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t node = nodes[k];
      float* out = tree + node * S;
      const float* a = tree + 2 * node * S;
      const float* b = a + S;
      for (int64_t p = 0; p < S; ++p) out[p] = a[p] + b[p];
    }
  });
}

}  // namespace

TreeLayout MakeLayout(int64_t num_items, int64_t dim, int64_t leaf_size) {
  TreeLayout layout;
  layout.num_items = num_items;
  layout.dim = dim;
  layout.leaf_size = leaf_size;
  layout.num_leaves = (num_items + leaf_size - 1) / leaf_size;
  layout.num_rows = 2 * layout.num_leaves;
  layout.stride = PackedStride(dim);
  return layout;
}

void SerialFor(int64_t n, int64_t cost_per_unit,
               const std::function<void(int64_t, int64_t)>& fn) {
  (void)cost_per_unit;
  if (n > 0) fn(0, n);
}

void FillCounts(const TreeLayout& layout, int64_t* counts) {
  counts[0] = 0;
  for (int64_t node = layout.num_rows - 1; node >= 1; --node) {
    counts[node] = node >= layout.num_leaves
                       ? layout.ItemEnd(node) - layout.ItemBegin(node)
                       : counts[2 * node] + counts[2 * node + 1];
  }
}

int64_t FirstNonFinite(const float* x, int64_t n, const ParallelFor& pfor) {
  std::atomic<int64_t> first(n);
  pfor(n, 2, [&](int64_t begin, int64_t end) {
    if (begin >= first.load(std::memory_order_relaxed)) return;
    for (int64_t i = begin; i < end; ++i) {
      if (!std::isfinite(x[i])) {
        int64_t seen = first.load(std::memory_order_relaxed);
        while (i < seen && !first.compare_exchange_weak(seen, i)) {
        }
        return;
      }
    }
  });
  const int64_t found = first.load();
  return found < n ? found : -1;
}

void BuildTree(const TreeLayout& layout, const float* table, float* snapshot,
               float* tree, const ParallelFor& pfor) {
  const int64_t S = layout.stride, D = layout.dim;
  std::fill(tree, tree + S, 0.0f);  // row 0, unused
  const Isa isa = GetIsa();
  pfor(layout.num_leaves, layout.leaf_size * PackedSize(D),
       [&](int64_t begin, int64_t end) {
#ifdef TFREC_KS_X86
         if (isa == Isa::kAvx512) {
           BuildLeavesAvx512(layout, table, tree, begin, end);
           return;
         }
         if (isa == Isa::kAvx2) {
           BuildLeavesAvx2(layout, table, tree, begin, end);
           return;
         }
#endif
         (void)isa;
         BuildLeavesImpl(layout, table, tree, begin, end);
       });
  // Internal nodes, deepest level first: children are final when read.
  if (layout.num_leaves > 1) {
    std::vector<int64_t> nodes;
    for (int d = Depth(layout.num_leaves - 1); d >= 0; --d) {
      const int64_t lo = int64_t{1} << d;
      const int64_t hi = std::min(int64_t{2} << d, layout.num_leaves);
      nodes.resize(hi - lo);
      std::iota(nodes.begin(), nodes.end(), lo);
      SumChildren(layout, nodes.data(), hi - lo, tree, pfor);
    }
  }
  if (snapshot != table) {
    pfor(layout.num_items, D, [&](int64_t begin, int64_t end) {
      std::memcpy(snapshot + begin * D, table + begin * D,
                  sizeof(float) * (end - begin) * D);
    });
  }
}

std::vector<int64_t> ChangedRows(const TreeLayout& layout,
                                 const float* snapshot, const float* table,
                                 const ParallelFor& pfor) {
  const int64_t D = layout.dim;
  std::vector<int64_t> changed;
  std::mutex mu;
  pfor(layout.num_items, D, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> local;
    for (int64_t i = begin; i < end; ++i) {
      const float* a = snapshot + i * D;
      const float* b = table + i * D;
      bool differs = false;
      for (int64_t d = 0; d < D; ++d) differs |= (a[d] != b[d]);
      if (differs) local.push_back(i);
    }
    if (!local.empty()) {
      std::lock_guard<std::mutex> lock(mu);
      changed.insert(changed.end(), local.begin(), local.end());
    }
  });
  std::sort(changed.begin(), changed.end());
  return changed;
}

void UpdateRows(const TreeLayout& layout, const int64_t* ids, int64_t num_ids,
                const float* table, float* snapshot, float* tree,
                const ParallelFor& pfor) {
  if (num_ids == 0) return;
  // Touched leaves and the range of ids in each (ids are sorted, so the
  // rows of a leaf are consecutive).
  std::vector<int64_t> leaves, row_start;
  for (int64_t r = 0; r < num_ids; ++r) {
    const int64_t leaf = layout.LeafOf(ids[r]);
    if (leaves.empty() || leaves.back() != leaf) {
      leaves.push_back(leaf);
      row_start.push_back(r);
    }
  }
  row_start.push_back(num_ids);
  const int64_t num_touched = static_cast<int64_t>(leaves.size());
  const Isa isa = GetIsa();
  const int64_t cost = 2 * PackedSize(layout.dim) * num_ids / num_touched;
  pfor(num_touched, cost, [&](int64_t begin, int64_t end) {
#ifdef TFREC_KS_X86
    if (isa == Isa::kAvx512) {
      UpdateLeavesAvx512(layout, ids, leaves.data(), row_start.data(), table,
                         snapshot, tree, begin, end);
      return;
    }
    if (isa == Isa::kAvx2) {
      UpdateLeavesAvx2(layout, ids, leaves.data(), row_start.data(), table,
                       snapshot, tree, begin, end);
      return;
    }
#endif
    (void)isa;
    UpdateLeavesImpl(layout, ids, leaves.data(), row_start.data(), table,
                     snapshot, tree, begin, end);
  });
  // Ancestors, deepest level first, as BuildTree sums them.
  if (layout.num_leaves > 1) {
    std::vector<int64_t> nodes;
    for (int d = Depth(layout.num_leaves - 1); d >= 0; --d) {
      nodes.clear();
      for (int64_t leaf : leaves) {
        const int depth = Depth(leaf);
        if (depth > d) nodes.push_back(leaf >> (depth - d));
      }
      std::sort(nodes.begin(), nodes.end());
      nodes.erase(std::unique(nodes.begin(), nodes.end()), nodes.end());
      SumChildren(layout, nodes.data(), static_cast<int64_t>(nodes.size()),
                  tree, pfor);
    }
  }
}

int64_t DrawCostPerRow(const TreeLayout& layout, int64_t num_draws) {
  // Nodes scored: two per level per distinct path, at most all of them;
  // about four floats per cycle once vectorised.
  const int64_t depth = Depth(std::max<int64_t>(layout.num_rows - 1, 1)) + 1;
  const int64_t paths = std::min(num_draws, layout.num_leaves);
  const int64_t node_work = 2 * depth * paths * layout.stride / 4;
  const int64_t leaf_work = paths * layout.leaf_size * layout.dim / 4;
  return std::max<int64_t>(1, node_work + leaf_work + 40 * num_draws);
}

void DrawRows(const TreeLayout& layout, const DrawArgs& args,
              const float* query, const float* tree, const int64_t* counts,
              const float* snapshot, int64_t row_begin, int64_t row_end,
              int64_t* ids, float* log_q) {
  const Isa isa = GetIsa();
#ifdef TFREC_KS_X86
  if (isa == Isa::kAvx512) {
    DrawRowsAvx512(layout, args, query, tree, counts, snapshot, row_begin,
                   row_end, ids, log_q);
    return;
  }
  if (isa == Isa::kAvx2) {
    DrawRowsAvx2(layout, args, query, tree, counts, snapshot, row_begin,
                 row_end, ids, log_q);
    return;
  }
#endif
  (void)isa;
  DrawRowsImpl<4>(layout, args, query, tree, counts, snapshot, row_begin,
                  row_end, ids, log_q);
}

}  // namespace kernel_sampler
}  // namespace kernels
}  // namespace tfrec_fast

#ifdef TFREC_KS_X86
#pragma GCC diagnostic pop
#endif
