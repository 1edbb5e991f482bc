// CCEMinus on the CPU: sampled-negatives softmax cross-entropy without the
// [N, K] logits or the gathered [N, K, D] negative rows (see
// docs/fused_cross_entropy.md for the meaning and the op contract).
//
// For row t with hidden state h_t, target y_t and K negatives n_tj (per row)
// or n_j (shared), each with the correction log(K q(n)):
//
//   s_tc  = h_t . w_c + b_c,   s'_tj = s_{t, n_tj} - log(K q(n_tj))
//           (-inf when n_tj == y_t and accidental hits are removed)
//   lse_t = log(exp(s_{t, y_t}) + sum_j exp(s'_tj)),
//   loss_t = lse_t - s_{t, y_t}
//
// Per-row negatives (given [N, K], or generated in the kernel from the
// counter-based RNG of counter_rng.h, uniform or by Walker's alias table):
//
//   Forward, rows partitioned over workers: per row, the K ids (read, or
//   generated from (seed, step, row_offset + t, j)), K dot products with the
//   gathered rows w_n (W negatives at a time, reduced by one transposed
//   vector reduction, rows prefetched ahead), corrections, hits masked, and a
//   log-sum-exp over the K scores of that row (a K-float scratch row; no
//   [N, K] buffer).
//
//   Backward, without atomics and deterministic:
//   - Histogram: the items [0, C) are cut into buckets of 2^shift items
//     (2^shift D floats of dw, about 256 KiB: an L2's worth) and the rows
//     into a few contiguous chunks; per chunk, the number of its logits
//     (positives and non-hit negatives) per bucket (ids regenerated from
//     the RNG). A prefix sum gives every (chunk, bucket) its own range.
//   - Pass A, chunks over workers: per row, recompute the scores,
//     ds_tj = g_t exp(s'_tj - lse_t), ds_pos = g_t (exp(s_pos - lse_t) - 1),
//     dh_t = ds_pos w_y + sum_j ds_tj w_{n_tj} (rows are owned), and append
//     each logit's (t, item offset, ds) to its bucket's range. Chunks are
//     filled in row order, so every bucket's entries are in (t, j) order.
//   - Pass B, buckets over workers (largest first): zero the bucket's rows
//     of dw (they stay in L2), then dw_n += ds h_t, db_n += ds for its
//     entries in order (h is [N, D], far smaller than the [C, D] table).
//   Every dw_n is a sum in (t, j) order: bit-identical from run to run and
//   for any number of threads. No per-thread [C, D] buffers, no atomics;
//   w is only gathered by rows (forward, pass A) and dw written once, bucket
//   by bucket. Compared with the brief's first idea (each worker scans every
//   draw, recomputes the dots of the items it owns and scatters into dw):
//   the draws are generated twice in total instead of once per worker, the
//   logits are computed once instead of twice, and dw is written
//   bucket by bucket in L2 instead of at random in [C, D]. The price is the
//   entry buffer: 8 bytes per logit (12 when N 2^shift >= 2^32), N (K + 1)
//   entries (26 MB at N = 12,800, K = 256), freed when the op returns.
//
// Shared negatives ([K] given): a small GEMM. The K rows are packed once
// (transposed, [D, Kp], for the scores; as rows, [Kp, Dp], for dh), rows of h
// go in register tiles of R rows against column blocks of the packed
// negatives (online log-sum-exp across blocks). The backward recomputes the
// tile, forms dS = g P, dh = dS W_neg, and dW_neg = dS^T H into one partial
// [Kp, Dp] per fixed chunk of rows (the chunking depends on the shapes only),
// summed in chunk order afterwards: deterministic. Its gradient is compact:
// [K + N, D] rows of concat(negative_ids, targets).
//
// Vector code: GCC vector extensions compiled for AVX-512, AVX2+FMA and the
// build's baseline, picked at run time as for the other CPU kernels
// (TFREC_FAST_CPU_ISA caps it; cpu_isa.h). Framework-free (std only);
// compute float32.
#ifndef TFREC_FAST_KERNELS_CCE_MINUS_H_
#define TFREC_FAST_KERNELS_CCE_MINUS_H_

#include <cstdint>
#include <functional>

namespace tfrec_fast {
namespace kernels {

enum class CceMinusSampling {
  kGivenPerRow = 0,  // negative_ids [N, K], negative_log_kq [N, K]
  kGivenShared = 1,  // negative_ids [K], negative_log_kq [K]
  kUniform = 2,      // generated: uniform over [0, C)
  kUnigram = 3,      // generated: Walker's alias table
};

// One call's inputs, already checked (shapes, ids in [0, C)). Every float
// pointer is float32; ids are int32 or int64 (exactly one of each pair is
// set where the mode uses it).
struct CceMinusArgs {
  int64_t num_rows = 0;       // N
  int64_t dim = 0;            // D
  int64_t num_items = 0;      // C
  int64_t num_negatives = 0;  // K
  CceMinusSampling sampling = CceMinusSampling::kUniform;
  bool remove_accidental_hits = true;

  const float* hidden = nullptr;  // [N, D]
  const float* table = nullptr;   // [C, D]
  const float* bias = nullptr;    // [C], or nullptr without bias
  const int32_t* targets32 = nullptr;  // [N]
  const int64_t* targets64 = nullptr;
  // Given negatives: ids and their log(K q), [N, K] or [K].
  const int32_t* negative_ids32 = nullptr;
  const int64_t* negative_ids64 = nullptr;
  const float* negative_log_kq = nullptr;
  // Unigram: alias table and log q, [C] each.
  const float* alias_accept = nullptr;
  const int64_t* alias_index = nullptr;
  const float* log_q_table = nullptr;
  // Generated negatives: the RNG key (seed, step) and row_offset.
  int64_t seed = 0;
  int64_t step = 0;
  int64_t row_offset = 0;
};

struct CceMinusGrads {
  float* d_hidden = nullptr;  // [N, D]
  float* d_table = nullptr;   // [CceMinusGradTableRows(args), D]
  float* d_bias = nullptr;    // [CceMinusGradTableRows(args)], or nullptr
};

// Runs fn(i) for every i in [0, n), in any order and possibly concurrently;
// returns when all calls have returned.
using CceMinusParallelFor =
    std::function<void(int64_t n, const std::function<void(int64_t)>& fn)>;

// Rows of d_table (and entries of d_bias): C for per-row negatives, K + N
// for shared ones (the K draws, then the N targets).
int64_t CceMinusGradTableRows(const CceMinusArgs& args);

// loss [N] and lse [N]. `num_workers` sizes the work split (any value works);
// `parallel` runs the pieces (nullptr: serially).
void CceMinusForward(const CceMinusArgs& args, float* loss, float* lse,
                     int num_workers, const CceMinusParallelFor& parallel);

// The gradients of sum_t d_loss[t] loss_t, given the forward's lse. Every
// output element is written (no need to zero them first).
void CceMinusBackward(const CceMinusArgs& args, const float* lse,
                      const float* d_loss, const CceMinusGrads& grads,
                      int num_workers, const CceMinusParallelFor& parallel);

}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_CCE_MINUS_H_
