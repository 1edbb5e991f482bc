// C ABI over custom_ops/kernels/ragged_attention_gpu.h for ctypes (the
// standalone harness, libtfrec_fast_kernels.so; see build.sh). Plain C types
// only: pointers are device addresses (e.g. torch's data_ptr()), streams are
// cudaStream_t values (torch.cuda.current_stream().cuda_stream), sizes are
// int64. Every function returns a cudaError_t as int (0: success) unless
// documented otherwise; tfrec_ra_error_string() names it.
#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

#include "custom_ops/kernels/ragged_attention_gpu.h"

namespace {

namespace rak = tfrec_fast::kernels;

rak::RaggedAttentionGpuDims MakeDims(int dtype, int64_t num_tokens,
                                     int64_t num_heads, int64_t head_dim,
                                     int64_t value_dim, int causal,
                                     float scale, int device) {
  rak::RaggedAttentionGpuDims dims;
  dims.num_tokens = num_tokens;
  dims.num_heads = num_heads;
  dims.head_dim = head_dim;
  dims.value_dim = value_dim;
  dims.causal = causal != 0;
  dims.scale = scale;
  dims.type = static_cast<rak::RaggedAttentionGpuType>(dtype);
  dims.device = device;
  return dims;
}

rak::RaggedAttentionGpuWork MakeWork(const void* items, const int32_t* count,
                                     int64_t num_items, int block_rows) {
  rak::RaggedAttentionGpuWork work;
  work.items = static_cast<const rak::RaggedAttentionGpuItem*>(items);
  work.count = count;
  work.num_items = num_items;
  work.block_rows = block_rows;
  return work;
}

bool TypeValid(int dtype) { return dtype >= 0 && dtype <= 2; }

}  // namespace

extern "C" {

// Version of this ABI; bump on any signature change.
int tfrec_ra_abi_version() { return 1; }

const char* tfrec_ra_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

int tfrec_ra_block_rows(int64_t head_dim, int64_t value_dim, int device,
                        int* block_rows) {
  return static_cast<int>(rak::RaggedAttentionGpuBlockRows(
      head_dim, value_dim, device, block_rows));
}

int64_t tfrec_ra_max_items(int64_t num_rows, int64_t num_tokens,
                           int block_rows) {
  return rak::RaggedAttentionGpuMaxItems(num_rows, num_tokens, block_rows);
}

// Host planner into host memory `items_out` (4 int32 per item, `capacity`
// items). Returns 0 and sets *count, 1 for invalid row_splits, 2 when
// `capacity` is too small (*count: the items needed). No CUDA call.
int tfrec_ra_plan_host(const int64_t* row_splits, int64_t num_rows,
                       int64_t num_tokens, int block_rows, int causal,
                       int32_t* items_out, int64_t capacity,
                       int64_t* count) {
  std::vector<rak::RaggedAttentionGpuItem> items;
  if (!rak::PlanRaggedAttentionGpu(row_splits, num_rows, num_tokens,
                                   block_rows, causal != 0, &items)) {
    *count = 0;
    return 1;
  }
  *count = static_cast<int64_t>(items.size());
  if (*count > capacity) return 2;
  for (size_t i = 0; i < items.size(); ++i) {
    items_out[4 * i + 0] = items[i].start;
    items_out[4 * i + 1] = items[i].length;
    items_out[4 * i + 2] = items[i].block;
    items_out[4 * i + 3] = items[i].num_blocks;
  }
  return 0;
}

int tfrec_ra_plan_device(const void* row_splits, int row_splits_int64,
                         int64_t num_rows, int64_t num_tokens, int block_rows,
                         void* items, int64_t max_items, int32_t* header,
                         int device, void* stream) {
  return static_cast<int>(rak::LaunchPlanRaggedAttentionGpu(
      row_splits, row_splits_int64 != 0, num_rows, num_tokens, block_rows,
      static_cast<rak::RaggedAttentionGpuItem*>(items), max_items, header,
      device, static_cast<cudaStream_t>(stream)));
}

// `count`: device int32 scalar (a device plan's header) or null.
int tfrec_ra_forward(int dtype, int64_t num_tokens, int64_t num_heads,
                     int64_t head_dim, int64_t value_dim, int causal,
                     float scale, int device, const void* items,
                     const int32_t* count, int64_t num_items, int block_rows,
                     const void* q, const void* k, const void* v, void* out,
                     float* lse, void* stream) {
  if (!TypeValid(dtype)) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(rak::RaggedAttentionGpuForward(
      MakeDims(dtype, num_tokens, num_heads, head_dim, value_dim, causal,
               scale, device),
      MakeWork(items, count, num_items, block_rows), q, k, v, out, lse,
      static_cast<cudaStream_t>(stream)));
}

int64_t tfrec_ra_backward_workspace_bytes(int64_t num_tokens,
                                          int64_t num_heads) {
  rak::RaggedAttentionGpuDims dims;
  dims.num_tokens = num_tokens;
  dims.num_heads = num_heads;
  return static_cast<int64_t>(
      rak::RaggedAttentionGpuBackwardWorkspaceBytes(dims));
}

int tfrec_ra_backward(int dtype, int64_t num_tokens, int64_t num_heads,
                      int64_t head_dim, int64_t value_dim, int causal,
                      float scale, int device, const void* items,
                      const int32_t* count, int64_t num_items, int block_rows,
                      const void* q, const void* k, const void* v,
                      const void* out, const float* lse, const void* d_out,
                      void* dq, void* dk, void* dv, void* workspace,
                      void* stream) {
  if (!TypeValid(dtype)) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(rak::RaggedAttentionGpuBackward(
      MakeDims(dtype, num_tokens, num_heads, head_dim, value_dim, causal,
               scale, device),
      MakeWork(items, count, num_items, block_rows), q, k, v, out, lse,
      d_out, dq, dk, dv, workspace, static_cast<cudaStream_t>(stream)));
}

}  // extern "C"
