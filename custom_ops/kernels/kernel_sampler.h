// Quadratic-kernel sampler (Blanc & Rendle, "Adaptive sampled softmax with
// kernel based sampling", ICML 2018): exact draws from
//
//   q_i(h) = K(h, w_i) / sum_j K(h, w_j),   K(h, w) = alpha (h . w)^2 + 1,
//
// by descending a binary tree whose nodes keep Z = sum of w w^T over their
// items and the item count n: K summed over a node is alpha <Z, h h^T> + n.
//
// Framework-free (std only): the TF ops in custom_ops/tf/kernel_sampler_op.cc
// call it with TF's thread pool through the `ParallelFor` hook.
//
// Tree layout (shared with tfrec_fast/ops/kernel_sampler.py, which builds,
// updates and reads the same arrays in pure TF):
//
// - items 0..C-1 in id order, grouped into num_leaves = ceil(C / L) leaves
//   of L = leaf_size consecutive items (the last one may hold fewer);
// - an implicit complete binary tree in heap order: nodes 1..2 num_leaves - 1,
//   node i has children 2i and 2i + 1, the leaves are nodes
//   num_leaves..2 num_leaves - 1 (leaf of item i: num_leaves + i / L). Any
//   num_leaves works (no padding to a power of two); leaves then sit at two
//   depths. Row 0 of every array is unused (kept zero) so that node ids index
//   rows directly;
// - tree [2 num_leaves, S]: node i's Z as its upper triangle, row-major
//   (Z_00, Z_01, .., Z_0,D-1, Z_11, ..), D (D + 1) / 2 floats zero-padded to
//   S = a multiple of 16 floats. Z is symmetric, so the triangle halves the
//   memory and the work of <Z, M> against the equally packed M' (h h^T with
//   its off-diagonal doubled); the padding makes every row a whole number of
//   64-byte vectors;
// - counts [2 num_leaves] int64: items under each node;
// - snapshot [C, D]: the item rows the tree currently describes. Sampling and
//   log q refer to the snapshot, whatever the live item table has become
//   since: q stays the exact proposal that was used.
//
// Random numbers: counter-based (custom_ops/kernels/counter_rng.h), a pure
// function of (seed, row, draw, level), so draws do not depend on threading.
#ifndef TFREC_FAST_KERNELS_KERNEL_SAMPLER_H_
#define TFREC_FAST_KERNELS_KERNEL_SAMPLER_H_

#include <cstdint>
#include <functional>
#include <vector>

namespace tfrec_fast {
namespace kernels {
namespace kernel_sampler {

// Floats per packed row are rounded up to this (one AVX-512 vector).
constexpr int64_t kPackAlign = 16;
// Random counters per draw: one per tree level and one for the leaf.
constexpr int64_t kLevelsPerDraw = 64;

inline int64_t PackedSize(int64_t dim) { return dim * (dim + 1) / 2; }
inline int64_t PackedStride(int64_t dim) {
  return (PackedSize(dim) + kPackAlign - 1) / kPackAlign * kPackAlign;
}
// floor(log2(node)) for node >= 1: the depth of a heap node (root 0).
inline int Depth(int64_t node) {
  return 63 - __builtin_clzll(static_cast<unsigned long long>(node));
}

struct TreeLayout {
  int64_t num_items = 0;   // C
  int64_t dim = 0;         // D
  int64_t leaf_size = 0;   // L
  int64_t num_leaves = 0;  // ceil(C / L)
  int64_t num_rows = 0;    // 2 num_leaves (row 0 unused)
  int64_t stride = 0;      // S = PackedStride(D)

  int64_t LeafOf(int64_t item) const { return num_leaves + item / leaf_size; }
  // Items of leaf node `node` are [ItemBegin, ItemEnd).
  int64_t ItemBegin(int64_t node) const {
    return (node - num_leaves) * leaf_size;
  }
  int64_t ItemEnd(int64_t node) const {
    const int64_t end = ItemBegin(node) + leaf_size;
    return end < num_items ? end : num_items;
  }
};

// Requires C >= 1, D >= 1, L >= 1.
TreeLayout MakeLayout(int64_t num_items, int64_t dim, int64_t leaf_size);

// Runs fn(begin, end) over disjoint ranges covering [0, n), possibly in
// parallel; cost_per_unit is a rough cycle count per unit for sharding.
using ParallelFor = std::function<void(
    int64_t n, int64_t cost_per_unit,
    const std::function<void(int64_t, int64_t)>& fn)>;

// A serial ParallelFor (tests, tools).
void SerialFor(int64_t n, int64_t cost_per_unit,
               const std::function<void(int64_t, int64_t)>& fn);

// counts [num_rows]: items under each node (row 0: 0).
void FillCounts(const TreeLayout& layout, int64_t* counts);

// Flat position of the first non-finite value of x[0, n), or -1.
int64_t FirstNonFinite(const float* x, int64_t n, const ParallelFor& pfor);

// tree [num_rows, S] from table [C, D]: leaves accumulate their items' outer
// products in double (rounded once to float), internal nodes are the float
// sum of their two children. Also copies table into snapshot (may alias:
// then nothing is copied).
void BuildTree(const TreeLayout& layout, const float* table, float* snapshot,
               float* tree, const ParallelFor& pfor);

// Sorted ids of the rows where snapshot and table differ (float !=).
std::vector<int64_t> ChangedRows(const TreeLayout& layout,
                                 const float* snapshot, const float* table,
                                 const ParallelFor& pfor);

// Moves the tree from the snapshot to the table on the rows `ids` (sorted,
// unique, in [0, C)): each touched leaf gets the double sum of its rows'
// changes w_new w_new^T - w_old w_old^T (rounded once), each ancestor of a
// touched leaf is recomputed as the sum of its children (deepest first, as
// BuildTree does), and the rows are copied into the snapshot. Cost
// O(D^2 (rows + touched nodes)) = O(D^2 log n) per row at most.
void UpdateRows(const TreeLayout& layout, const int64_t* ids, int64_t num_ids,
                const float* table, float* snapshot, float* tree,
                const ParallelFor& pfor);

struct DrawArgs {
  float alpha = 1.0f;
  int64_t num_draws = 0;  // K per row
  uint64_t seed = 0;      // stream key; row t uses RowKey(CallKey(seed), t)
};

// Rough cycles per query row of DrawRows, for sharding.
int64_t DrawCostPerRow(const TreeLayout& layout, int64_t num_draws);

// K draws with replacement for each query row t in [row_begin, row_end):
// ids[t, k] and log_q[t, k] = log K(h_t, w_id) - log(alpha <Z_root, h h^T> +
// C). Query rows must be finite (checked by the caller). All K draws of a
// row descend together: each visited node is scored once per row and the
// draws it holds are split by their own uniforms, which gives the same
// draws as K independent descents.
void DrawRows(const TreeLayout& layout, const DrawArgs& args,
              const float* query, const float* tree, const int64_t* counts,
              const float* snapshot, int64_t row_begin, int64_t row_end,
              int64_t* ids, float* log_q);

}  // namespace kernel_sampler
}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_KERNEL_SAMPLER_H_
