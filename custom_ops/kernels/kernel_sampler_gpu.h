// Quadratic-kernel sampler draws on the GPU: the CUDA counterpart of
// kernel_sampler.h's DrawRows, over the same arrays (tree [2 num_leaves, S]
// packed node sums, counts [2 num_leaves], snapshot [C, D]; layout in
// kernel_sampler.h) and with the same meaning:
//
//   ids[t, k]    K draws with replacement from q_i(h_t) = K(h_t, w_i) /
//                sum_j K(h_t, w_j),  K(h, w) = alpha (h . w)^2 + 1;
//   log_q[t, k]  log K(h_t, w_id) - log(alpha <Z_root, h_t h_t^T> + C).
//
// Same draws as the CPU kernel, not just the same distribution: draw j of
// row t descends with the uniforms of counter_rng.h at counters
// (CallKey(seed, "kernel" salt), row t, j * kLevelsPerDraw + level), and
// every number a decision depends on is computed with the CPU kernel's
// float32 operations in the CPU kernel's order:
//   - the node score <Z, M'> + n: the packed row product as the CPU copy of
//     width W sums it (4 accumulator vectors of W lanes over blocks of 4W
//     floats, the rest into the first, lanes added pairwise then in order),
//     products fused into the sums (FMA) or not as that copy's compiler
//     emitted them;
//   - a leaf item's h . w: 2 accumulator vectors, then one W block, then
//     the scalar tail (GCC 12 -O3 vectorises the first W/2 tail products
//     of the FMA copies without fusing them; mirrored);
//   - M' = alpha packed(h h^T), the kernel value alpha dot^2 + 1 (fused in
//     the FMA copies), the leaf's running double sum and the
//     upper_bound pick, the split test u * s_total < s_left in double.
// `sum_lanes` / `fused` name the CPU copy mirrored: 16 / true (AVX-512),
// 8 / true (AVX2 + FMA), 4 / false (SSE baseline of x86-64). The TF op
// passes the copy its own CPU kernel runs (cpu_isa.h), so that on one
// machine the GPU op's draws equal the CPU op's bit for bit; log_q agrees
// within float rounding (the device's log vs glibc's). With another
// profile, draws differ only where a uniform lands within rounding of a
// split boundary (about 1e-6 of them).
//
// Kernel (kernel_sampler.cu.cc): one thread block (128 threads, 4 warps)
// per query row (blocks loop over rows). M' and h live in shared memory
// (M' in the workspace when it does not fit). The row's K draws descend
// together, level by level, as the CPU's depth-first walk does, without
// its order: they stay grouped by node in an index array ("segments",
// one per distinct node at the level); each warp takes whole segments:
// an internal node's two child scores are one warp-cooperative pass over
// the two adjacent tree rows (the 4W partial sums spread over the lanes,
// combined in the CPU's order by lane 0), then the segment's draws are
// split left / right with warp scans into the other index array; a leaf's
// item kernel values are computed one item per lane, summed in order by
// lane 0, and each of its draws picks by binary search. A block-wide
// scan then packs the child segments for the next level. Work per row:
// two node scores (2 S floats each) per distinct node visited, as on the
// CPU, plus L D per distinct leaf.
//
// Ids and counts are trusted as on the CPU (no index is read from the
// data: node ids follow from the layout, so bad tree data cannot make a
// read go out of bounds). Query rows must be finite (the TF op scans them
// with KernelSamplerGpuFirstNonFinite first).
//
// Framework-free: CUDA runtime API and std only; no device code here.
#ifndef TFREC_FAST_KERNELS_KERNEL_SAMPLER_GPU_H_
#define TFREC_FAST_KERNELS_KERNEL_SAMPLER_GPU_H_

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace tfrec_fast {
namespace kernels {

struct KernelSamplerGpuDims {
  int64_t num_rows = 0;   // T query rows
  int64_t num_items = 0;  // C (>= 1)
  int64_t dim = 0;        // D (>= 1)
  int64_t leaf_size = 0;  // L (>= 1)
  int64_t num_draws = 0;  // K per row (>= 1, < 2^31)
  float alpha = 1.0f;     // > 0
  uint64_t seed = 0;      // kernel_sampler::DrawArgs::seed
  int sum_lanes = 16;     // W of the CPU copy mirrored: 4, 8 or 16
  bool fused = true;      // that copy fuses its products (FMA)
  int device = -1;        // -1: the current device
};

// Device pointers.
struct KernelSamplerGpuInputs {
  const float* query = nullptr;     // [T, D]
  const float* tree = nullptr;      // [2 ceil(C / L), PackedStride(D)]
  const int64_t* counts = nullptr;  // [2 ceil(C / L)]
  const float* snapshot = nullptr;  // [C, D]
};

// Workspace bytes of KernelSamplerGpuDraw (cudaErrorInvalidValue for
// invalid dims). Depends on the dims only.
cudaError_t KernelSamplerGpuWorkspaceBytes(const KernelSamplerGpuDims& d,
                                           size_t* bytes);

// ids int64 [T, K], log_q float32 [T, K] (device). Asynchronous on
// `stream`; nothing is launched for T = 0.
cudaError_t KernelSamplerGpuDraw(const KernelSamplerGpuDims& d,
                                 const KernelSamplerGpuInputs& in,
                                 int64_t* ids, float* log_q, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream);

// Enqueues a scan of x[0, n) (device): afterwards the device scalar
// *first_bad holds the smallest position of a NaN / Inf, or all bits set
// if there is none. Asynchronous.
cudaError_t KernelSamplerGpuFirstNonFinite(const float* x, int64_t n,
                                           unsigned long long* first_bad,
                                           cudaStream_t stream);

}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_KERNEL_SAMPLER_GPU_H_
