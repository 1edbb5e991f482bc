// Sampled-negative softmax cross-entropy ("CCEMinus") on the GPU, with the
// meaning of docs/fused_cross_entropy.md:
//
//   s'_tj  = h_t . w_{n_tj} + b_{n_tj} - log(K q(n_tj))
//            (-inf when n_tj == y_t and remove_hits: an accidental hit)
//   lse_t  = log(exp(s_{t,y_t}) + sum_j exp(s'_tj)),
//   loss_t = lse_t - s_{t,y_t}
//
// Negatives: given per row (ids [N, K] and log(K q) [N, K]), given shared
// ([K] and [K]), or generated inside the kernels from the counter-based RNG
// of counter_rng.h keyed by (seed, step, row_offset + t, j): uniform
// (correction float(log K - log C)) or unigram by Walker's alias table
// (correction float(log K) + log_q_table[n]). The backward regenerates the
// forward's draws; no [N, K] index tensor exists.
//
// Kernels (cce_minus.cu.cc):
//   per-row negatives (given [N, K], uniform, unigram): a gather-dot
//     problem without reuse (each row has its own negatives), bound by the
//     reads of w rows, so SIMT: a warp takes one row and a strided share of
//     its K negatives (1, 2, 4 or 8 warps a row, more when N is small), four
//     negatives at a time (four independent row reads and warp reductions
//     in flight); lane l holds d = l + 32 i of h in registers (D <= 256; a
//     larger D streams h from global memory in 256-wide passes). Online
//     (max, sum) per warp, merged with the positive in a fixed order per
//     row in shared memory.
//     Backward: the same walk recomputes s', p = exp(s' - lse) (0 for a
//     hit), ds = g p; dh accumulates in registers (shared memory past 256)
//     and is merged per row in a fixed order (deterministic); dW and db are
//     float32 atomic adds (red.global.add) into a [C, D] accumulator (the
//     output itself for float32, a workspace cast at the end for float16 /
//     bfloat16): summation order, hence the last bits of dW, vary from run
//     to run. A deterministic dW would need the (row, draw) pairs sorted by
//     item, i.e. the [N, K] ids the design avoids. Rows with g == 0 are
//     skipped (their gradient is exactly 0). Past D = 256 the backward
//     keeps 8 x D floats in shared memory: D up to 7264 on an H100 (5216
//     on an A100); a larger D is refused (cudaErrorInvalidConfiguration).
//   shared negatives ([K]): every row scores the same K items, a dense
//     N x K product: the tile engine of cut_cross_entropy_gpu.h with
//     columns = the K draws (tensor cores for half types), positive apart,
//     and the compact [K + N, D] gradient; deterministic.
//
// Ids are checked by the caller (the TF op scans targets, negative ids and
// the alias table on the device before launching). The kernels never read
// out of bounds for bad ids; such a row gets a NaN loss.
//
// Framework-free: CUDA runtime API and std only; no device code here.
#ifndef TFREC_FAST_KERNELS_CCE_MINUS_GPU_H_
#define TFREC_FAST_KERNELS_CCE_MINUS_GPU_H_

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "custom_ops/kernels/cut_cross_entropy_gpu.h"

namespace tfrec_fast {
namespace kernels {

enum class CceMinusGpuSampling : int {
  kGiven = 0,    // negative_ids / negative_log_kq, [N, K] or [K] (shared)
  kUniform = 1,  // generated, q = 1 / C
  kUnigram = 2,  // generated from the alias table
};

struct CceMinusGpuDims {
  int64_t num_rows = 0;       // N
  int64_t num_items = 0;      // C
  int64_t dim = 0;            // D
  int64_t num_negatives = 0;  // K
  CceMinusGpuSampling sampling = CceMinusGpuSampling::kGiven;
  bool shared_negatives = false;  // kGiven with [K] ids
  CrossEntropyGpuType type = CrossEntropyGpuType::kFloat32;
  bool targets_int64 = true;
  bool negative_ids_int64 = true;
  bool has_bias = false;
  bool remove_hits = true;
  int64_t seed = 0;  // rng_key (generated negatives)
  int64_t step = 0;
  int64_t row_offset = 0;
  CrossEntropyGpuMath math = CrossEntropyGpuMath::kAuto;  // shared only
  int device = -1;
};

// Device pointers (nullptr where the mode does not use them).
struct CceMinusGpuInputs {
  const void* hidden = nullptr;             // T [N, D]
  const void* item_table = nullptr;         // T [C, D]
  const float* item_bias = nullptr;         // [C] (has_bias)
  const void* targets = nullptr;            // int32 / int64 [N]
  const void* negative_ids = nullptr;       // kGiven: [N, K] or [K]
  const float* negative_log_kq = nullptr;   // kGiven: same shape
  const float* alias_accept = nullptr;      // kUnigram: [C]
  const int64_t* alias_index = nullptr;     // kUnigram: [C]
  const float* log_q_table = nullptr;       // kUnigram: [C]
};

// Rows of d_item_table: C (per-row negatives) or K + N (shared).
int64_t CceMinusGpuItemGradRows(const CceMinusGpuDims& d);

// Workspace bytes of the forward (backward = false) or the backward.
cudaError_t CceMinusGpuWorkspaceBytes(const CceMinusGpuDims& d, bool backward,
                                      size_t* bytes);

// loss, lse: float32 [N]. Asynchronous on `stream`.
cudaError_t CceMinusGpuForward(const CceMinusGpuDims& d,
                               const CceMinusGpuInputs& in, float* loss,
                               float* lse, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream);

// d_hidden [N, D] and d_item_table [CceMinusGpuItemGradRows, D] in the type,
// d_item_bias float32 [same rows] (nullptr: not computed). Every element is
// written. Asynchronous on `stream`.
cudaError_t CceMinusGpuBackward(const CceMinusGpuDims& d,
                                const CceMinusGpuInputs& in,
                                const float* lse, const float* d_loss,
                                void* d_hidden, void* d_item_table,
                                float* d_item_bias, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream);

}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_CCE_MINUS_GPU_H_
