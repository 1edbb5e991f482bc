// CUDA kernels of packed (ragged) softmax attention; see
// ragged_attention_gpu.h for the meaning, the layout and the launch API.
//
// Thread block: 256 threads seen as a 16 x 16 grid, ty = tid / 16 (a warp
// holds two ty) and tx = tid % 16. A tile of R = 16 * RPT rows (RPT = 4:
// R = 64; RPT = 2: R = 32) against R columns is split so that thread (ty, tx)
// owns rows ty * RPT + i (i < RPT) and columns tx + 16 * j (j < RPT): a row's
// 16 owners are one half-warp, so row max / row sum are 4 shuffles. Operand
// tiles live in shared memory as float32 [R][DMAX + 4] (the +4 keeps rows
// 16-byte aligned and puts the 8 rows a quarter-warp reads on distinct banks);
// score-like tiles that feed a second product are stored transposed,
// X[col][row] with stride R + 4, so a thread reads its RPT rows as one vector.
// Output-like accumulators [R][DMAX] stay in registers: thread (ty, tx) owns
// rows ty * RPT + i and DMAX / 16 columns, in chunks of up to 4 contiguous
// columns (column cc * 16 * W + tx * W + w).
//
// Scores stay in natural units; exponentials are exp2f((x - ref) * log2(e))
// with the difference taken first, so huge scores lose no more digits than a
// plain float32 softmax does (scaling scores by log2(e) before subtracting
// would round at their magnitude). The backward forms s * scale - L with one
// fmaf for the same reason; its dot products (TileDot) accumulate in the
// same order as the forward's, so the recomputed scores are bitwise the
// forward's and P = exp(s - L) is consistent with the stored L.
#include "custom_ops/kernels/ragged_attention_gpu.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

// Kernel launches (TFREC_KERNEL_LAUNCH) and dynamic shared memory go through
// gpu_kernel_helpers.cu.h so that the harness's CPU emulation
// (custom_ops/harness/emulation/) can run this very file on the CPU.
#include "custom_ops/kernels/gpu_kernel_helpers.cu.h"

namespace tfrec_fast {
namespace kernels {
namespace {

constexpr int kThreads = 256;

template <int DMAX, int RPT>
struct Cfg {
  static constexpr int kRows = 16 * RPT;       // rows of a query / key block
  static constexpr int kRS = DMAX + 4;         // row stride of operand tiles
  static constexpr int kXS = kRows + 4;        // row stride of X tiles
  static constexpr int kTile = kRows * kRS;    // floats of an operand tile
  static constexpr int kXTile = kRows * kXS;   // floats of an X tile
  static constexpr int kOC = DMAX / 16;        // output columns per thread
  static constexpr int kW = kOC < 4 ? kOC : 4;  // contiguous columns a chunk
  static constexpr int kChunks = kOC / kW;
  static constexpr int kLoadIters = kRows * DMAX / kThreads;
  static_assert(kThreads % DMAX == 0, "DMAX must divide the block size");
  static_assert(kLoadIters * kThreads == kRows * DMAX, "tile load split");
  static_assert(kChunks * kW == kOC, "column chunks");

  // Shared memory (bytes) of each kernel.
  static constexpr size_t kForwardFloats =
      2 * kTile + (kTile > kXTile ? kTile : kXTile);
  static constexpr size_t kDqFloats = 4 * kTile + kXTile;
  static constexpr size_t kDkvFloats = 4 * kTile + kXTile + 2 * kRows;
  static constexpr size_t kMaxBytes =
      sizeof(float) *
      (kDkvFloats > kDqFloats
           ? (kDkvFloats > kForwardFloats ? kDkvFloats : kForwardFloats)
           : (kDqFloats > kForwardFloats ? kDqFloats : kForwardFloats));
};

// N consecutive floats of shared memory, N in {1, 2, 4}, aligned to N * 4.
template <int N>
__device__ __forceinline__ void LoadVec(const float* p, float* x) {
  if constexpr (N == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
  } else if constexpr (N == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    x[0] = v.x;
    x[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = p[i];
  }
}

template <int N>
__device__ __forceinline__ void StoreVec(float* p, const float* x) {
  if constexpr (N == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  } else if constexpr (N == 2) {
    *reinterpret_cast<float2*>(p) = make_float2(x[0], x[1]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = x[i];
  }
}

// Max / sum over the 16 threads of a half-warp (the owners of one row). All
// 32 lanes of the warp must call it.
__device__ __forceinline__ float HalfWarpMax(float v) {
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

__device__ __forceinline__ float HalfWarpSum(float v) {
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// dst[r][d] (stride kRS) = src row r (r < rows), column d (d < dim), as
// float32; zero elsewhere (rows past the sequence, columns past the head
// dim). `base` is the element offset of the tile's first row, head h,
// column 0; consecutive rows are `stride` elements apart.
template <typename T, int DMAX, int RPT>
__device__ __forceinline__ void LoadTile(float* __restrict__ dst,
                                         const T* __restrict__ src,
                                         int64_t base, int rows,
                                         int64_t stride, int dim) {
  using C = Cfg<DMAX, RPT>;
  float tmp[C::kLoadIters];
  const int d = threadIdx.x % DMAX;
  const int r0 = threadIdx.x / DMAX;
  constexpr int kRowStep = kThreads / DMAX;
#pragma unroll
  for (int n = 0; n < C::kLoadIters; ++n) {
    const int r = r0 + n * kRowStep;
    tmp[n] =
        (r < rows && d < dim)
            ? gpu::ToFloat(src[base + static_cast<int64_t>(r) * stride + d])
            : 0.0f;
  }
#pragma unroll
  for (int n = 0; n < C::kLoadIters; ++n) {
    dst[(r0 + n * kRowStep) * C::kRS + d] = tmp[n];
  }
}

// acc[i][j] = A[ty * RPT + i] . B[tx + 16 * j] over DMAX columns (operand
// tiles, stride kRS).
template <int DMAX, int RPT>
__device__ __forceinline__ void TileDot(const float* __restrict__ a,
                                        const float* __restrict__ b, int ty,
                                        int tx, float (&acc)[RPT][RPT]) {
  using C = Cfg<DMAX, RPT>;
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
#pragma unroll
    for (int j = 0; j < RPT; ++j) acc[i][j] = 0.0f;
  }
#pragma unroll 4
  for (int d = 0; d < DMAX; d += 4) {
    float av[RPT][4];
    float bv[RPT][4];
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      LoadVec<4>(a + (ty * RPT + i) * C::kRS + d, av[i]);
    }
#pragma unroll
    for (int j = 0; j < RPT; ++j) {
      LoadVec<4>(b + (tx + 16 * j) * C::kRS + d, bv[j]);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
#pragma unroll
        for (int j = 0; j < RPT; ++j) {
          acc[i][j] = fmaf(av[i][e], bv[j][e], acc[i][j]);
        }
      }
    }
  }
}

// x[col][row] (stride kXS) = s[i][j] for row ty * RPT + i, col tx + 16 * j.
template <int DMAX, int RPT>
__device__ __forceinline__ void StoreTransposed(float* __restrict__ x,
                                                const float (&s)[RPT][RPT],
                                                int ty, int tx) {
  using C = Cfg<DMAX, RPT>;
#pragma unroll
  for (int j = 0; j < RPT; ++j) {
    float col[RPT];
#pragma unroll
    for (int i = 0; i < RPT; ++i) col[i] = s[i][j];
    StoreVec<RPT>(x + (tx + 16 * j) * C::kXS + ty * RPT, col);
  }
}

// acc[i][c] += sum_k X[k][ty * RPT + i] * B[k][column c] over the kRows
// rows k of an X tile and an operand tile B.
template <int DMAX, int RPT>
__device__ __forceinline__ void TileAccumulate(
    const float* __restrict__ x, const float* __restrict__ b, int ty, int tx,
    float (&acc)[RPT][Cfg<DMAX, RPT>::kOC]) {
  using C = Cfg<DMAX, RPT>;
#pragma unroll 4
  for (int k = 0; k < C::kRows; ++k) {
    float xv[RPT];
    LoadVec<RPT>(x + k * C::kXS + ty * RPT, xv);
#pragma unroll
    for (int cc = 0; cc < C::kChunks; ++cc) {
      float bv[C::kW];
      LoadVec<C::kW>(b + k * C::kRS + cc * 16 * C::kW + tx * C::kW, bv);
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
#pragma unroll
        for (int w = 0; w < C::kW; ++w) {
          acc[i][cc * C::kW + w] = fmaf(xv[i], bv[w], acc[i][cc * C::kW + w]);
        }
      }
    }
  }
}

// Writes rows ty * RPT + i (< rows) of a register accumulator, times
// `factor`, to dst[base + row * stride + column] for columns < dim.
template <typename T, int DMAX, int RPT>
__device__ __forceinline__ void StoreRows(
    T* __restrict__ dst, const float (&acc)[RPT][Cfg<DMAX, RPT>::kOC],
    const float (&factor)[RPT], int64_t base, int rows, int64_t stride,
    int dim, int ty, int tx) {
  using C = Cfg<DMAX, RPT>;
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int r = ty * RPT + i;
    if (r >= rows) continue;
    T* row = dst + base + static_cast<int64_t>(r) * stride;
#pragma unroll
    for (int cc = 0; cc < C::kChunks; ++cc) {
#pragma unroll
      for (int w = 0; w < C::kW; ++w) {
        const int col = cc * 16 * C::kW + tx * C::kW + w;
        if (col < dim) {
          row[col] = gpu::FromFloat<T>(acc[i][cc * C::kW + w] * factor[i]);
        }
      }
    }
  }
}

struct KernelArgs {
  const RaggedAttentionGpuItem* items;
  const int32_t* count;  // nullptr: every item of the grid is in use
  const void* q;
  const void* k;
  const void* v;
  const void* out;    // backward: the forward output
  const void* d_out;  // backward
  const float* lse;   // backward: forward log-sum-exp [T, H]
  const float* dsum;  // backward: rowsum(d_out * out) [T, H]
  void* o;            // forward output
  float* lse_out;     // forward log-sum-exp
  void* dq;
  void* dk;
  void* dv;
  int num_heads;
  int head_dim;
  int value_dim;
  float scale;
  bool causal;
};

// The item of this thread block, or false when the block has no work.
__device__ __forceinline__ bool GetItem(const KernelArgs& args,
                                        RaggedAttentionGpuItem* item) {
  const int index = static_cast<int>(blockIdx.x);
  if (args.count != nullptr && index >= *args.count) return false;
  *item = args.items[index];
  return item->length > 0;
}

// ---------------------------------------------------------------------------
// Forward: one block per (query block, head).
template <typename T, int DMAX, int RPT>
__global__ void __launch_bounds__(kThreads, 2)
    ForwardKernel(const KernelArgs args) {
  using C = Cfg<DMAX, RPT>;
  RaggedAttentionGpuItem item;
  if (!GetItem(args, &item)) return;
  const int h = blockIdx.y;
  const int ty = threadIdx.x / 16;
  const int tx = threadIdx.x % 16;
  const int H = args.num_heads, Dh = args.head_dim, Dv = args.value_dim;
  const int64_t qk_stride = static_cast<int64_t>(H) * Dh;
  const int64_t v_stride = static_cast<int64_t>(H) * Dv;
  const int len = item.length;
  const int q0 = item.block * C::kRows;
  const int q_rows = min(C::kRows, len - q0);

  float* qs = gpu::DynamicShared<float>();
  float* ks = qs + C::kTile;  // also the X tile (probabilities)
  float* vs = ks + (C::kTile > C::kXTile ? C::kTile : C::kXTile);
  float* xs = ks;

  const T* q = static_cast<const T*>(args.q);
  const T* k = static_cast<const T*>(args.k);
  const T* v = static_cast<const T*>(args.v);
  LoadTile<T, DMAX, RPT>(qs, q,
                         (static_cast<int64_t>(item.start) + q0) * qk_stride +
                             static_cast<int64_t>(h) * Dh,
                         q_rows, qk_stride, Dh);

  const float scale = args.scale;
  float m[RPT], l[RPT], acc[RPT][C::kOC];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int cc = 0; cc < C::kOC; ++cc) acc[i][cc] = 0.0f;
  }
  const int num_key_blocks = args.causal ? item.block + 1 : item.num_blocks;
  for (int kb = 0; kb < num_key_blocks; ++kb) {
    const int k0 = kb * C::kRows;
    const int k_rows = min(C::kRows, len - k0);
    __syncthreads();  // the last tile's readers of ks / xs / vs are done
    LoadTile<T, DMAX, RPT>(ks, k,
                           (static_cast<int64_t>(item.start) + k0) *
                                   qk_stride +
                               static_cast<int64_t>(h) * Dh,
                           k_rows, qk_stride, Dh);
    LoadTile<T, DMAX, RPT>(vs, v,
                           (static_cast<int64_t>(item.start) + k0) * v_stride +
                               static_cast<int64_t>(h) * Dv,
                           k_rows, v_stride, Dv);
    __syncthreads();
    float s[RPT][RPT];
    TileDot<DMAX, RPT>(qs, ks, ty, tx, s);
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int row = q0 + ty * RPT + i;
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < RPT; ++j) {
        const int key = k0 + tx + 16 * j;
        const bool seen = key < len && (!args.causal || key <= row);
        s[i][j] = seen ? s[i][j] * scale : -INFINITY;
        tile_max = fmaxf(tile_max, s[i][j]);
      }
      tile_max = HalfWarpMax(tile_max);
      const float m_new = fmaxf(m[i], tile_max);
      // A row that has seen no key yet (only rows past the sequence end)
      // keeps m = -inf; 0 as the reference avoids inf - inf.
      const float ref = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f((m[i] - ref) * gpu::kLog2e);
      float row_sum = 0.0f;
#pragma unroll
      for (int j = 0; j < RPT; ++j) {
        s[i][j] = exp2f((s[i][j] - ref) * gpu::kLog2e);
        row_sum += s[i][j];
      }
      l[i] = l[i] * alpha + row_sum;  // this thread's columns only
#pragma unroll
      for (int cc = 0; cc < C::kOC; ++cc) acc[i][cc] *= alpha;
      m[i] = m_new;
    }
    __syncthreads();  // every thread is done reading ks: xs replaces it
    StoreTransposed<DMAX, RPT>(xs, s, ty, tx);
    __syncthreads();
    TileAccumulate<DMAX, RPT>(xs, vs, ty, tx, acc);
  }

  float inv[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const float total = HalfWarpSum(l[i]);
    inv[i] = total > 0.0f ? 1.0f / total : 0.0f;
    const int r = ty * RPT + i;
    if (tx == 0 && r < q_rows) {
      args.lse_out[(static_cast<int64_t>(item.start) + q0 + r) * H + h] =
          total > 0.0f ? m[i] + logf(total) : -INFINITY;
    }
  }
  StoreRows<T, DMAX, RPT>(static_cast<T*>(args.o), acc, inv,
                          (static_cast<int64_t>(item.start) + q0) * v_stride +
                              static_cast<int64_t>(h) * Dv,
                          q_rows, v_stride, Dv, ty, tx);
}

// ---------------------------------------------------------------------------
// Backward, step 1: dsum[t, h] = d_out[t, h] . out[t, h], one warp a row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    RowDotKernel(const T* __restrict__ d_out, const T* __restrict__ out,
                 int64_t rows, int dim, float* __restrict__ dsum) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) +
                     threadIdx.x / 32;
       row < rows; row += warps) {
    float sum = 0.0f;
    const int64_t base = row * dim;
    for (int col = lane; col < dim; col += 32) {
      sum = fmaf(gpu::ToFloat(d_out[base + col]),
                 gpu::ToFloat(out[base + col]), sum);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (lane == 0) dsum[row] = sum;
  }
}

// Backward, step 2: dQ, one block per (query block, head), over key blocks.
template <typename T, int DMAX, int RPT>
__global__ void __launch_bounds__(kThreads, 1)
    BackwardDqKernel(const KernelArgs args) {
  using C = Cfg<DMAX, RPT>;
  RaggedAttentionGpuItem item;
  if (!GetItem(args, &item)) return;
  const int h = blockIdx.y;
  const int ty = threadIdx.x / 16;
  const int tx = threadIdx.x % 16;
  const int H = args.num_heads, Dh = args.head_dim, Dv = args.value_dim;
  const int64_t qk_stride = static_cast<int64_t>(H) * Dh;
  const int64_t v_stride = static_cast<int64_t>(H) * Dv;
  const int len = item.length;
  const int q0 = item.block * C::kRows;
  const int q_rows = min(C::kRows, len - q0);
  const int64_t first = static_cast<int64_t>(item.start) + q0;

  float* qs = gpu::DynamicShared<float>();
  float* dos = qs + C::kTile;
  float* ks = dos + C::kTile;
  float* vs = ks + C::kTile;
  float* xs = vs + C::kTile;

  LoadTile<T, DMAX, RPT>(qs, static_cast<const T*>(args.q),
                         first * qk_stride + static_cast<int64_t>(h) * Dh,
                         q_rows, qk_stride, Dh);
  LoadTile<T, DMAX, RPT>(dos, static_cast<const T*>(args.d_out),
                         first * v_stride + static_cast<int64_t>(h) * Dv,
                         q_rows, v_stride, Dv);
  const float scale = args.scale;
  float lse[RPT], dsum[RPT], acc[RPT][C::kOC];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int r = ty * RPT + i;
    lse[i] = r < q_rows ? args.lse[(first + r) * H + h] : 0.0f;
    dsum[i] = r < q_rows ? args.dsum[(first + r) * H + h] : 0.0f;
#pragma unroll
    for (int cc = 0; cc < C::kOC; ++cc) acc[i][cc] = 0.0f;
  }
  const int num_key_blocks = args.causal ? item.block + 1 : item.num_blocks;
  for (int kb = 0; kb < num_key_blocks; ++kb) {
    const int k0 = kb * C::kRows;
    const int k_rows = min(C::kRows, len - k0);
    __syncthreads();  // the last tile's readers of ks / vs / xs are done
    LoadTile<T, DMAX, RPT>(ks, static_cast<const T*>(args.k),
                           (static_cast<int64_t>(item.start) + k0) *
                                   qk_stride +
                               static_cast<int64_t>(h) * Dh,
                           k_rows, qk_stride, Dh);
    LoadTile<T, DMAX, RPT>(vs, static_cast<const T*>(args.v),
                           (static_cast<int64_t>(item.start) + k0) * v_stride +
                               static_cast<int64_t>(h) * Dv,
                           k_rows, v_stride, Dv);
    __syncthreads();
    float s[RPT][RPT], dp[RPT][RPT];
    TileDot<DMAX, RPT>(qs, ks, ty, tx, s);
    TileDot<DMAX, RPT>(dos, vs, ty, tx, dp);
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int row = q0 + ty * RPT + i;
#pragma unroll
      for (int j = 0; j < RPT; ++j) {
        const int key = k0 + tx + 16 * j;
        const bool seen =
            row < len && key < len && (!args.causal || key <= row);
        const float p =
            seen ? exp2f(fmaf(s[i][j], scale, -lse[i]) * gpu::kLog2e) : 0.0f;
        s[i][j] = p * (dp[i][j] - dsum[i]);  // dS
      }
    }
    StoreTransposed<DMAX, RPT>(xs, s, ty, tx);
    __syncthreads();
    TileAccumulate<DMAX, RPT>(xs, ks, ty, tx, acc);
  }
  float factor[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) factor[i] = args.scale;
  StoreRows<T, DMAX, RPT>(static_cast<T*>(args.dq), acc, factor,
                          first * qk_stride + static_cast<int64_t>(h) * Dh,
                          q_rows, qk_stride, Dh, ty, tx);
}

// Backward, step 3: dK and dV, one block per (key block, head), over the
// query blocks that see it. Here the tile rows are keys and the columns
// queries: sT = K Q^T, dpT = V dO^T.
template <typename T, int DMAX, int RPT>
__global__ void __launch_bounds__(kThreads, 1)
    BackwardDkvKernel(const KernelArgs args) {
  using C = Cfg<DMAX, RPT>;
  RaggedAttentionGpuItem item;
  if (!GetItem(args, &item)) return;
  const int h = blockIdx.y;
  const int ty = threadIdx.x / 16;
  const int tx = threadIdx.x % 16;
  const int H = args.num_heads, Dh = args.head_dim, Dv = args.value_dim;
  const int64_t qk_stride = static_cast<int64_t>(H) * Dh;
  const int64_t v_stride = static_cast<int64_t>(H) * Dv;
  const int len = item.length;
  const int key_block = item.num_blocks - 1 - item.block;
  const int k0 = key_block * C::kRows;
  const int k_rows = min(C::kRows, len - k0);
  const int64_t first_key = static_cast<int64_t>(item.start) + k0;

  float* ks = gpu::DynamicShared<float>();
  float* vs = ks + C::kTile;
  float* qs = vs + C::kTile;
  float* dos = qs + C::kTile;
  float* xs = dos + C::kTile;
  float* lses = xs + C::kXTile;
  float* dsums = lses + C::kRows;

  LoadTile<T, DMAX, RPT>(ks, static_cast<const T*>(args.k),
                         first_key * qk_stride + static_cast<int64_t>(h) * Dh,
                         k_rows, qk_stride, Dh);
  LoadTile<T, DMAX, RPT>(vs, static_cast<const T*>(args.v),
                         first_key * v_stride + static_cast<int64_t>(h) * Dv,
                         k_rows, v_stride, Dv);
  const float scale = args.scale;
  float dk[RPT][C::kOC], dv[RPT][C::kOC];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
#pragma unroll
    for (int cc = 0; cc < C::kOC; ++cc) {
      dk[i][cc] = 0.0f;
      dv[i][cc] = 0.0f;
    }
  }
  const int first_query_block = args.causal ? key_block : 0;
  for (int qb = first_query_block; qb < item.num_blocks; ++qb) {
    const int q0 = qb * C::kRows;
    const int q_rows = min(C::kRows, len - q0);
    const int64_t first_query = static_cast<int64_t>(item.start) + q0;
    __syncthreads();  // the last tile's readers of qs / dos / xs are done
    LoadTile<T, DMAX, RPT>(qs, static_cast<const T*>(args.q),
                           first_query * qk_stride +
                               static_cast<int64_t>(h) * Dh,
                           q_rows, qk_stride, Dh);
    LoadTile<T, DMAX, RPT>(dos, static_cast<const T*>(args.d_out),
                           first_query * v_stride +
                               static_cast<int64_t>(h) * Dv,
                           q_rows, v_stride, Dv);
    for (int r = threadIdx.x; r < C::kRows; r += kThreads) {
      lses[r] = r < q_rows ? args.lse[(first_query + r) * H + h] : 0.0f;
      dsums[r] = r < q_rows ? args.dsum[(first_query + r) * H + h] : 0.0f;
    }
    __syncthreads();
    float p[RPT][RPT], ds[RPT][RPT];
    TileDot<DMAX, RPT>(ks, qs, ty, tx, p);   // scores, transposed
    TileDot<DMAX, RPT>(vs, dos, ty, tx, ds);  // dP, transposed
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int key = k0 + ty * RPT + i;
#pragma unroll
      for (int j = 0; j < RPT; ++j) {
        const int col = tx + 16 * j;
        const int query = q0 + col;
        const bool seen =
            key < len && query < len && (!args.causal || key <= query);
        p[i][j] =
            seen ? exp2f(fmaf(p[i][j], scale, -lses[col]) * gpu::kLog2e) : 0.0f;
        ds[i][j] = p[i][j] * (ds[i][j] - dsums[col]);
      }
    }
    StoreTransposed<DMAX, RPT>(xs, p, ty, tx);  // xs[query][key] = P
    __syncthreads();
    TileAccumulate<DMAX, RPT>(xs, dos, ty, tx, dv);  // dV += P^T dO
    __syncthreads();
    StoreTransposed<DMAX, RPT>(xs, ds, ty, tx);  // xs[query][key] = dS
    __syncthreads();
    TileAccumulate<DMAX, RPT>(xs, qs, ty, tx, dk);  // dK += dS^T Q
  }
  float ones[RPT], scales[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    ones[i] = 1.0f;
    scales[i] = args.scale;
  }
  StoreRows<T, DMAX, RPT>(static_cast<T*>(args.dk), dk, scales,
                          first_key * qk_stride + static_cast<int64_t>(h) * Dh,
                          k_rows, qk_stride, Dh, ty, tx);
  StoreRows<T, DMAX, RPT>(static_cast<T*>(args.dv), dv, ones,
                          first_key * v_stride + static_cast<int64_t>(h) * Dv,
                          k_rows, v_stride, Dv, ty, tx);
}

// ---------------------------------------------------------------------------
// Device planner: validates row_splits and writes the work list (one block).
constexpr int kPlanThreads = 1024;

template <typename S>
__global__ void __launch_bounds__(kPlanThreads)
    PlanKernel(const S* __restrict__ row_splits, int64_t num_rows,
               int64_t num_tokens, int block_rows,
               RaggedAttentionGpuItem* __restrict__ items, int64_t max_items,
               int32_t* __restrict__ header) {
  __shared__ unsigned long long first_bad;
  __shared__ long long warp_totals[kPlanThreads / 32];
  __shared__ long long base;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  if (tid == 0) {
    first_bad = ~0ull;
    base = 0;
  }
  __syncthreads();
  for (int64_t p = tid; p <= num_rows; p += kPlanThreads) {
    const int64_t value = static_cast<int64_t>(row_splits[p]);
    bool bad = p == 0 ? value != 0
                      : value < static_cast<int64_t>(row_splits[p - 1]);
    if (p == num_rows && value != num_tokens) bad = true;
    if (bad) atomicMin(&first_bad, static_cast<unsigned long long>(p));
  }
  __syncthreads();
  if (first_bad != ~0ull) {
    if (tid == 0) {
      header[0] = 0;
      header[1] = static_cast<int32_t>(
          min(first_bad + 1, static_cast<unsigned long long>(INT32_MAX)));
    }
    return;
  }
  for (int64_t chunk = 0; chunk < num_rows; chunk += kPlanThreads) {
    const int64_t b = chunk + tid;
    int64_t start = 0, len = 0;
    if (b < num_rows) {
      start = static_cast<int64_t>(row_splits[b]);
      len = static_cast<int64_t>(row_splits[b + 1]) - start;
    }
    const long long blocks = (len + block_rows - 1) / block_rows;
    // Block-wide inclusive scan of `blocks`: in warps, then warp totals.
    long long inclusive = blocks;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const long long other = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      long long total = warp_totals[lane];
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const long long other = __shfl_up_sync(0xffffffffu, total, offset);
        if (lane >= offset) total += other;
      }
      warp_totals[lane] = total;  // inclusive over warps
    }
    __syncthreads();
    const long long offset =
        base + inclusive - blocks + (warp > 0 ? warp_totals[warp - 1] : 0);
    for (long long i = 0; i < blocks; ++i) {
      if (offset + i >= max_items) break;  // cannot happen for valid splits
      RaggedAttentionGpuItem item;
      item.start = static_cast<int32_t>(start);
      item.length = static_cast<int32_t>(len);
      item.block = static_cast<int32_t>(blocks - 1 - i);
      item.num_blocks = static_cast<int32_t>(blocks);
      items[offset + i] = item;
    }
    __syncthreads();  // every thread has read base and warp_totals
    if (tid == kPlanThreads - 1) base = offset + blocks;
    __syncthreads();
  }
  if (tid == 0) {
    header[0] = static_cast<int32_t>(min(base, static_cast<long long>(
                                                   max_items)));
    header[1] = 0;
  }
}

// ---------------------------------------------------------------------------
// Host side.

// The padded head width the kernels are specialised for: 32, 64 or 128.
int PaddedDim(int64_t head_dim, int64_t value_dim) {
  const int64_t d = std::max(head_dim, value_dim);
  return d <= 32 ? 32 : (d <= 64 ? 64 : 128);
}

size_t SharedBytes(int dmax, int block_rows) {
  if (block_rows == 64) {
    switch (dmax) {
      case 32: return Cfg<32, 4>::kMaxBytes;
      case 64: return Cfg<64, 4>::kMaxBytes;
      default: return Cfg<128, 4>::kMaxBytes;
    }
  }
  switch (dmax) {
    case 32: return Cfg<32, 2>::kMaxBytes;
    case 64: return Cfg<64, 2>::kMaxBytes;
    default: return Cfg<128, 2>::kMaxBytes;
  }
}

cudaError_t MaxSharedBytes(int device, size_t* bytes) {
  int value = 0;
  const cudaError_t err = gpu::DeviceAttribute(
      device, cudaDevAttrMaxSharedMemoryPerBlockOptin, &value);
  *bytes = static_cast<size_t>(value);
  return err;
}

bool DimsValid(const RaggedAttentionGpuDims& dims) {
  return dims.num_tokens >= 0 && dims.num_tokens <= INT32_MAX &&
         dims.num_heads >= 0 && dims.num_heads <= 65535 &&
         dims.head_dim >= 0 &&
         dims.head_dim <= kRaggedAttentionGpuMaxHeadDim &&
         dims.value_dim >= 0 &&
         dims.value_dim <= kRaggedAttentionGpuMaxHeadDim &&
         dims.num_tokens * dims.num_heads *
                 std::max<int64_t>(1, std::max(dims.head_dim,
                                               dims.value_dim)) <
             (int64_t{1} << 62);
}

template <typename Kernel>
cudaError_t LaunchTiled(Kernel kernel, size_t smem,
                        const RaggedAttentionGpuWork& work, int num_heads,
                        const KernelArgs& args, cudaStream_t stream) {
  const cudaError_t err = gpu::AllowDynamicShared(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned int>(work.num_items),
                  static_cast<unsigned int>(num_heads));
  TFREC_KERNEL_LAUNCH(kernel, grid, kThreads, smem, stream)(args);
  return cudaGetLastError();
}

template <typename T, int DMAX, int RPT>
cudaError_t ForwardFor(const RaggedAttentionGpuWork& work, int num_heads,
                       const KernelArgs& args, cudaStream_t stream) {
  return LaunchTiled(ForwardKernel<T, DMAX, RPT>,
                     sizeof(float) * Cfg<DMAX, RPT>::kForwardFloats, work,
                     num_heads, args, stream);
}

template <typename T, int DMAX, int RPT>
cudaError_t BackwardFor(const RaggedAttentionGpuWork& work, int num_heads,
                        const KernelArgs& args, cudaStream_t stream) {
  cudaError_t err = LaunchTiled(BackwardDqKernel<T, DMAX, RPT>,
                                sizeof(float) * Cfg<DMAX, RPT>::kDqFloats,
                                work, num_heads, args, stream);
  if (err != cudaSuccess) return err;
  return LaunchTiled(BackwardDkvKernel<T, DMAX, RPT>,
                     sizeof(float) * Cfg<DMAX, RPT>::kDkvFloats, work,
                     num_heads, args, stream);
}

// Calls fn.template operator()<T, DMAX, RPT>() for the dims' type, padded
// head width and the work list's block rows.
template <typename Fn>
cudaError_t Dispatch(const RaggedAttentionGpuDims& dims, int block_rows,
                     Fn&& fn) {
  const int dmax = PaddedDim(dims.head_dim, dims.value_dim);
  const int rpt = block_rows / 16;
  auto by_type = [&](auto type_tag) -> cudaError_t {
    using T = decltype(type_tag);
    if (rpt == 4) {
      if (dmax == 32) return fn.template operator()<T, 32, 4>();
      if (dmax == 64) return fn.template operator()<T, 64, 4>();
      return fn.template operator()<T, 128, 4>();
    }
    if (dmax == 32) return fn.template operator()<T, 32, 2>();
    if (dmax == 64) return fn.template operator()<T, 64, 2>();
    return fn.template operator()<T, 128, 2>();
  };
  switch (dims.type) {
    case RaggedAttentionGpuType::kFloat32: return by_type(float{});
    case RaggedAttentionGpuType::kFloat16: return by_type(__half{});
    case RaggedAttentionGpuType::kBFloat16: return by_type(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Checks shared by the forward and backward launchers.
cudaError_t CheckLaunch(const RaggedAttentionGpuDims& dims,
                        const RaggedAttentionGpuWork& work) {
  if (!DimsValid(dims)) return cudaErrorInvalidValue;
  if (work.block_rows != 64 && work.block_rows != 32) {
    return cudaErrorInvalidValue;
  }
  if (work.num_items < 0 || work.num_items > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  if (work.num_items > 0 && work.items == nullptr) {
    return cudaErrorInvalidValue;
  }
  size_t limit = 0;
  const cudaError_t err = MaxSharedBytes(dims.device, &limit);
  if (err != cudaSuccess) return err;
  if (SharedBytes(PaddedDim(dims.head_dim, dims.value_dim),
                  work.block_rows) > limit) {
    return cudaErrorInvalidConfiguration;
  }
  return cudaSuccess;
}

KernelArgs BaseArgs(const RaggedAttentionGpuDims& dims,
                    const RaggedAttentionGpuWork& work) {
  KernelArgs args{};
  args.items = work.items;
  args.count = work.count;
  args.num_heads = static_cast<int>(dims.num_heads);
  args.head_dim = static_cast<int>(dims.head_dim);
  args.value_dim = static_cast<int>(dims.value_dim);
  args.scale = dims.scale;
  args.causal = dims.causal;
  return args;
}

struct ForwardLauncher {
  const RaggedAttentionGpuWork& work;
  int num_heads;
  const KernelArgs& args;
  cudaStream_t stream;
  template <typename T, int DMAX, int RPT>
  cudaError_t operator()() const {
    return ForwardFor<T, DMAX, RPT>(work, num_heads, args, stream);
  }
};

struct BackwardLauncher {
  const RaggedAttentionGpuWork& work;
  int num_heads;
  const KernelArgs& args;
  int64_t rows;  // T * H
  int value_dim;
  cudaStream_t stream;
  template <typename T, int DMAX, int RPT>
  cudaError_t operator()() const {
    if (rows > 0) {
      const int64_t blocks = std::min<int64_t>(
          (rows + kThreads / 32 - 1) / (kThreads / 32), 65536);
      TFREC_KERNEL_LAUNCH(RowDotKernel<T>,
                          static_cast<unsigned int>(blocks), kThreads, 0,
                          stream)(
          static_cast<const T*>(args.d_out), static_cast<const T*>(args.out),
          rows, value_dim, const_cast<float*>(args.dsum));
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    if (work.num_items == 0) return cudaSuccess;
    return BackwardFor<T, DMAX, RPT>(work, num_heads, args, stream);
  }
};

}  // namespace

cudaError_t RaggedAttentionGpuBlockRows(int64_t head_dim, int64_t value_dim,
                                        int device, int* block_rows) {
  if (head_dim < 0 || head_dim > kRaggedAttentionGpuMaxHeadDim ||
      value_dim < 0 || value_dim > kRaggedAttentionGpuMaxHeadDim) {
    return cudaErrorInvalidValue;
  }
  size_t limit = 0;
  const cudaError_t err = MaxSharedBytes(device, &limit);
  if (err != cudaSuccess) return err;
  const int dmax = PaddedDim(head_dim, value_dim);
  if (SharedBytes(dmax, 64) <= limit) {
    *block_rows = 64;
  } else if (SharedBytes(dmax, 32) <= limit) {
    *block_rows = 32;
  } else {
    return cudaErrorInvalidConfiguration;
  }
  return cudaSuccess;
}

bool PlanRaggedAttentionGpu(const int64_t* row_splits, int64_t num_rows,
                            int64_t num_tokens, int block_rows, bool causal,
                            std::vector<RaggedAttentionGpuItem>* items) {
  items->clear();
  if (num_rows < 0 || num_tokens < 0 || num_tokens > INT32_MAX ||
      block_rows <= 0 || row_splits[0] != 0 ||
      row_splits[num_rows] != num_tokens) {
    return false;
  }
  int64_t count = 0;
  for (int64_t b = 0; b < num_rows; ++b) {
    const int64_t len = row_splits[b + 1] - row_splits[b];
    if (len < 0) return false;
    count += (len + block_rows - 1) / block_rows;
  }
  struct Entry {
    int64_t cost;
    RaggedAttentionGpuItem item;
  };
  std::vector<Entry> entries;
  entries.reserve(static_cast<size_t>(count));
  for (int64_t b = 0; b < num_rows; ++b) {
    const int64_t len = row_splits[b + 1] - row_splits[b];
    const int64_t blocks = (len + block_rows - 1) / block_rows;
    for (int64_t i = 0; i < blocks; ++i) {
      Entry e;
      // Key (query) blocks a block visits: the forward / dQ cost of query
      // block i, and the dK/dV cost of key block blocks - 1 - i.
      e.cost = causal ? i + 1 : blocks;
      e.item.start = static_cast<int32_t>(row_splits[b]);
      e.item.length = static_cast<int32_t>(len);
      e.item.block = static_cast<int32_t>(i);
      e.item.num_blocks = static_cast<int32_t>(blocks);
      entries.push_back(e);
    }
  }
  std::stable_sort(entries.begin(), entries.end(),
                   [](const Entry& a, const Entry& b) {
                     return a.cost > b.cost;
                   });
  items->reserve(entries.size());
  for (const Entry& e : entries) items->push_back(e.item);
  return true;
}

int64_t RaggedAttentionGpuMaxItems(int64_t num_rows, int64_t num_tokens,
                                   int block_rows) {
  if (num_rows <= 0 || num_tokens <= 0 || block_rows <= 0) return 0;
  return (num_tokens + num_rows * (block_rows - 1)) / block_rows;
}

cudaError_t LaunchPlanRaggedAttentionGpu(const void* row_splits_device,
                                         bool row_splits_int64,
                                         int64_t num_rows, int64_t num_tokens,
                                         int block_rows,
                                         RaggedAttentionGpuItem* items,
                                         int64_t max_items,
                                         int32_t* header_device, int device,
                                         cudaStream_t stream) {
  if (num_rows < 0 || num_tokens < 0 || num_tokens > INT32_MAX ||
      block_rows <= 0 || max_items < 0 || header_device == nullptr ||
      row_splits_device == nullptr || (max_items > 0 && items == nullptr)) {
    return cudaErrorInvalidValue;
  }
  gpu::DeviceScope scope(device);
  if (scope.status() != cudaSuccess) return scope.status();
  if (row_splits_int64) {
    TFREC_KERNEL_LAUNCH(PlanKernel<int64_t>, 1, kPlanThreads, 0, stream)(
        static_cast<const int64_t*>(row_splits_device), num_rows, num_tokens,
        block_rows, items, max_items, header_device);
  } else {
    TFREC_KERNEL_LAUNCH(PlanKernel<int32_t>, 1, kPlanThreads, 0, stream)(
        static_cast<const int32_t*>(row_splits_device), num_rows, num_tokens,
        block_rows, items, max_items, header_device);
  }
  return cudaGetLastError();
}

cudaError_t RaggedAttentionGpuForward(const RaggedAttentionGpuDims& dims,
                                      const RaggedAttentionGpuWork& work,
                                      const void* q, const void* k,
                                      const void* v, void* out, float* lse,
                                      cudaStream_t stream) {
  gpu::DeviceScope scope(dims.device);
  if (scope.status() != cudaSuccess) return scope.status();
  cudaError_t err = CheckLaunch(dims, work);
  if (err != cudaSuccess) return err;
  if (dims.num_tokens == 0 || dims.num_heads == 0 || work.num_items == 0) {
    return cudaSuccess;
  }
  KernelArgs args = BaseArgs(dims, work);
  args.q = q;
  args.k = k;
  args.v = v;
  args.o = out;
  args.lse_out = lse;
  return Dispatch(dims, work.block_rows,
                  ForwardLauncher{work, static_cast<int>(dims.num_heads),
                                  args, stream});
}

size_t RaggedAttentionGpuBackwardWorkspaceBytes(
    const RaggedAttentionGpuDims& dims) {
  const size_t tokens =
      static_cast<size_t>(std::max<int64_t>(0, dims.num_tokens));
  const size_t heads =
      static_cast<size_t>(std::max<int64_t>(0, dims.num_heads));
  const size_t bytes = sizeof(float) * tokens * heads;
  return (bytes + 255) / 256 * 256;
}

cudaError_t RaggedAttentionGpuBackward(const RaggedAttentionGpuDims& dims,
                                       const RaggedAttentionGpuWork& work,
                                       const void* q, const void* k,
                                       const void* v, const void* out,
                                       const float* lse, const void* d_out,
                                       void* dq, void* dk, void* dv,
                                       void* workspace, cudaStream_t stream) {
  gpu::DeviceScope scope(dims.device);
  if (scope.status() != cudaSuccess) return scope.status();
  cudaError_t err = CheckLaunch(dims, work);
  if (err != cudaSuccess) return err;
  if (dims.num_tokens == 0 || dims.num_heads == 0) return cudaSuccess;
  if (workspace == nullptr) return cudaErrorInvalidValue;
  KernelArgs args = BaseArgs(dims, work);
  args.q = q;
  args.k = k;
  args.v = v;
  args.out = out;
  args.d_out = d_out;
  args.lse = lse;
  args.dsum = static_cast<const float*>(workspace);
  args.dq = dq;
  args.dk = dk;
  args.dv = dv;
  return Dispatch(
      dims, work.block_rows,
      BackwardLauncher{work, static_cast<int>(dims.num_heads), args,
                       dims.num_tokens * dims.num_heads,
                       static_cast<int>(dims.value_dim), stream});
}

}  // namespace kernels
}  // namespace tfrec_fast
