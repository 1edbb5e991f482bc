// C ABI over custom_ops/kernels/kernel_sampler_gpu.h for ctypes (the
// standalone harness, libtfrec_fast_kernels.so; see build.sh). Plain C
// types only: pointers are device addresses (torch's data_ptr()), streams
// are cudaStream_t values, sizes are int64. Every function returns a
// cudaError_t as int (0: success) unless documented otherwise;
// tfrec_ks_error_string() names it.
//
// Problem sizes and flags travel as an int64 array `dims` (9 entries):
//   [0] T rows  [1] C items  [2] D  [3] L leaf size  [4] K draws per row
//   [5] seed (the 64 bits of DrawArgs::seed)
//   [6] sum lanes W of the CPU copy mirrored (4, 8, 16)  [7] fused (0/1)
//   [8] device (-1: current)
// and alpha as a float.
#include <cstdint>

#include <cuda_runtime_api.h>

#include "custom_ops/kernels/counter_rng.h"
#include "custom_ops/kernels/kernel_sampler.h"
#include "custom_ops/kernels/kernel_sampler_gpu.h"

namespace {

namespace tk = tfrec_fast::kernels;

tk::KernelSamplerGpuDims SamplerDims(const int64_t* dims, float alpha) {
  tk::KernelSamplerGpuDims d;
  d.num_rows = dims[0];
  d.num_items = dims[1];
  d.dim = dims[2];
  d.leaf_size = dims[3];
  d.num_draws = dims[4];
  d.seed = static_cast<uint64_t>(dims[5]);
  d.sum_lanes = static_cast<int>(dims[6]);
  d.fused = dims[7] != 0;
  d.device = static_cast<int>(dims[8]);
  d.alpha = alpha;
  return d;
}

}  // namespace

extern "C" {

// Version of this ABI; bump on any signature change.
int tfrec_ks_abi_version() { return 1; }

const char* tfrec_ks_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

int tfrec_ks_workspace_bytes(const int64_t* dims, float alpha,
                             int64_t* bytes) {
  size_t b = 0;
  const cudaError_t err =
      tk::KernelSamplerGpuWorkspaceBytes(SamplerDims(dims, alpha), &b);
  *bytes = static_cast<int64_t>(b);
  return static_cast<int>(err);
}

// ids int64 [T, K], log_q float32 [T, K].
int tfrec_ks_draw(const int64_t* dims, float alpha, const float* query,
                  const float* tree, const int64_t* counts,
                  const float* snapshot, int64_t* ids, float* log_q,
                  void* workspace, int64_t workspace_bytes, void* stream) {
  tk::KernelSamplerGpuInputs in;
  in.query = query;
  in.tree = tree;
  in.counts = counts;
  in.snapshot = snapshot;
  return static_cast<int>(tk::KernelSamplerGpuDraw(
      SamplerDims(dims, alpha), in, ids, log_q, workspace,
      static_cast<size_t>(workspace_bytes),
      static_cast<cudaStream_t>(stream)));
}

// *first_bad (a device uint64) = the first non-finite position of x[0, n),
// or all bits set.
int tfrec_ks_first_non_finite(const float* x, int64_t n,
                              unsigned long long* first_bad, void* stream) {
  return static_cast<int>(tk::KernelSamplerGpuFirstNonFinite(
      x, n, first_bad, static_cast<cudaStream_t>(stream)));
}

// ---- The sampler's random stream on the host (no CUDA), for the harness's
// port: out[(r * K + j) * levels + l] = the uniform of draw j of row
// row_begin + r at tree level l (kernel_sampler.cc's Uniform).
void tfrec_ks_uniforms(int64_t seed, int64_t row_begin, int64_t num_rows,
                       int64_t num_draws, int64_t levels, double* out) {
  namespace rng = tk::counter_rng;
  // kernel_sampler.cc's kStreamSalt.
  const uint64_t call_key = rng::CallKey(seed, 0x6b65726e656c);
  for (int64_t r = 0; r < num_rows; ++r) {
    const uint64_t row_key = rng::RowKey(call_key, row_begin + r);
    for (int64_t j = 0; j < num_draws; ++j) {
      for (int64_t l = 0; l < levels; ++l) {
        const uint64_t bits = rng::DrawBits(
            row_key, j * tk::kernel_sampler::kLevelsPerDraw + l);
        out[(r * num_draws + j) * levels + l] =
            static_cast<double>(bits >> 11) * 1.1102230246251565e-16;
      }
    }
  }
}

}  // extern "C"
