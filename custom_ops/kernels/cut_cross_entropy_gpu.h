// Full-catalog softmax cross-entropy ("cut cross-entropy") on the GPU: the
// CUDA counterpart of cut_cross_entropy.h, with the meaning of
// docs/fused_cross_entropy.md, and the tile engine that CCEMinus's shared
// negatives (cce_minus_gpu.h) run on too.
//
// Meaning: hidden h [N, D], item table w [C, D] (float32, float16 or
// bfloat16; every product and sum in float32), optional bias b [C] (float32),
// targets y [N] (int32 or int64):
//
//   s_tc   = h_t . w_c + b_c,   lse_t = log sum_c exp(s_tc),
//   loss_t = lse_t - s_{t, y_t},
//   ds_tc  = g_t (exp(s_tc - lse_t) - [c == y_t])       (g = d loss)
//   dh_t   = sum_c ds_tc w_c,   dw_c = sum_t ds_tc h_t,   db_c = sum_t ds_tc
//
// The engine generalises the columns of the softmax: column j of a row is
// table row item(j) (item(j) = j, or col_ids[j] for shared negatives) with
// the additive offset b_{item(j)} - col_log_kq[j]. With `positive_apart`
// (CCEMinus) the target is not a column: lse_t = log(exp(s_{t,y_t}) +
// sum_j exp(s'_tj)), columns whose item is the target get probability 0
// when `remove_hits`, and the dW output is the compact [num_cols + N, D]
// (the columns' rows, then one row per target).
//
// Kernels (cut_cross_entropy.cu.cc). Thread blocks of 256 threads work on a
// tile of 64 rows x 64 columns; operand tiles (64 rows of h, 64 rows of w,
// D cut into chunks of DCH = 64, 128 or 256 columns) sit in shared memory
// in the input type, zero padded; the 64 x 64 score tile S = H W^T is
// computed with tensor cores (wmma 16x16x16, float32 accumulation) for
// float16 / bfloat16 on sm_80+, and with SIMT float32 FMAs (a 16 x 16
// thread grid, 4 x 4 outputs each) for float32 (or older GPUs). S then goes
// through shared memory to a common elementwise stage (bias, corrections,
// masks, online softmax, ds). Nothing of size N x C is ever formed.
//
//   forward   grid (row tiles, splits): a block keeps its 64 rows of h
//             resident and streams its range of column tiles, merging each
//             S tile into per-row running (max, sum). Partial (max, sum)
//             per split go to the workspace; a combine kernel (one warp a
//             row) folds them in a fixed order into lse and loss. The
//             target logit is taken from the tile that holds it (CCE), so
//             it is rounded like the lse terms; with positive_apart it is
//             one dot product per row.
//   backward  no atomics, deterministic for a given GPU model (the split
//             counts depend on the number of SMs):
//             dH: grid (row tiles, splits, D chunks): recompute S tiles
//                 along the row's columns, P = exp(S - lse) (- onehot),
//                 acc += P W; per-split float32 partials [splits, N, D];
//                 a finish kernel sums them in order, times g_t, plus the
//                 positive's g_t (p_t - 1) w_{y_t} (positive_apart).
//             dW: grid (column tiles, splits, D chunks): the same S tiles
//                 recomputed from the columns' side, ds = g_t/2^e (p -
//                 onehot) (2^e: the power of two of max |g|, so float16
//                 operands hold ds without underflow; undone exactly at
//                 the end), acc += ds^T H; written in the output type when
//                 one split covers all rows, else float32 partials summed
//                 in order by a finish kernel. db from the float32 ds.
//             Recomputing S in both kernels costs one matmul more than a
//             single pass with atomics (4 instead of 3 N x C x D products)
//             and buys determinism and no [C, D] float32 accumulator.
//   Rows with g_t == 0 contribute exactly 0 (NaN logits there do not leak
//   into dW), as in the CPU kernels.
//
// Ids: targets and col_ids are checked by the caller (the TF op scans them
// on the device first). The kernels never read out of bounds for bad ids:
// a bad target or column id reads as a NaN logit instead.
//
// Framework-free: CUDA runtime API and std only. This header holds no
// device code (the TF OpKernels and the harness's C shim include it).
#ifndef TFREC_FAST_KERNELS_CUT_CROSS_ENTROPY_GPU_H_
#define TFREC_FAST_KERNELS_CUT_CROSS_ENTROPY_GPU_H_

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace tfrec_fast {
namespace kernels {

// Element type of hidden, item_table and their gradients.
enum class CrossEntropyGpuType : int {
  kFloat32 = 0,
  kFloat16 = 1,   // IEEE half (__half, Eigen::half)
  kBFloat16 = 2,  // bfloat16 (__nv_bfloat16, tensorflow::bfloat16)
};

// Which math the tile engine uses for the score and gradient products.
enum class CrossEntropyGpuMath : int {
  kAuto = 0,  // tensor cores for float16 / bfloat16 on sm_80+, else SIMT
  kSimt = 1,  // float32 FMAs for every type
};

// One softmax-over-columns problem (see the header comment).
struct FusedSoftmaxGpuProblem {
  CrossEntropyGpuType type = CrossEntropyGpuType::kFloat32;
  int64_t num_rows = 0;   // N
  int64_t dim = 0;        // D
  int64_t num_items = 0;  // C: rows of the item table
  int64_t num_cols = 0;   // columns: C (identity) or K (col_ids)
  const void* hidden = nullptr;      // [N, D]
  const void* item_table = nullptr;  // [C, D]
  const float* item_bias = nullptr;  // [C] or nullptr (no bias)
  const void* targets = nullptr;     // [N]
  bool targets_int64 = true;
  const void* col_ids = nullptr;     // [num_cols] table rows, or nullptr:
                                     // column j is item j (num_cols == C)
  bool col_ids_int64 = true;
  const float* col_log_kq = nullptr;  // [num_cols] subtracted, or nullptr
  bool positive_apart = false;        // CCEMinus (see the header comment)
  bool remove_hits = true;            // positive_apart only
  CrossEntropyGpuMath math = CrossEntropyGpuMath::kAuto;
  // CUDA device that owns the pointers and the stream; -1: the current one.
  // The launchers make it current for the call and restore the previous.
  int device = -1;
};

// Bytes of device workspace the forward (backward = false) or backward
// needs; depends on the shapes and the device's SM count. 256-aligned.
cudaError_t FusedSoftmaxGpuWorkspaceBytes(const FusedSoftmaxGpuProblem& p,
                                          bool backward, size_t* bytes);

// loss, lse: float32 [N]. `workspace`: at least the forward's
// FusedSoftmaxGpuWorkspaceBytes, 256-byte aligned. Asynchronous on
// `stream`; returns the launch status.
cudaError_t FusedSoftmaxGpuForward(const FusedSoftmaxGpuProblem& p,
                                   float* loss, float* lse, void* workspace,
                                   size_t workspace_bytes,
                                   cudaStream_t stream);

// From the forward's lse and d_loss (float32 [N]): d_hidden [N, D] and
// d_item_table [num_cols, D] ([num_cols + N, D] with positive_apart) in the
// problem's type, d_item_bias (float32, same rows; nullptr: not computed).
// Every element is written. Deterministic. Asynchronous on `stream`.
cudaError_t FusedSoftmaxGpuBackward(const FusedSoftmaxGpuProblem& p,
                                    const float* lse, const float* d_loss,
                                    void* d_hidden, void* d_item_table,
                                    float* d_item_bias, void* workspace,
                                    size_t workspace_bytes,
                                    cudaStream_t stream);

// ---------------------------------------------------------------------------
// TfrecFastCutCrossEntropy(+Grad): the engine with identity columns.

struct CutCrossEntropyGpuDims {
  int64_t num_rows = 0;   // N
  int64_t num_items = 0;  // C
  int64_t dim = 0;        // D
  CrossEntropyGpuType type = CrossEntropyGpuType::kFloat32;
  bool targets_int64 = true;
  bool has_bias = false;
  CrossEntropyGpuMath math = CrossEntropyGpuMath::kAuto;
  int device = -1;
};

cudaError_t CutCrossEntropyGpuWorkspaceBytes(const CutCrossEntropyGpuDims& d,
                                             bool backward, size_t* bytes);

// loss, lse: float32 [N].
cudaError_t CutCrossEntropyGpuForward(const CutCrossEntropyGpuDims& d,
                                      const void* hidden,
                                      const void* item_table,
                                      const float* item_bias,
                                      const void* targets, float* loss,
                                      float* lse, void* workspace,
                                      size_t workspace_bytes,
                                      cudaStream_t stream);

// d_hidden [N, D], d_item_table [C, D] (type), d_item_bias [C] (float32;
// ignored without bias).
cudaError_t CutCrossEntropyGpuBackward(
    const CutCrossEntropyGpuDims& d, const void* hidden,
    const void* item_table, const float* item_bias, const void* targets,
    const float* lse, const float* d_loss, void* d_hidden,
    void* d_item_table, float* d_item_bias, void* workspace,
    size_t workspace_bytes, cudaStream_t stream);

}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_CUT_CROSS_ENTROPY_GPU_H_
