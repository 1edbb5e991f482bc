// Full-catalog softmax cross-entropy ("cut cross-entropy") on the CPU,
// forward and backward, without ever forming the [N, C] logits.
//
// Meaning (docs/fused_cross_entropy.md): hidden h [N, D], item table w
// [C, D], optional bias b [C] (else 0), targets y [N] in [0, C):
//
//   s_tc = h_t . w_c + b_c,   lse_t = log sum_c exp(s_tc),
//   loss_t = lse_t - s_{t, y_t},
//   ds_tc = g_t (exp(s_tc - lse_t) - [c == y_t])   (g = d loss),
//   dh_t = sum_c ds_tc w_c,   dw_c = sum_t ds_tc h_t,   db_c = sum_t ds_tc.
//
// Blocking: items are cut into blocks of kCceItemBlock (256). Logits are
// computed by register-tiled ScoreTile calls (cpu_tiles_impl.h) on R rows x
// one item block at a time: an [R, 256] tile in L1, the block's packed W^T
// (D x 256) in L2. Nothing of size N x C exists.
//
// Forward, parallel over ROWS: W^T is packed once, block by block, into a
// shared workspace (CutCrossEntropyPackForward, parallel over blocks; the
// pad stride kCceItemStride = 256 + 16 floats keeps the D rows of a block
// from aliasing in L1, and padded items get bias -inf, i.e. probability 0).
// Workers then pull chunks of kCceRowChunk rows from a shared counter; per
// chunk they walk every item block and, per R-row tile, merge the tile into
// each row's running (max, sum) log-sum-exp (kept per vector lane, merged
// across lanes once per chunk: no horizontal reductions in the inner loop).
// The target logit is read from the tile that holds it, so it is rounded
// exactly like the lse terms (a dominant target gives loss 0, not a
// rounding-sized negative). Rows are independent, so the result does not
// depend on the thread count.
//
// Backward, parallel over ITEMS, one pass, no atomics on data: it
// recomputes the logits from the forward's lse (nothing else is saved). The
// item blocks are cut into a few contiguous groups (about 4 per thread);
// workers pull groups from a shared counter, and the group owns its dW rows
// and db entries and accumulates dH into its own partial [rows, D]; the
// partials are summed per row afterwards (CutCrossEntropyBackwardReduce,
// parallel over rows). Per block of the group and R-row tile:
// S = ScoreTile, ds = g (exp(S - lse) - onehot) in place (the onehot lands
// once: a row's target lies in exactly one block), dH_partial += ds W_block
// (AccumulateTile), dW_block += ds^T H_rows (RankUpdate), db_block += column
// sums of ds. Rows with d_loss exactly 0 (masked positions) are left out up
// front: their ds is 0 by definition (NaN logits there do not leak into dW),
// and a batch with many of them costs only its live rows. Groups are fixed by the plan and summed in
// group order, so the result does not depend on which thread ran which
// group (deterministic for a given plan, i.e. thread count), while a thread
// slowed by other work simply takes fewer groups.
//
// Memory: O(N D + C D) shared (packed W^T, packed H) plus, in the
// backward, one [rows, D] partial per group (capped) and small per-thread
// tiles.
//
// Vector code: GCC vector extensions compiled for AVX-512, AVX2 + FMA and
// the build's baseline, picked at run time as for the attention kernels
// (TFREC_FAST_CPU_ISA caps it; see cpu_isa.h).
//
// Framework-free (std only). Compute is float32.
#ifndef TFREC_FAST_KERNELS_CUT_CROSS_ENTROPY_H_
#define TFREC_FAST_KERNELS_CUT_CROSS_ENTROPY_H_

#include <atomic>
#include <cstdint>
#include <vector>

namespace tfrec_fast {
namespace kernels {

// Items per block, and the padded stride (floats) of a packed W^T row.
constexpr int64_t kCceItemBlock = 256;
constexpr int64_t kCceItemStride = kCceItemBlock + 16;
// Rows per forward work unit (a multiple of every ISA's tile height).
constexpr int64_t kCceRowChunk = 480;
// Packed rows of the backward are padded to a multiple of this (idem).
constexpr int64_t kCceRowAlign = 48;

struct CutCrossEntropyDims {
  int64_t num_rows = 0;   // N
  int64_t dim = 0;        // D
  int64_t num_items = 0;  // C
  bool has_bias = false;
};

struct CutCrossEntropyForwardArgs {
  const float* hidden = nullptr;      // [N, D]
  const float* item_table = nullptr;  // [C, D]
  const float* item_bias = nullptr;   // [C] (has_bias) or unused
  const int64_t* targets = nullptr;   // [N], each in [0, C)
  float* loss = nullptr;              // [N]
  float* lse = nullptr;               // [N]
  float* workspace = nullptr;         // CutCrossEntropyForwardWorkspace floats
};

struct CutCrossEntropyBackwardArgs {
  const float* hidden = nullptr;
  const float* item_table = nullptr;
  const float* item_bias = nullptr;
  const int64_t* targets = nullptr;
  const float* lse = nullptr;     // the forward's logsumexp [N]
  const float* d_loss = nullptr;  // [N]
  float* d_hidden = nullptr;      // [N, D]
  float* d_item_table = nullptr;  // [C, D]
  float* d_item_bias = nullptr;   // [C] (has_bias) or unused
  float* workspace = nullptr;     // plan.workspace_floats floats
};

// Item blocks: ceil(C / kCceItemBlock).
int64_t CutCrossEntropyItemBlocks(const CutCrossEntropyDims& dims);

// ---- Forward ----

// Floats of the forward's shared workspace (packed W^T and padded bias).
int64_t CutCrossEntropyForwardWorkspace(const CutCrossEntropyDims& dims);
// Row chunks the forward's workers pull.
int64_t CutCrossEntropyForwardUnits(const CutCrossEntropyDims& dims);
// Packs item blocks [begin, end) into args.workspace. Every block must be
// packed before any worker starts.
void CutCrossEntropyPackForward(const CutCrossEntropyDims& dims,
                                const CutCrossEntropyForwardArgs& args,
                                int64_t begin, int64_t end);
// Each worker calls this once; it processes row chunks taken from `*next`
// (start it at 0) until none are left.
void CutCrossEntropyForwardWorker(const CutCrossEntropyDims& dims,
                                  const CutCrossEntropyForwardArgs& args,
                                  std::atomic<int64_t>* next);

// ---- Backward ----

struct CutCrossEntropyBackwardPlan {
  int num_workers = 1;           // threads worth starting
  int64_t num_groups = 1;
  int64_t num_blocks = 0;
  int64_t padded_dim = 0;        // D rounded up to 16
  std::vector<int64_t> rows;     // live rows (d_loss != 0), ascending
  std::vector<int64_t> compact;  // [N]: index into `rows`, or -1
  int64_t padded_rows = 0;       // rows.size() rounded up to kCceRowAlign
  int64_t partial_offset = 0;    // workspace offset of the partials
  int64_t workspace_floats = 0;
  // Item blocks [block_begin[k], block_begin[k + 1]) form group k.
  std::vector<int64_t> block_begin;
};

// Picks the live rows and cuts the item blocks into groups for up to
// `max_workers` threads (fewer groups when there are few blocks, or to bound
// the partials' memory). `d_loss` has N entries.
CutCrossEntropyBackwardPlan PlanCutCrossEntropyBackward(
    const CutCrossEntropyDims& dims, const float* d_loss, int max_workers);
// Packs live rows [begin, end) of h into the workspace (every row before
// any worker starts).
void CutCrossEntropyPackBackward(const CutCrossEntropyDims& dims,
                                 const CutCrossEntropyBackwardArgs& args,
                                 const CutCrossEntropyBackwardPlan& plan,
                                 int64_t begin, int64_t end);
// Each worker calls this once; it processes groups taken from `*next`
// (start it at 0) until none are left: d_item_table and d_item_bias of the
// group's item blocks, and the group's dH partial.
void CutCrossEntropyBackwardWorker(const CutCrossEntropyDims& dims,
                                   const CutCrossEntropyBackwardArgs& args,
                                   const CutCrossEntropyBackwardPlan& plan,
                                   std::atomic<int64_t>* next);
// After every worker has returned: d_hidden rows [begin, end) as the sum of
// the partials (0 for rows with d_loss == 0).
void CutCrossEntropyBackwardReduce(const CutCrossEntropyDims& dims,
                                   const CutCrossEntropyBackwardArgs& args,
                                   const CutCrossEntropyBackwardPlan& plan,
                                   int64_t begin, int64_t end);

// Single-threaded convenience (allocates its own workspace; ignores
// args.workspace).
void CutCrossEntropyForward(const CutCrossEntropyDims& dims,
                            CutCrossEntropyForwardArgs args);
void CutCrossEntropyBackward(const CutCrossEntropyDims& dims,
                             CutCrossEntropyBackwardArgs args);

}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_CUT_CROSS_ENTROPY_H_
