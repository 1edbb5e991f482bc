// Padding-free (packed, "varlen") softmax attention on the GPU: the CUDA
// counterpart of ragged_attention.h, with the same meaning and layout.
//
// Layout: the T tokens of B sequences are packed along axis 0 and row_splits
// [B + 1] gives sequence b the tokens [row_splits[b], row_splits[b + 1]);
// q, k are [T, H, Dh], v, out are [T, H, Dv] (row-major, contiguous), the
// per-row log-sum-exp is [T, H] float32. Token i attends to tokens j of its
// own sequence with j <= i (causal) or to all of them:
//
//   s_ij = scale * q_i . k_j,   L_i = log sum_j exp(s_ij),
//   out_i = sum_j exp(s_ij - L_i) v_j.
//
// Kernels (ragged_attention.cu.cc), FlashAttention-2 style, SIMT fp32 math
// (inputs float32, float16 or bfloat16, converted to float32 on load into
// shared memory; every accumulation is float32):
//   forward  one thread block per (work item = query block of one sequence,
//            head); key blocks stream through shared memory; online
//            (running max, running sum) softmax; writes out and L.
//   backward three kernels, no atomics (deterministic):
//            D_i = dout_i . out_i  (one warp per (token, head));
//            dQ: one block per (query block, head), loops over key blocks,
//                recomputes P = exp(s - L), dS = P * (dout V^T - D),
//                dQ = scale * dS K;
//            dK, dV: one block per (key block, head), loops over the query
//                blocks that see it, dV = P^T dout, dK = scale * dS^T Q.
//   Head dims: any Dh, Dv <= 128 (kernels are specialised for a padded width
//   of 32, 64 or 128; the padding is zero-filled in shared memory).
//
// Work list: only non-empty sequences produce work items, ceil(len / R)
// items each, R = block rows (64, or 32 where a GPU has too little shared
// memory per block for 64 with Dh or Dv > 64). Every thread block does real
// work: empty rows cost nothing and one long row among short ones is just
// more items. The list can be built on the host (sorted by decreasing cost:
// the longest-running blocks start first) or on the device (no host sync,
// sequence order; validates row_splits on the device and runs nothing when
// they are invalid).
//
// Framework-free: CUDA runtime API and std only, no TensorFlow or PyTorch
// headers. This header is also included by g++-compiled code (the TF GPU
// OpKernels in custom_ops/tf/ragged_attention_op_gpu.cc and the harness's C
// shim), so it holds no device code.
#ifndef TFREC_FAST_KERNELS_RAGGED_ATTENTION_GPU_H_
#define TFREC_FAST_KERNELS_RAGGED_ATTENTION_GPU_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

namespace tfrec_fast {
namespace kernels {

// Element type of q, k, v, out, d_out, dq, dk, dv.
enum class RaggedAttentionGpuType : int {
  kFloat32 = 0,
  kFloat16 = 1,   // IEEE half (__half, Eigen::half)
  kBFloat16 = 2,  // bfloat16 (__nv_bfloat16, tensorflow::bfloat16)
};

// Largest Dh and Dv the GPU kernels take.
constexpr int64_t kRaggedAttentionGpuMaxHeadDim = 128;

struct RaggedAttentionGpuDims {
  int64_t num_tokens = 0;  // T (< 2^31)
  int64_t num_heads = 0;   // H (<= 65535)
  int64_t head_dim = 0;    // Dh (queries and keys), <= 128
  int64_t value_dim = 0;   // Dv (values and output), <= 128
  bool causal = true;
  float scale = 1.0f;
  RaggedAttentionGpuType type = RaggedAttentionGpuType::kFloat32;
  // CUDA device ordinal that owns the pointers and the stream; -1: the
  // calling thread's current device. The launchers make it current for the
  // call and restore the previous one.
  int device = -1;
};

// One thread block's share: block `block` (of `num_blocks`, each `R` rows)
// of the sequence with tokens [start, start + length). The forward and dQ
// kernels take query rows [block * R, ...); the dK/dV kernel takes key rows
// of block num_blocks - 1 - block, so one list sorted by decreasing forward
// cost is also sorted by decreasing dK/dV cost.
struct RaggedAttentionGpuItem {
  int32_t start = 0;
  int32_t length = 0;
  int32_t block = 0;
  int32_t num_blocks = 0;
};

// A work list in device memory.
struct RaggedAttentionGpuWork {
  const RaggedAttentionGpuItem* items = nullptr;  // device array
  // Device scalar: the number of items in use (thread blocks past it return
  // at once), as written by LaunchPlanRaggedAttentionGpu; nullptr when all
  // `num_items` are in use (a host-built list).
  const int32_t* count = nullptr;
  int64_t num_items = 0;  // items in `items` (the grid size)
  int block_rows = 64;    // R the list was built with
};

// Rows per block (64 or 32) the kernels use for these head dims on
// `device` (-1: current): 64 unless the largest of the three kernels'
// shared memory exceeds what the device allows a block. Build the work list
// with it. Fails with cudaErrorInvalidValue for Dh or Dv outside [0, 128].
cudaError_t RaggedAttentionGpuBlockRows(int64_t head_dim, int64_t value_dim,
                                        int device, int* block_rows);

// Host planner. Returns false (and leaves *items empty) unless row_splits
// (num_rows + 1 entries, host memory) starts at 0, does not decrease and
// ends at num_tokens < 2^31; use CheckRowSplits (ragged_attention.h) for a
// message. Items are sorted by decreasing cost (ties: sequence order).
bool PlanRaggedAttentionGpu(const int64_t* row_splits, int64_t num_rows,
                            int64_t num_tokens, int block_rows, bool causal,
                            std::vector<RaggedAttentionGpuItem>* items);

// Items a device-built list may need: an upper bound of
// sum_b ceil(len_b / block_rows) over every valid row_splits.
int64_t RaggedAttentionGpuMaxItems(int64_t num_rows, int64_t num_tokens,
                                   int block_rows);

// Device planner: one small kernel that validates row_splits (device memory,
// int32 or int64, num_rows + 1 entries) and fills `items` (capacity
// `max_items` >= RaggedAttentionGpuMaxItems) in sequence order (each
// sequence's blocks from the last to the first: the costly causal blocks
// first). header_device[0] = items in use (0 when invalid), header_device[1]
// = 0 if row_splits is valid, else 1 + the first bad position p (p = 0: the
// first entry is not 0; 0 < p <= num_rows: row_splits[p] < row_splits[p-1]
// or, for p = num_rows, the last entry is not num_tokens). Pass
// {items, header_device, max_items, block_rows} as the work list: kernels
// launched on the same stream run nothing for invalid row_splits, so they
// never read out of bounds; read the header to report the error.
cudaError_t LaunchPlanRaggedAttentionGpu(const void* row_splits_device,
                                         bool row_splits_int64,
                                         int64_t num_rows, int64_t num_tokens,
                                         int block_rows,
                                         RaggedAttentionGpuItem* items,
                                         int64_t max_items,
                                         int32_t* header_device, int device,
                                         cudaStream_t stream);

// Forward: out [T, H, Dv] (dims.type), lse [T, H] float32. Every element of
// out and lse that belongs to a token of a valid work list is written.
// Asynchronous on `stream`; returns the launch status.
cudaError_t RaggedAttentionGpuForward(const RaggedAttentionGpuDims& dims,
                                      const RaggedAttentionGpuWork& work,
                                      const void* q, const void* k,
                                      const void* v, void* out, float* lse,
                                      cudaStream_t stream);

// Bytes of device workspace the backward needs (D = rowsum(dout * out),
// float32 [T, H]); aligned to 256.
size_t RaggedAttentionGpuBackwardWorkspaceBytes(
    const RaggedAttentionGpuDims& dims);

// Backward: dq, dk [T, H, Dh], dv [T, H, Dv] (dims.type), from q, k, v, the
// forward's out and lse, and d_out. `workspace`: at least
// RaggedAttentionGpuBackwardWorkspaceBytes bytes, 16-byte aligned. The work
// list must be built with the same row_splits and block rows. Deterministic
// (no atomics). Asynchronous on `stream`.
cudaError_t RaggedAttentionGpuBackward(const RaggedAttentionGpuDims& dims,
                                       const RaggedAttentionGpuWork& work,
                                       const void* q, const void* k,
                                       const void* v, const void* out,
                                       const float* lse, const void* d_out,
                                       void* dq, void* dk, void* dv,
                                       void* workspace, cudaStream_t stream);

}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_RAGGED_ATTENTION_GPU_H_
