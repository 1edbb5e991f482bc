// CUDA draws of the quadratic-kernel sampler; see kernel_sampler_gpu.h for
// the meaning, the design and the API, and kernel_sampler.cc (DrawRowsImpl)
// for the CPU kernel whose every rounding this mirrors.
//
// Thread block: 128 threads = 4 warps, one query row at a time (blocks
// loop over rows). Shared memory: h [D] and M' [S] (dynamic; M' in the
// block's workspace when it does not fit), per-warp reduction scratch and
// the block scan's totals (static). Per block in the workspace: two draw
// index arrays [K] (the current level's, grouped by node, and the next
// one's), two segment lists (node, begin, end) [K], the split of each
// segment [K], the leaf scratch of each warp (kernel values and their
// running sums, [L] doubles each) and M' [S].
//
// Per level: each warp takes segments s = warp, warp + 4, ...:
//   internal node: PackedDotPair (both children in one pass: lane c holds
//     the partial sums of chain c (and c + 32) of both rows, lane 0 combines
//     them in the CPU's order), then the draws of the segment go left
//     (u * s_total < s_left) to the front or right to the back of the
//     segment's range in the other index array (warp prefix sums);
//   leaf: kernel values one item per lane (each lane runs the CPU's
//     chains of DotAny), lane 0's running sum, a binary search per draw.
// Then a block scan over the segments' child counts packs the next level's
// segment list (children of segment s follow those of s - 1, left first).
//
// Control flow within a warp is uniform wherever it meets a shuffle or a
// __syncwarp (segment loops run per warp; loops over draws and items step
// by 32 from a warp-uniform start).
#include "custom_ops/kernels/kernel_sampler_gpu.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "custom_ops/kernels/counter_rng.h"
#include "custom_ops/kernels/gpu_kernel_helpers.cu.h"
#include "custom_ops/kernels/kernel_sampler.h"

namespace tfrec_fast {
namespace kernels {
namespace {
namespace ks_gpu {

namespace rng = ::tfrec_fast::kernels::counter_rng;
namespace ks = ::tfrec_fast::kernels::kernel_sampler;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// kernel_sampler.cc's kStreamSalt ("kernel"): the sampler's random stream.
constexpr int64_t kStreamSalt = 0x6b65726e656c;
// Blocks of a launch (rows loop), and the workspace they may take.
constexpr int64_t kMaxBlocks = 2048;
constexpr size_t kMaxWorkspaceBytes = size_t{256} << 20;
// Static shared memory of the draw kernel, rounded up (reduction scratch
// and scan totals), kept free of the dynamic budget.
constexpr size_t kStaticSharedBytes = 8 * 1024;

// ---------------------------------------------------------------------------
// Arithmetic with the CPU kernel's rounding: explicit fused or separately
// rounded operations, so that no compiler contracts (or fails to contract)
// them differently.

#ifdef TFREC_EMULATED_SHARED
// The CPU emulation (g++): std::fma is exactly rounded; without an FMA in
// the target a * b + c is never contracted, with one the product goes
// through a volatile.
inline float MulF(float a, float b) {
#ifdef __FP_FAST_FMAF
  volatile float p = a * b;
  return p;
#else
  return a * b;
#endif
}
inline float AddF(float a, float b) { return a + b; }
inline float FmaF(float a, float b, float c) { return std::fma(a, b, c); }
inline double MulD(double a, double b) {
#ifdef __FP_FAST_FMA
  volatile double p = a * b;
  return p;
#else
  return a * b;
#endif
}
inline double AddD(double a, double b) { return a + b; }
inline double FmaD(double a, double b, double c) { return std::fma(a, b, c); }
#else
__device__ __forceinline__ float MulF(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ float AddF(float a, float b) {
  return __fadd_rn(a, b);
}
__device__ __forceinline__ float FmaF(float a, float b, float c) {
  return __fmaf_rn(a, b, c);
}
__device__ __forceinline__ double MulD(double a, double b) {
  return __dmul_rn(a, b);
}
__device__ __forceinline__ double AddD(double a, double b) {
  return __dadd_rn(a, b);
}
__device__ __forceinline__ double FmaD(double a, double b, double c) {
  return __fma_rn(a, b, c);
}
#endif

// acc + a * b as the CPU copy computes `acc += a * b`.
__device__ __forceinline__ float MulAdd(float a, float b, float acc,
                                        bool fused) {
  return fused ? FmaF(a, b, acc) : AddF(acc, MulF(a, b));
}

// Uniform double in [0, 1) of draw j at tree level `level` (kernel_sampler.cc
// Uniform).
__device__ __forceinline__ double Uniform(uint64_t row_key, int64_t draw,
                                          int64_t level) {
  const uint64_t bits =
      rng::DrawBits(row_key, draw * ks::kLevelsPerDraw + level);
  return static_cast<double>(bits >> 11) * 1.1102230246251565e-16;
}

// ---------------------------------------------------------------------------
// Kernel arguments and the per-block workspace layout.

struct Layout {
  // Byte offsets inside one block's region.
  size_t order[2];
  size_t seg_node[2];
  size_t seg_begin[2];
  size_t seg_end[2];
  size_t split;
  size_t leaf_kernel;  // [kWarps][L] doubles
  size_t leaf_cumsum;  // [kWarps][L] doubles
  size_t m;            // [S] floats
  size_t block_bytes;
  int64_t blocks;
};

struct Args {
  const float* query;
  const float* tree;
  const int64_t* counts;
  const float* snapshot;
  int64_t* ids;
  float* log_q;
  char* workspace;
  Layout ws;
  int64_t rows;
  int64_t items;
  int64_t dim;
  int64_t leaf_size;
  int64_t num_leaves;
  int64_t stride;  // S
  int64_t packed;  // D (D + 1) / 2
  int64_t draws;   // K
  double alpha;
  uint64_t call_key;
  int fused;
  int m_shared;  // M' in dynamic shared memory after h
  int64_t h_floats;  // floats reserved for h in shared memory
};

inline size_t Align(size_t x) { return gpu::AlignBytes(x); }

bool DimsValid(const KernelSamplerGpuDims& d) {
  return d.num_rows >= 0 && d.num_items >= 1 && d.dim >= 1 &&
         d.leaf_size >= 1 && d.num_draws >= 1 &&
         d.num_draws <= int64_t{0x7fffffff} &&
         (d.sum_lanes == 4 || d.sum_lanes == 8 || d.sum_lanes == 16) &&
         d.alpha > 0.0f && std::isfinite(d.alpha);
}

Layout MakeLayout(const KernelSamplerGpuDims& d) {
  const size_t k = static_cast<size_t>(d.num_draws);
  const size_t leaf = static_cast<size_t>(d.leaf_size);
  const size_t s = static_cast<size_t>(ks::PackedStride(d.dim));
  Layout w;
  size_t at = 0;
  for (int i = 0; i < 2; ++i) {
    w.order[i] = at;
    at += Align(k * sizeof(int32_t));
    w.seg_node[i] = at;
    at += Align(k * sizeof(int64_t));
    w.seg_begin[i] = at;
    at += Align(k * sizeof(int32_t));
    w.seg_end[i] = at;
    at += Align(k * sizeof(int32_t));
  }
  w.split = at;
  at += Align(k * sizeof(int32_t));
  w.leaf_kernel = at;
  at += Align(kWarps * leaf * sizeof(double));
  w.leaf_cumsum = at;
  at += Align(kWarps * leaf * sizeof(double));
  w.m = at;
  at += Align(s * sizeof(float));
  w.block_bytes = at;
  int64_t blocks = std::min<int64_t>(std::max<int64_t>(d.num_rows, 1),
                                     kMaxBlocks);
  const int64_t fit = static_cast<int64_t>(kMaxWorkspaceBytes / at);
  blocks = std::max<int64_t>(1, std::min(blocks, fit));
  w.blocks = blocks;
  return w;
}

// ---------------------------------------------------------------------------
// Device side.

// <Z_left, M'> and <Z_left+1, M'> (two adjacent tree rows) as the CPU's
// DotPacked<W> sums each: chain c = a W + l (accumulator a, lane l) takes
// positions b 4W + c, the 4W-block remainder goes to chain l; lane 0
// combines (s0 + s1) + (s2 + s3) per lane l and adds the W lanes in order
// from 0. The whole warp calls it; every lane gets both sums.
template <int W>
__device__ __forceinline__ void PackedDotPair(const float* __restrict__ rows,
                                              const float* __restrict__ m,
                                              int64_t stride, bool fused,
                                              float* scratch, int lane,
                                              float* z0, float* z1) {
  constexpr int kChains = 4 * W;
  constexpr int kPerLane = (kChains + 31) / 32;
  const float* r0 = rows;
  const float* r1 = rows + stride;
  const int64_t blocks = stride / kChains;
  float acc0[kPerLane], acc1[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    acc0[k] = 0.0f;
    acc1[k] = 0.0f;
    const int c = lane + 32 * k;
    if (c < kChains) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t p = b * kChains + c;
        const float mv = m[p];
        acc0[k] = MulAdd(r0[p], mv, acc0[k], fused);
        acc1[k] = MulAdd(r1[p], mv, acc1[k], fused);
      }
    }
  }
  if (lane < W) {  // chain lane of accumulator 0: the W-wide remainder
    for (int64_t p = blocks * kChains + lane; p < stride; p += W) {
      const float mv = m[p];
      acc0[0] = MulAdd(r0[p], mv, acc0[0], fused);
      acc1[0] = MulAdd(r1[p], mv, acc1[0], fused);
    }
  }
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int c = lane + 32 * k;
    if (c < kChains) {
      scratch[c] = acc0[k];
      scratch[kChains + c] = acc1[k];
    }
  }
  __syncwarp();
  if (lane == 0) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float* s = scratch + half * kChains;
      float sum = 0.0f;
#pragma unroll
      for (int l = 0; l < W; ++l) {
        sum = AddF(sum, AddF(AddF(s[l], s[W + l]),
                             AddF(s[2 * W + l], s[3 * W + l])));
      }
      scratch[2 * kChains + half] = sum;
    }
  }
  __syncwarp();
  *z0 = scratch[2 * kChains];
  *z1 = scratch[2 * kChains + 1];
  // The next call's first writes wait at its own first __syncwarp for
  // every lane to have read these.
}

// h . x over D floats as the CPU's DotAny<W> sums it (one thread): chains
// c < 2W over blocks of 2W, one more W block into chains 0..W-1, the lanes
// (s0 + s1) added in order, then the scalar tail, whose first W/2 products
// GCC's vectorised epilogue rounds before adding in the FMA copies (W = 8,
// 16) when the tail holds at least W/2 of them; the rest are fused there.
template <int W>
__device__ __forceinline__ float LeafDot(const float* __restrict__ x,
                                         const float* __restrict__ h,
                                         int64_t dim, bool fused) {
  float acc[2 * W];
#pragma unroll
  for (int c = 0; c < 2 * W; ++c) acc[c] = 0.0f;
  int64_t i = 0;
  for (; i + 2 * W <= dim; i += 2 * W) {
#pragma unroll
    for (int c = 0; c < 2 * W; ++c) {
      acc[c] = MulAdd(x[i + c], h[i + c], acc[c], fused);
    }
  }
  if (i + W <= dim) {
#pragma unroll
    for (int l = 0; l < W; ++l) {
      acc[l] = MulAdd(x[i + l], h[i + l], acc[l], fused);
    }
    i += W;
  }
  float s = 0.0f;
#pragma unroll
  for (int l = 0; l < W; ++l) s = AddF(s, AddF(acc[l], acc[W + l]));
  if (fused && W >= 8 && dim - i >= W / 2) {
#pragma unroll
    for (int l = 0; l < W / 2; ++l) s = AddF(s, MulF(x[i + l], h[i + l]));
    i += W / 2;
  }
  for (; i < dim; ++i) s = MulAdd(x[i], h[i], s, fused);
  return s;
}

// K(h, w) summed over a node: max(<Z, M'>, 0) + n.
__device__ __forceinline__ double NodeScore(float z, int64_t count) {
  const double zd = static_cast<double>(z);
  return (zd > 0.0 ? zd : 0.0) + static_cast<double>(count);
}

// alpha dot^2 + 1 as the CPU copy computes `alpha * dot * dot + 1.0`.
__device__ __forceinline__ double KernelValue(double alpha, float dot,
                                              bool fused) {
  const double d = static_cast<double>(dot);
  const double ad = MulD(alpha, d);
  return fused ? FmaD(ad, d, 1.0) : AddD(MulD(ad, d), 1.0);
}

// First i in [0, n) with sorted[i] > target, else n (std::upper_bound).
__device__ __forceinline__ int64_t UpperBound(const double* sorted, int64_t n,
                                              double target) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (target < sorted[mid]) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Inclusive prefix sum over the warp's lanes (all lanes call it).
__device__ __forceinline__ int WarpInclusiveSum(int x, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, offset);
    if (lane >= offset) x += y;
  }
  return x;
}

__device__ __forceinline__ int WarpTotal(int x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

template <int W>
__global__ void __launch_bounds__(kThreads) DrawKernel(Args a) {
  constexpr int kChains = 4 * W;
  __shared__ float reduce_scratch[kWarps][2 * kChains + 2];
  __shared__ double leaf_total[kWarps];
  __shared__ int64_t scan_totals[kThreads];
  __shared__ double log_root_shared;
  __shared__ int64_t num_segments_shared;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const bool fused = a.fused != 0;
  const int64_t D = a.dim, S = a.stride, K = a.draws, L = a.leaf_size;
  const int64_t num_leaves = a.num_leaves;

  float* smem = gpu::DynamicShared<float>();
  float* h = smem;  // [D]
  char* ws = a.workspace + static_cast<size_t>(blockIdx.x) * a.ws.block_bytes;
  float* m = a.m_shared ? smem + a.h_floats
                        : reinterpret_cast<float*>(ws + a.ws.m);
  // The two index arrays and segment lists, current and next by `cur`
  // (selected, not indexed, so that they stay in registers).
  int32_t* const order0 = reinterpret_cast<int32_t*>(ws + a.ws.order[0]);
  int32_t* const order1 = reinterpret_cast<int32_t*>(ws + a.ws.order[1]);
  int64_t* const node0 = reinterpret_cast<int64_t*>(ws + a.ws.seg_node[0]);
  int64_t* const node1 = reinterpret_cast<int64_t*>(ws + a.ws.seg_node[1]);
  int32_t* const begin0 = reinterpret_cast<int32_t*>(ws + a.ws.seg_begin[0]);
  int32_t* const begin1 = reinterpret_cast<int32_t*>(ws + a.ws.seg_begin[1]);
  int32_t* const end0 = reinterpret_cast<int32_t*>(ws + a.ws.seg_end[0]);
  int32_t* const end1 = reinterpret_cast<int32_t*>(ws + a.ws.seg_end[1]);
  int32_t* split = reinterpret_cast<int32_t*>(ws + a.ws.split);
  double* leaf_kernel =
      reinterpret_cast<double*>(ws + a.ws.leaf_kernel) + warp * L;
  double* leaf_cumsum =
      reinterpret_cast<double*>(ws + a.ws.leaf_cumsum) + warp * L;
  float* scratch = reduce_scratch[warp];

  for (int64_t t = blockIdx.x; t < a.rows; t += gridDim.x) {
    const float* hq = a.query + t * D;
    // h, M' = alpha packed(h h^T) with the off-diagonal doubled (PackQuery),
    // the first segment: every draw at the root.
    for (int64_t d = tid; d < D; d += kThreads) h[d] = hq[d];
    for (int64_t i = warp; i < D; i += kWarps) {
      const int64_t base = i * D - i * (i - 1) / 2;  // packed (i, i)
      const double hi = static_cast<double>(hq[i]) * a.alpha;
      const double twice = 2.0 * hi;
      for (int64_t j = i + lane; j < D; j += 32) {
        m[base + j - i] =
            j == i ? static_cast<float>(hi * static_cast<double>(hq[i]))
                   : static_cast<float>(twice * static_cast<double>(hq[j]));
      }
    }
    for (int64_t p = a.packed + tid; p < S; p += kThreads) m[p] = 0.0f;
    for (int64_t k = tid; k < K; k += kThreads) {
      order0[k] = static_cast<int32_t>(k);
    }
    if (tid == 0) {
      node0[0] = 1;
      begin0[0] = 0;
      end0[0] = static_cast<int32_t>(K);
    }
    __syncthreads();
    if (warp == 0) {
      // log of the root's score: the pair of rows 0 (unused) and 1, which
      // every tree has.
      float z_unused = 0.0f, z_root = 0.0f;
      PackedDotPair<W>(a.tree, m, S, fused, scratch, lane, &z_unused,
                       &z_root);
      if (lane == 0) log_root_shared = log(NodeScore(z_root, a.counts[1]));
    }
    __syncthreads();
    const double log_root = log_root_shared;
    const uint64_t row_key = rng::RowKey(a.call_key, t);
    int64_t* row_ids = a.ids + t * K;
    float* row_log_q = a.log_q + t * K;

    int cur = 0;
    int64_t num_segments = 1;
    // (At most 63 levels below the root; the bound only guards the loop.)
    for (int64_t level = 0; num_segments > 0 && level < ks::kLevelsPerDraw;
         ++level) {
      const int32_t* const order_cur = cur ? order1 : order0;
      int32_t* const order_nxt = cur ? order0 : order1;
      const int64_t* const node_cur = cur ? node1 : node0;
      int64_t* const node_nxt = cur ? node0 : node1;
      const int32_t* const begin_cur = cur ? begin1 : begin0;
      int32_t* const begin_nxt = cur ? begin0 : begin1;
      const int32_t* const end_cur = cur ? end1 : end0;
      int32_t* const end_nxt = cur ? end0 : end1;
      for (int64_t s = warp; s < num_segments; s += kWarps) {
        const int64_t node = node_cur[s];
        const int64_t begin = begin_cur[s];
        const int64_t end = end_cur[s];
        if (node >= num_leaves) {
          // Leaf: kernel values of its items, their running sum, the picks.
          const int64_t first = (node - num_leaves) * L;
          const int64_t n = std::min(L, a.items - first);
          for (int64_t i = lane; i < n; i += 32) {
            const float dot =
                LeafDot<W>(a.snapshot + (first + i) * D, h, D, fused);
            leaf_kernel[i] = KernelValue(a.alpha, dot, fused);
          }
          __syncwarp();
          if (lane == 0) {
            double total = 0.0;
            for (int64_t i = 0; i < n; ++i) {
              total += leaf_kernel[i];
              leaf_cumsum[i] = total;
            }
            leaf_total[warp] = total;
            split[s] = -1;
          }
          __syncwarp();
          const double total = leaf_total[warp];
          for (int64_t p = begin + lane; p < end; p += 32) {
            const int64_t j = order_cur[p];
            const double target = Uniform(row_key, j, level) * total;
            int64_t i = UpperBound(leaf_cumsum, n, target);
            if (i >= n) i = n - 1;  // target rounded up to the total
            row_ids[j] = first + i;
            row_log_q[j] = static_cast<float>(log(leaf_kernel[i]) - log_root);
          }
          __syncwarp();  // the leaf scratch is free again
          continue;
        }
        const int64_t left = 2 * node;
        float z_left = 0.0f, z_right = 0.0f;
        PackedDotPair<W>(a.tree + left * S, m, S, fused, scratch, lane,
                         &z_left, &z_right);
        const double s_left = NodeScore(z_left, a.counts[left]);
        const double s_total = s_left + NodeScore(z_right, a.counts[left + 1]);
        // Left-goers to the front of [begin, end) of the next index array,
        // right-goers to its back.
        int64_t num_left = 0, num_right = 0;
        for (int64_t base = begin; base < end; base += 32) {
          const int64_t p = base + lane;
          const bool valid = p < end;
          const int64_t j = valid ? order_cur[p] : 0;
          const bool go_left =
              valid && Uniform(row_key, j, level) * s_total < s_left;
          const bool go_right = valid && !go_left;
          const int flags = (go_left ? 1 : 0) | (go_right ? 1 << 16 : 0);
          const int inclusive = WarpInclusiveSum(flags, lane);
          const int total = WarpTotal(flags);
          if (go_left) {
            order_nxt[begin + num_left + (inclusive & 0xffff) - 1] =
                static_cast<int32_t>(j);
          } else if (go_right) {
            order_nxt[end - num_right - (inclusive >> 16)] =
                static_cast<int32_t>(j);
          }
          num_left += total & 0xffff;
          num_right += total >> 16;
        }
        if (lane == 0) split[s] = static_cast<int32_t>(begin + num_left);
      }
      __syncthreads();
      // Child segments: count per thread's chunk of segments, scan the
      // totals, write them in segment order.
      const int64_t chunk = (num_segments + kThreads - 1) / kThreads;
      const int64_t lo = std::min(num_segments, tid * chunk);
      const int64_t hi = std::min(num_segments, lo + chunk);
      int64_t count = 0;
      for (int64_t s = lo; s < hi; ++s) {
        const int64_t sp = split[s];
        if (sp >= 0) {
          count += (sp > begin_cur[s] ? 1 : 0) +
                   (end_cur[s] > sp ? 1 : 0);
        }
      }
      scan_totals[tid] = count;
      __syncthreads();
      if (tid == 0) {
        int64_t running = 0;
        for (int i = 0; i < kThreads; ++i) {
          const int64_t c = scan_totals[i];
          scan_totals[i] = running;
          running += c;
        }
        num_segments_shared = running;
      }
      __syncthreads();
      int64_t out = scan_totals[tid];
      for (int64_t s = lo; s < hi; ++s) {
        const int32_t sp = split[s];
        if (sp < 0) continue;
        const int64_t node = node_cur[s];
        const int32_t b = begin_cur[s];
        const int32_t e = end_cur[s];
        if (sp > b) {
          node_nxt[out] = 2 * node;
          begin_nxt[out] = b;
          end_nxt[out] = sp;
          ++out;
        }
        if (e > sp) {
          node_nxt[out] = 2 * node + 1;
          begin_nxt[out] = sp;
          end_nxt[out] = e;
          ++out;
        }
      }
      num_segments = num_segments_shared;
      cur ^= 1;
      __syncthreads();
    }
  }
}

// Smallest position of a non-finite value (gpu::FindFirstBad).
__device__ __forceinline__ bool IsFinite(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return (bits & 0x7f800000u) != 0x7f800000u;
}

__global__ void FirstNonFiniteKernel(const float* __restrict__ x, int64_t n,
                                     unsigned long long* first_bad) {
  gpu::FindFirstBad(n, [&](int64_t p) { return !IsFinite(x[p]); },
                    first_bad);
}

template <int W>
cudaError_t Launch(const Args& args, size_t smem, cudaStream_t stream) {
  const cudaError_t err = gpu::AllowDynamicShared(DrawKernel<W>, smem);
  if (err != cudaSuccess) return err;
  TFREC_KERNEL_LAUNCH(DrawKernel<W>, static_cast<unsigned int>(args.ws.blocks),
                      kThreads, smem, stream)(args);
  return cudaGetLastError();
}

}  // namespace ks_gpu
}  // namespace

cudaError_t KernelSamplerGpuWorkspaceBytes(const KernelSamplerGpuDims& d,
                                           size_t* bytes) {
  *bytes = 0;
  if (!ks_gpu::DimsValid(d)) return cudaErrorInvalidValue;
  const ks_gpu::Layout w = ks_gpu::MakeLayout(d);
  *bytes = w.block_bytes * static_cast<size_t>(w.blocks);
  return cudaSuccess;
}

cudaError_t KernelSamplerGpuDraw(const KernelSamplerGpuDims& d,
                                 const KernelSamplerGpuInputs& in,
                                 int64_t* ids, float* log_q, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream) {
  using namespace ks_gpu;  // NOLINT
  if (!DimsValid(d)) return cudaErrorInvalidValue;
  if (d.num_rows == 0) return cudaSuccess;
  const Layout w = MakeLayout(d);
  if (workspace == nullptr ||
      workspace_bytes < w.block_bytes * static_cast<size_t>(w.blocks)) {
    return cudaErrorInvalidValue;
  }
  gpu::DeviceScope scope(d.device);
  if (scope.status() != cudaSuccess) return scope.status();

  Args a;
  a.query = in.query;
  a.tree = in.tree;
  a.counts = in.counts;
  a.snapshot = in.snapshot;
  a.ids = ids;
  a.log_q = log_q;
  a.workspace = static_cast<char*>(workspace);
  a.ws = w;
  a.rows = d.num_rows;
  a.items = d.num_items;
  a.dim = d.dim;
  a.leaf_size = d.leaf_size;
  a.num_leaves = (d.num_items + d.leaf_size - 1) / d.leaf_size;
  a.stride = ks::PackedStride(d.dim);
  a.packed = ks::PackedSize(d.dim);
  a.draws = d.num_draws;
  a.alpha = static_cast<double>(d.alpha);
  a.call_key = rng::CallKey(static_cast<int64_t>(d.seed), kStreamSalt);
  a.fused = d.fused ? 1 : 0;
  a.h_floats = (d.dim + 3) / 4 * 4;  // M' 16-byte aligned after h

  // h always in shared memory; M' too when it fits the device's opt-in
  // budget (beside the static scratch).
  int optin = 0;
  cudaError_t err = gpu::DeviceAttribute(
      d.device, cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin);
  if (err != cudaSuccess) return err;
  const size_t budget =
      std::max<size_t>(gpu::kDefaultSharedBytes, static_cast<size_t>(optin)) -
      kStaticSharedBytes;
  const size_t h_bytes = static_cast<size_t>(a.h_floats) * sizeof(float);
  const size_t m_bytes = static_cast<size_t>(a.stride) * sizeof(float);
  a.m_shared = h_bytes + m_bytes <= budget ? 1 : 0;
  const size_t smem = h_bytes + (a.m_shared ? m_bytes : 0);
  if (smem > budget) return cudaErrorInvalidConfiguration;  // D > ~50000

  switch (d.sum_lanes) {
    case 4: return Launch<4>(a, smem, stream);
    case 8: return Launch<8>(a, smem, stream);
    default: return Launch<16>(a, smem, stream);
  }
}

cudaError_t KernelSamplerGpuFirstNonFinite(const float* x, int64_t n,
                                           unsigned long long* first_bad,
                                           cudaStream_t stream) {
  cudaError_t err =
      cudaMemsetAsync(first_bad, 0xFF, sizeof(*first_bad), stream);
  if (err != cudaSuccess || n <= 0) return err;
  constexpr int kScanThreads = 256;
  const int64_t blocks =
      std::min<int64_t>((n + kScanThreads - 1) / kScanThreads, 4096);
  TFREC_KERNEL_LAUNCH(ks_gpu::FirstNonFiniteKernel,
                      static_cast<unsigned int>(blocks), kScanThreads, 0,
                      stream)(x, n, first_bad);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace tfrec_fast
