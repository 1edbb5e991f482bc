// Padding-free (packed, "varlen") softmax attention on the CPU: forward and
// backward, one (sequence, head) or a block of its query rows per work item.
//
// Layout (FlashAttention's varlen API and tf.RaggedTensor's): the T tokens of
// B sequences are packed along axis 0, row_splits [B + 1] gives sequence b
// the tokens [row_splits[b], row_splits[b + 1]); q and k are [T, H, Dh], v and
// out are [T, H, Dv], the per-row log-sum-exp is [T, H] (or q, k, v are the
// three slices of one [T, 3, H, D] tensor: RaggedAttentionDims::
// qkv_token_stride). Token i of a sequence
// attends to the tokens j of the same sequence with j <= i (causal) or to all
// of them (bidirectional):
//
//   s_ij = scale * q_i . k_j,   L_i = log sum_j exp(s_ij),
//   out_i = sum_j exp(s_ij - L_i) v_j.
//
// Forward: per block of R query rows, keys in blocks of kKeyBlock, with an
// online (running max, running sum) softmax; the [R, kKeyBlock] score tile
// lives in per-thread scratch, never an [L, L] matrix. L is kept for the
// backward (as FlashAttention does), which recomputes P = exp(s - L) and
// forms D_i = dout_i . out_i, dS = P * (dout V^T - D), then
// dQ = scale dS K, dK = scale dS^T Q, dV = P^T dout.
//
// Work partition: a (sequence, head) is one work item unless its cost is a
// large share of the whole batch (one long row among short ones), in which
// case its query rows are split into chunks of about equal cost. In the
// backward, the chunks of a split (sequence, head) write their partial dK and
// dV to a workspace that `RaggedAttentionReduce` sums afterwards; unsplit
// items own their dK, dV rows and write them directly. Items are sorted by
// decreasing cost and pulled by workers from a shared counter.
//
// Vector code: GCC vector extensions, compiled for AVX-512, AVX2+FMA and
// baseline x86-64 (or the build's own target elsewhere) with a runtime pick
// of the best the CPU supports (cpu_isa.h).
//
// Framework-free (std only): built into the TensorFlow op library and usable
// from a standalone harness. Compute is float32.
#ifndef TFREC_FAST_KERNELS_RAGGED_ATTENTION_H_
#define TFREC_FAST_KERNELS_RAGGED_ATTENTION_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace tfrec_fast {
namespace kernels {

struct RaggedAttentionDims {
  int64_t num_tokens = 0;  // T
  int64_t num_heads = 0;   // H
  int64_t head_dim = 0;    // Dh (queries and keys)
  int64_t value_dim = 0;   // Dv (values and output)
  bool causal = true;
  float scale = 1.0f;
  // Floats from one token's row of q (and k, v, dq, dk, dv) to the next.
  // 0: the dense [T, H, Dh] / [T, H, Dv] layouts (H * Dh, H * Dv). A
  // q/k/v-packed [T, 3, H, D] tensor (FlashAttention's qkvpacked) passes
  // 3 * H * D with k and v pointing D * H and 2 * D * H floats in, so the
  // projection's output is read and its gradient written without a split
  // or a concat. out, d_out and logsumexp are always dense.
  int64_t qkv_token_stride = 0;

  int64_t QKStride() const {
    return qkv_token_stride ? qkv_token_stride : num_heads * head_dim;
  }
  int64_t VStride() const {
    return qkv_token_stride ? qkv_token_stride : num_heads * value_dim;
  }
};

// Query rows [q_begin, q_end) of one head of one sequence.
struct RaggedAttentionItem {
  int64_t start = 0;    // first token of the sequence in the packed layout
  int64_t length = 0;   // tokens in the sequence
  int64_t head = 0;
  int64_t q_begin = 0;  // query rows, relative to `start`
  int64_t q_end = 0;
  int64_t key_end = 0;  // keys the rows see: causal ? q_end : length
  // Backward: offset (in floats) of this item's partial dK [key_end, Dh] and
  // dV [key_end, Dv] in the workspace, or -1 when it owns its (seq, head).
  int64_t partial = -1;
  double cost = 0;
};

// A (sequence, head) whose query rows were split over several items.
struct RaggedAttentionSplit {
  int64_t start = 0;
  int64_t length = 0;
  int64_t head = 0;
  std::vector<int64_t> items;  // indices into RaggedAttentionPlan::items
};

// Key rows [row_begin, row_end) of split `split`, summed by one call.
struct RaggedAttentionReduceUnit {
  int64_t split = 0;
  int64_t row_begin = 0;
  int64_t row_end = 0;
};

struct RaggedAttentionPlan {
  std::vector<RaggedAttentionItem> items;  // by decreasing cost
  std::vector<RaggedAttentionSplit> splits;
  std::vector<RaggedAttentionReduceUnit> reduce_units;
  int64_t workspace_floats = 0;  // backward workspace for partial dK, dV
  double total_cost = 0;
};

// Returns "" if row_splits[0] == 0, row_splits is non-decreasing and
// row_splits[num_rows] == num_tokens; else a message naming `arg_name`, the
// position and the values. `row_splits` has num_rows + 1 entries.
std::string CheckRowSplits(const int64_t* row_splits, int64_t num_rows,
                           int64_t num_tokens,
                           const std::string& arg_name = "row_splits");

// Splits the work of one call over about `num_workers` workers (1: one item
// per (sequence, head), never split). `row_splits` must have passed
// CheckRowSplits. The same plan serves the forward (which ignores
// `partial`) and the backward (which needs `workspace_floats`).
RaggedAttentionPlan PlanRaggedAttention(const int64_t* row_splits,
                                        int64_t num_rows,
                                        const RaggedAttentionDims& dims,
                                        int num_workers);

struct RaggedAttentionForwardArgs {
  const float* q = nullptr;  // [T, H, Dh]
  const float* k = nullptr;  // [T, H, Dh]
  const float* v = nullptr;  // [T, H, Dv]
  float* out = nullptr;      // [T, H, Dv]
  float* lse = nullptr;      // [T, H]
};

struct RaggedAttentionBackwardArgs {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  const float* out = nullptr;    // forward output
  const float* lse = nullptr;    // forward log-sum-exp [T, H]
  const float* d_out = nullptr;  // [T, H, Dv]
  float* dq = nullptr;           // [T, H, Dh]
  float* dk = nullptr;           // [T, H, Dh]
  float* dv = nullptr;           // [T, H, Dv]
  float* workspace = nullptr;    // plan.workspace_floats floats
};

// Each worker calls this once; it processes plan items taken from `*next`
// (start it at 0) until none are left, with its own scratch memory.
void RaggedAttentionForwardWorker(const RaggedAttentionDims& dims,
                                  const RaggedAttentionForwardArgs& args,
                                  const RaggedAttentionPlan& plan,
                                  std::atomic<int64_t>* next);
void RaggedAttentionBackwardWorker(const RaggedAttentionDims& dims,
                                   const RaggedAttentionBackwardArgs& args,
                                   const RaggedAttentionPlan& plan,
                                   std::atomic<int64_t>* next);

// After every backward worker has returned: writes dK, dV of the split
// (sequence, head)s as the sums of their items' partials, for reduce units
// [begin, end) of the plan.
void RaggedAttentionReduce(const RaggedAttentionDims& dims,
                           const RaggedAttentionBackwardArgs& args,
                           const RaggedAttentionPlan& plan, int64_t begin,
                           int64_t end);

// Single-threaded convenience: plan, forward / backward and reduce in order.
void RaggedAttentionForward(const int64_t* row_splits, int64_t num_rows,
                            const RaggedAttentionDims& dims,
                            const RaggedAttentionForwardArgs& args);
void RaggedAttentionBackward(const int64_t* row_splits, int64_t num_rows,
                             const RaggedAttentionDims& dims,
                             RaggedAttentionBackwardArgs args);

}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_RAGGED_ATTENTION_H_
