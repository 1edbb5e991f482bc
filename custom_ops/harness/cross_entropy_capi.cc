// C ABI over custom_ops/kernels/cut_cross_entropy_gpu.h and cce_minus_gpu.h
// for ctypes (the standalone harness, libtfrec_fast_kernels.so; see
// build.sh). Plain C types only: pointers are device addresses (torch's
// data_ptr()), streams are cudaStream_t values, sizes are int64. Every
// function returns a cudaError_t as int (0: success) unless documented
// otherwise; tfrec_ce_error_string() names it.
//
// Problem sizes and flags travel as an int64 array `dims`:
//   CutCrossEntropy (8 entries):
//     [0] dtype (0 float32, 1 float16, 2 bfloat16)  [1] N  [2] C  [3] D
//     [4] targets int64 (0/1)  [5] has bias (0/1)
//     [6] math (0 auto: tensor cores for half types on sm_80+, 1 SIMT)
//     [7] device (-1: current)
//   CCEMinus (16 entries):
//     [0] dtype  [1] N  [2] C  [3] D  [4] K
//     [5] sampling (0 given, 1 uniform, 2 unigram)  [6] shared (0/1)
//     [7] targets int64  [8] negative ids int64  [9] has bias
//     [10] remove accidental hits  [11] seed  [12] step  [13] row offset
//     [14] math  [15] device
#include <cstdint>

#include <cuda_runtime_api.h>

#include "custom_ops/kernels/cce_minus_gpu.h"
#include "custom_ops/kernels/counter_rng.h"
#include "custom_ops/kernels/cut_cross_entropy_gpu.h"

namespace {

namespace tk = tfrec_fast::kernels;

bool TypeValid(int64_t dtype) { return dtype >= 0 && dtype <= 2; }

tk::CutCrossEntropyGpuDims CceDims(const int64_t* dims) {
  tk::CutCrossEntropyGpuDims d;
  d.type = static_cast<tk::CrossEntropyGpuType>(dims[0]);
  d.num_rows = dims[1];
  d.num_items = dims[2];
  d.dim = dims[3];
  d.targets_int64 = dims[4] != 0;
  d.has_bias = dims[5] != 0;
  d.math = static_cast<tk::CrossEntropyGpuMath>(dims[6] != 0 ? 1 : 0);
  d.device = static_cast<int>(dims[7]);
  return d;
}

tk::CceMinusGpuDims MinusDims(const int64_t* dims) {
  tk::CceMinusGpuDims d;
  d.type = static_cast<tk::CrossEntropyGpuType>(dims[0]);
  d.num_rows = dims[1];
  d.num_items = dims[2];
  d.dim = dims[3];
  d.num_negatives = dims[4];
  d.sampling = static_cast<tk::CceMinusGpuSampling>(dims[5]);
  d.shared_negatives = dims[6] != 0;
  d.targets_int64 = dims[7] != 0;
  d.negative_ids_int64 = dims[8] != 0;
  d.has_bias = dims[9] != 0;
  d.remove_hits = dims[10] != 0;
  d.seed = dims[11];
  d.step = dims[12];
  d.row_offset = dims[13];
  d.math = static_cast<tk::CrossEntropyGpuMath>(dims[14] != 0 ? 1 : 0);
  d.device = static_cast<int>(dims[15]);
  return d;
}

bool MinusValid(const int64_t* dims) {
  return TypeValid(dims[0]) && dims[5] >= 0 && dims[5] <= 2;
}

tk::CceMinusGpuInputs MinusInputs(const void* hidden, const void* item_table,
                                  const float* item_bias, const void* targets,
                                  const void* negative_ids,
                                  const float* negative_log_kq,
                                  const float* alias_accept,
                                  const int64_t* alias_index,
                                  const float* log_q_table) {
  tk::CceMinusGpuInputs in;
  in.hidden = hidden;
  in.item_table = item_table;
  in.item_bias = item_bias;
  in.targets = targets;
  in.negative_ids = negative_ids;
  in.negative_log_kq = negative_log_kq;
  in.alias_accept = alias_accept;
  in.alias_index = alias_index;
  in.log_q_table = log_q_table;
  return in;
}

}  // namespace

extern "C" {

// Version of this ABI; bump on any signature change.
int tfrec_ce_abi_version() { return 1; }

const char* tfrec_ce_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

// ---- CutCrossEntropy ----

int tfrec_ce_cce_workspace_bytes(const int64_t* dims, int backward,
                                 int64_t* bytes) {
  if (!TypeValid(dims[0])) return static_cast<int>(cudaErrorInvalidValue);
  size_t b = 0;
  const cudaError_t err =
      tk::CutCrossEntropyGpuWorkspaceBytes(CceDims(dims), backward != 0, &b);
  *bytes = static_cast<int64_t>(b);
  return static_cast<int>(err);
}

int tfrec_ce_cce_forward(const int64_t* dims, const void* hidden,
                         const void* item_table, const float* item_bias,
                         const void* targets, float* loss, float* lse,
                         void* workspace, int64_t workspace_bytes,
                         void* stream) {
  if (!TypeValid(dims[0])) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(tk::CutCrossEntropyGpuForward(
      CceDims(dims), hidden, item_table, item_bias, targets, loss, lse,
      workspace, static_cast<size_t>(workspace_bytes),
      static_cast<cudaStream_t>(stream)));
}

int tfrec_ce_cce_backward(const int64_t* dims, const void* hidden,
                          const void* item_table, const float* item_bias,
                          const void* targets, const float* lse,
                          const float* d_loss, void* d_hidden,
                          void* d_item_table, float* d_item_bias,
                          void* workspace, int64_t workspace_bytes,
                          void* stream) {
  if (!TypeValid(dims[0])) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(tk::CutCrossEntropyGpuBackward(
      CceDims(dims), hidden, item_table, item_bias, targets, lse, d_loss,
      d_hidden, d_item_table, d_item_bias, workspace,
      static_cast<size_t>(workspace_bytes),
      static_cast<cudaStream_t>(stream)));
}

// ---- CCEMinus ----

// Rows of d_item_table: C (per-row negatives) or K + N (shared). No CUDA.
int64_t tfrec_ce_ccem_item_grad_rows(const int64_t* dims) {
  return tk::CceMinusGpuItemGradRows(MinusDims(dims));
}

int tfrec_ce_ccem_workspace_bytes(const int64_t* dims, int backward,
                                  int64_t* bytes) {
  if (!MinusValid(dims)) return static_cast<int>(cudaErrorInvalidValue);
  size_t b = 0;
  const cudaError_t err =
      tk::CceMinusGpuWorkspaceBytes(MinusDims(dims), backward != 0, &b);
  *bytes = static_cast<int64_t>(b);
  return static_cast<int>(err);
}

int tfrec_ce_ccem_forward(const int64_t* dims, const void* hidden,
                          const void* item_table, const float* item_bias,
                          const void* targets, const void* negative_ids,
                          const float* negative_log_kq,
                          const float* alias_accept,
                          const int64_t* alias_index,
                          const float* log_q_table, float* loss, float* lse,
                          void* workspace, int64_t workspace_bytes,
                          void* stream) {
  if (!MinusValid(dims)) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(tk::CceMinusGpuForward(
      MinusDims(dims),
      MinusInputs(hidden, item_table, item_bias, targets, negative_ids,
                  negative_log_kq, alias_accept, alias_index, log_q_table),
      loss, lse, workspace, static_cast<size_t>(workspace_bytes),
      static_cast<cudaStream_t>(stream)));
}

int tfrec_ce_ccem_backward(const int64_t* dims, const void* hidden,
                           const void* item_table, const float* item_bias,
                           const void* targets, const void* negative_ids,
                           const float* negative_log_kq,
                           const float* alias_accept,
                           const int64_t* alias_index,
                           const float* log_q_table, const float* lse,
                           const float* d_loss, void* d_hidden,
                           void* d_item_table, float* d_item_bias,
                           void* workspace, int64_t workspace_bytes,
                           void* stream) {
  if (!MinusValid(dims)) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(tk::CceMinusGpuBackward(
      MinusDims(dims),
      MinusInputs(hidden, item_table, item_bias, targets, negative_ids,
                  negative_log_kq, alias_accept, alias_index, log_q_table),
      lse, d_loss, d_hidden, d_item_table, d_item_bias, workspace,
      static_cast<size_t>(workspace_bytes),
      static_cast<cudaStream_t>(stream)));
}

// ---- counter_rng.h on the host (no CUDA), for the harness's own port ----

// out[r * K + j] = draw j of row row_offset + r, r < num_rows, j < K:
// uniform (accept == nullptr) or unigram from (accept, alias) [C].
void tfrec_ce_rng_draws(int64_t seed, int64_t step, int64_t row_offset,
                        int64_t num_rows, int64_t num_draws,
                        int64_t num_items, const float* accept,
                        const int64_t* alias, int64_t* out) {
  namespace rng = tk::counter_rng;
  const uint64_t key = rng::CallKey(seed, step);
  for (int64_t r = 0; r < num_rows; ++r) {
    const uint64_t row_key = rng::RowKey(key, row_offset + r);
    for (int64_t j = 0; j < num_draws; ++j) {
      out[r * num_draws + j] =
          accept == nullptr
              ? rng::UniformDraw(row_key, j, num_items)
              : rng::UnigramDraw(row_key, j, num_items, accept, alias);
    }
  }
}

}  // extern "C"
