// CUDA kernels of the fused softmax cross-entropy tile engine (full-catalog
// CutCrossEntropy, and CCEMinus with shared negatives); see
// cut_cross_entropy_gpu.h for the meaning, the kernels' roles and the API.
//
// Tiles. A thread block (256 threads, 8 warps) owns a 64-row x 64-column
// tile of the score matrix at a time. Operand tiles are 64 rows of h and 64
// (gathered) rows of w, each DCH columns of D wide (DCH = 64, 128 or 256:
// the padded D, capped at 256; a larger D runs in DCH-wide chunks that are
// summed into the same scores), stored in shared memory in the input type
// with a 16-byte row pad (conflict-free wmma / float4 reads), zero filled
// past N, past the columns and past D. Loads from global memory are 16-byte
// vectors when D and the base pointers allow, else coalesced scalars.
//
// Scores. Tensor cores (T = half / bfloat16, sm_80+): warp w computes the
// 16 x 32 block (rows 16 (w % 4), columns 32 (w / 4)) of S = H W^T as two
// wmma 16x16x16 accumulators (float32). SIMT (float32, or kSimt): thread
// (ty, tx) of a 16 x 16 grid computes rows 4 ty + i and columns tx + 16 j
// (i, j < 4) with float32 FMAs in d order. Either way S lands in a float32
// [64][68] shared tile, and one elementwise stage serves every backend:
// thread t takes row t / 4 and columns 4 j + t % 4 (conflict-free reads;
// a row's 4 owners are adjacent lanes, so row max / sum are 2 shuffles).
// The scores are computed by the same code in the same order in every
// kernel, so the backward's recomputed S are bitwise the forward's.
//
// Products for the gradients. dH (rows x D chunk) += P (rows x cols) W and
// dW (cols x D chunk) += ds^T (cols x rows) H. Tensor cores: P / ds are
// rounded to the input type into a [64][72] tile (wmma's matrix_a, read
// col-major for the transpose), each warp owning a 16 x DCH/2 block of the
// accumulator (DCH/32 fragments). SIMT: P / ds stay float32 in the S tile,
// each thread owns 4 rows x DCH/16 columns in registers. For dW, ds is
// taken as g_t / 2^e (p - onehot), 2^e the power of two of max |g| (a tiny
// kernel computes it on the device), so that float16 holds it without
// underflow when g is small (a mean over many rows); the final multiply by
// 2^e is exact. For dH, g_t multiplies the row's sum at the end.
//
// Exponentials are exp2f((x - ref) * log2(e)) with the difference taken
// first (as in ragged_attention.cu.cc): huge logits lose no more digits
// than a plain float32 softmax. NaN logits propagate into the running sums
// (fmaxf skips them in the max, the exp does not), so NaN inputs give NaN
// losses.
#include "custom_ops/kernels/cut_cross_entropy_gpu.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#ifndef TFREC_EMULATED_WMMA
#include <mma.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

// Kernel launches (TFREC_KERNEL_LAUNCH) and dynamic shared memory go through
// gpu_kernel_helpers.cu.h so that the harness's CPU emulation
// (custom_ops/harness/emulation/) can run this very file on the CPU.
#include "custom_ops/kernels/gpu_kernel_helpers.cu.h"

// Tensor-core kernels exist for sm_80+ only (bfloat16 wmma); compiled for
// an older architecture their bodies are empty and the host never picks
// them there.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define TFREC_CCE_HAS_WMMA 1
#else
#define TFREC_CCE_HAS_WMMA 0
#endif

namespace tfrec_fast {
namespace kernels {
namespace {
namespace cce_gpu {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 64;
constexpr int kTileCols = 64;
constexpr int kSLd = kTileCols + 4;  // row stride (floats) of the S tile
constexpr int kPLd = kTileCols + 8;  // row stride (elements) of the P tile
// Column-info markers (never equal to a valid target, nor to -1, the marker
// of an invalid target).
constexpr int64_t kPaddingColumn = -3;  // past num_cols: probability 0
constexpr int64_t kBadColumn = -2;      // id outside [0, C): NaN logit

constexpr size_t Align128(size_t x) { return (x + 127) / 128 * 128; }

// Shared-memory layout of the tile kernels (byte offsets).
template <typename T, int DCH, bool kWmma>
struct Cfg {
  static constexpr int kLd = DCH + static_cast<int>(16 / sizeof(T));
  static constexpr size_t kHOff = 0;
  static constexpr size_t kWOff =
      kHOff + Align128(sizeof(T) * kTileRows * kLd);
  static constexpr size_t kSOff =
      kWOff + Align128(sizeof(T) * kTileCols * kLd);
  static constexpr size_t kPOff =
      kSOff + Align128(sizeof(float) * kTileRows * kSLd);
  static constexpr size_t kInfoOff =
      kPOff + (kWmma ? Align128(sizeof(T) * kTileRows * kPLd) : 0);
  // col item (int64), row target (int64), col offset, row lse, row coef.
  static constexpr size_t kBytes =
      kInfoOff + Align128(8 * kTileCols + 8 * kTileRows + 4 * kTileCols +
                          8 * kTileRows);
  static_assert(kLd % 8 == 0 || sizeof(T) == 4, "wmma ldm");
};

template <typename T>
__device__ __forceinline__ T Zero() {
  return gpu::FromFloat<T>(0.0f);
}

// 4 consecutive elements of shared memory as float32 (aligned to 4
// elements).
__device__ __forceinline__ void Load4(const float* p, float* x) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x;
  x[1] = v.y;
  x[2] = v.z;
  x[3] = v.w;
}
template <typename T>
__device__ __forceinline__ void Load4(const T* p, float* x) {
#pragma unroll
  for (int i = 0; i < 4; ++i) x[i] = gpu::ToFloat(p[i]);
}

__device__ __forceinline__ float QuadMax(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float QuadSum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float FinishLse(float m, float l) {
  if (l > 0.0f) return m + logf(l);
  return l == 0.0f ? -INFINITY : l;  // l NaN: NaN
}

__device__ __forceinline__ float LogAddExp(float a, float b) {
  if (a != a || b != b) return a + b;  // NaN
  const float mm = fmaxf(a, b);
  if (mm == -INFINITY || mm == INFINITY) return mm;
  return mm + log1pf(expf(fminf(a, b) - mm));
}

struct TileArgs {
  const void* h;
  const void* w;
  const float* bias;
  const void* targets;
  const void* col_ids;
  const float* col_log_kq;
  int64_t n;         // rows
  int64_t c_items;   // table rows
  int64_t num_cols;  // softmax columns
  int64_t d;
  int64_t num_tiles;        // tiles along the dimension a block loops over
  int64_t tiles_per_split;  // of them per split (blockIdx.y)
  int targets64;
  int col_ids64;
  int positive_apart;
  int remove_hits;
  int dchunks;    // ceil(D / DCH), >= 1
  int vec_ok;     // 16-byte vector loads of h and w are aligned
  // Forward.
  float* part_m;        // [splits, N]
  float* part_l;        // [splits, N]
  float* target_logit;  // [N] (CCE)
  // Backward.
  const float* lse;     // [N]
  const float* g;       // [N]
  const float* gscale;  // device [2]: 2^e, 2^-e
  float* dh_part;       // [splits, N, D]
  float* dw_part;       // [splits, num_cols, D] or nullptr (direct)
  void* dw_out;         // [num_cols (+ N), D] in T
  float* db_part;       // [splits, num_cols] or nullptr
  float* db_out;        // [num_cols (+ N)] or nullptr (no bias gradient)
};

// ---------------------------------------------------------------------------
// Tile loads.

// dst[r][0, DCH) (stride kLd) = src row id(r), columns [d0, d0 + DCH) as T,
// zero past D and for rows with id < 0.
template <typename T, int DCH, typename RowId>
__device__ __forceinline__ void LoadTile(T* __restrict__ dst,
                                         const T* __restrict__ src,
                                         int64_t d, int64_t d0, bool vec_ok,
                                         RowId row_id) {
  constexpr int kLd = DCH + static_cast<int>(16 / sizeof(T));
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  constexpr int kVecPerRow = DCH / kVec;
  if (vec_ok) {
    constexpr int kIters = kTileRows * kVecPerRow / kThreads;
    static_assert(kIters * kThreads == kTileRows * kVecPerRow, "vector split");
#pragma unroll 4
    for (int i = 0; i < kIters; ++i) {
      const int v = static_cast<int>(threadIdx.x) + i * kThreads;
      const int r = v / kVecPerRow;
      const int col = (v % kVecPerRow) * kVec;
      const int64_t row = row_id(r);
      uint4 value = make_uint4(0u, 0u, 0u, 0u);
      if (row >= 0 && d0 + col < d) {
        value = *reinterpret_cast<const uint4*>(src + row * d + d0 + col);
      }
      *reinterpret_cast<uint4*>(dst + r * kLd + col) = value;
    }
  } else {
    constexpr int kIters = kTileRows * DCH / kThreads;
#pragma unroll 4
    for (int i = 0; i < kIters; ++i) {
      const int e = static_cast<int>(threadIdx.x) + i * kThreads;
      const int r = e / DCH;
      const int col = e % DCH;
      const int64_t row = row_id(r);
      dst[r * kLd + col] = (row >= 0 && d0 + col < d)
                               ? src[row * d + d0 + col]
                               : Zero<T>();
    }
  }
}

// Rows [row0, row0 + 64) of h; with `row_coef`, rows whose coefficient is
// 0 (d_loss == 0) read as zeros, so a NaN there cannot reach dW.
template <typename T, int DCH>
__device__ __forceinline__ void LoadRowTile(T* dst, const TileArgs& a,
                                            int64_t row0, int64_t d0,
                                            const float* row_coef = nullptr) {
  const int64_t n = a.n;
  LoadTile<T, DCH>(dst, static_cast<const T*>(a.h), a.d, d0, a.vec_ok != 0,
                   [row0, n, row_coef](int r) -> int64_t {
                     if (row0 + r >= n) return -1;
                     if (row_coef != nullptr && row_coef[r] == 0.0f) {
                       return -1;
                     }
                     return row0 + r;
                   });
}

template <typename T, int DCH>
__device__ __forceinline__ void LoadItemTile(T* dst, const TileArgs& a,
                                             const int64_t* col_item,
                                             int64_t d0) {
  LoadTile<T, DCH>(dst, static_cast<const T*>(a.w), a.d, d0, a.vec_ok != 0,
                   [col_item](int r) -> int64_t { return col_item[r]; });
}

// Threads 0..63: item (or marker) and additive offset of columns
// [col0, col0 + 64).
__device__ __forceinline__ void LoadColumnInfo(const TileArgs& a,
                                               int64_t col0, int64_t* item,
                                               float* off) {
  const int c = static_cast<int>(threadIdx.x);
  if (c >= kTileCols) return;
  const int64_t j = col0 + c;
  int64_t it = kPaddingColumn;
  float o = -INFINITY;
  if (j < a.num_cols) {
    it = a.col_ids != nullptr ? gpu::ReadId(a.col_ids, a.col_ids64, j) : j;
    if (it >= 0 && it < a.c_items) {
      o = (a.bias != nullptr ? a.bias[it] : 0.0f) -
          (a.col_log_kq != nullptr ? a.col_log_kq[j] : 0.0f);
    } else {
      it = kBadColumn;
      o = NAN;
    }
  }
  item[c] = it;
  off[c] = o;
}

// Threads 0..63: target of rows [row0, row0 + 64) (-1: past N or invalid).
__device__ __forceinline__ int64_t RowTarget(const TileArgs& a, int64_t row) {
  if (row >= a.n) return -1;
  const int64_t y = gpu::ReadId(a.targets, a.targets64, row);
  return (y >= 0 && y < a.c_items) ? y : -1;
}

// ---------------------------------------------------------------------------
// Score tile S = H W^T (64 x 64), per backend.

template <typename T, int DCH, bool kWmma>
struct Scores;

// SIMT: thread (ty, tx) holds rows 4 ty + i, columns tx + 16 j.
template <typename T, int DCH>
struct Scores<T, DCH, false> {
  static constexpr int kLd = Cfg<T, DCH, false>::kLd;
  float acc[4][4];

  __device__ __forceinline__ void Zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    }
  }

  // klen: multiple of 4, <= DCH (columns past D are zero).
  __device__ __forceinline__ void Accumulate(const T* __restrict__ hs,
                                             const T* __restrict__ ws,
                                             int klen) {
    const int ty = static_cast<int>(threadIdx.x) / 16;
    const int tx = static_cast<int>(threadIdx.x) % 16;
#pragma unroll 2
    for (int k = 0; k < klen; k += 4) {
      float av[4][4];
      float bv[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) Load4(hs + (ty * 4 + i) * kLd + k, av[i]);
#pragma unroll
      for (int j = 0; j < 4; ++j) Load4(ws + (tx + 16 * j) * kLd + k, bv[j]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc[i][j] = fmaf(av[i][e], bv[j][e], acc[i][j]);
          }
        }
      }
    }
  }

  __device__ __forceinline__ void Store(float* s) const {
    const int ty = static_cast<int>(threadIdx.x) / 16;
    const int tx = static_cast<int>(threadIdx.x) % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[(ty * 4 + i) * kSLd + tx + 16 * j] = acc[i][j];
      }
    }
  }

  static constexpr int kKStep = 4;
};

#if TFREC_CCE_HAS_WMMA
// Tensor cores: warp w holds rows 16 (w % 4) .. +16, columns 32 (w / 4) ..
// +32 as two 16 x 16 float32 accumulators.
template <typename T, int DCH>
struct Scores<T, DCH, true> {
  static constexpr int kLd = Cfg<T, DCH, true>::kLd;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];

  __device__ __forceinline__ void Zero() {
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
  }

  __device__ __forceinline__ void Accumulate(const T* __restrict__ hs,
                                             const T* __restrict__ ws,
                                             int klen) {
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int r0 = (warp & 3) * 16;
    const int c0 = (warp >> 2) * 32;
    for (int k = 0; k < klen; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, hs + r0 * kLd + k, kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, ws + (c0 + 16 * j) * kLd + k, kLd);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
  }

  __device__ __forceinline__ void Store(float* s) const {
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int r0 = (warp & 3) * 16;
    const int c0 = (warp >> 2) * 32;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(s + r0 * kSLd + c0 + 16 * j, acc[j], kSLd,
                              wmma::mem_row_major);
    }
  }

  static constexpr int kKStep = 16;
};
#endif

// S (float32, shared [64][kSLd]) for rows [row0, +64) x the columns whose
// items are in col_item, over every D chunk. On entry every thread is done
// with hs / ws / s (the caller synchronised); on exit s holds the scores,
// hs / ws the last chunk, and the block is synchronised. `h_resident` /
// `w_resident`: hs / ws already hold chunk 0 (only when dchunks == 1).
template <typename T, int DCH, bool kWmma>
__device__ __forceinline__ void ComputeScores(
    const TileArgs& a, T* hs, T* ws, float* s, int64_t row0,
    const int64_t* col_item, bool h_resident, bool w_resident,
    const float* row_coef = nullptr) {
  using Sc = Scores<T, DCH, kWmma>;
  Sc sc;
  sc.Zero();
  for (int ch = 0; ch < a.dchunks; ++ch) {
    const int64_t d0 = static_cast<int64_t>(ch) * DCH;
    if (ch > 0) __syncthreads();  // the previous chunk's readers are done
    if (!h_resident) LoadRowTile<T, DCH>(hs, a, row0, d0, row_coef);
    if (!w_resident) LoadItemTile<T, DCH>(ws, a, col_item, d0);
    __syncthreads();
    const int64_t rest = a.d - d0;
    const int klen = static_cast<int>(
        std::min<int64_t>(DCH, (rest + Sc::kKStep - 1) / Sc::kKStep *
                                   Sc::kKStep));
    sc.Accumulate(hs, ws, klen);
  }
  sc.Store(s);
  __syncthreads();
}

// ---------------------------------------------------------------------------
// Gradient products, per backend. Out (64 x DCH) += A (64 x 64) B (64 x
// DCH), A = P (kTransA = false: P[out row][k]) or ds^T (kTransA = true:
// P[k][out row]), B an operand tile (row k, columns of the chunk).

template <typename T, int DCH, bool kWmma, bool kTransA>
struct Product;

template <typename T, int DCH, bool kTransA>
struct Product<T, DCH, false, kTransA> {
  static constexpr int kLd = Cfg<T, DCH, false>::kLd;
  static constexpr int kOC = DCH / 16;  // columns per thread
  static constexpr int kChunks = kOC / 4;
  float acc[4][kOC];

  __device__ __forceinline__ void Zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int c = 0; c < kOC; ++c) acc[i][c] = 0.0f;
    }
  }

  // p: float32 [64][kSLd] (the S tile).
  __device__ __forceinline__ void Accumulate(const float* __restrict__ p,
                                             const void* /*unused*/,
                                             const T* __restrict__ b,
                                             int dlen) {
    const int ty = static_cast<int>(threadIdx.x) / 16;
    const int tx = static_cast<int>(threadIdx.x) % 16;
    (void)dlen;
#pragma unroll 2
    for (int k = 0; k < kTileCols; ++k) {
      float xv[4];
      if (kTransA) {
        Load4(p + k * kSLd + ty * 4, xv);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[i] = p[(ty * 4 + i) * kSLd + k];
      }
#pragma unroll
      for (int cc = 0; cc < kChunks; ++cc) {
        float bv[4];
        Load4(b + k * kLd + cc * 64 + tx * 4, bv);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            acc[i][cc * 4 + w] = fmaf(xv[i], bv[w], acc[i][cc * 4 + w]);
          }
        }
      }
    }
  }

  // emit(out row, column in chunk, value) for every accumulator element.
  template <typename Emit>
  __device__ __forceinline__ void Store(float* /*stage*/, Emit emit) const {
    const int ty = static_cast<int>(threadIdx.x) / 16;
    const int tx = static_cast<int>(threadIdx.x) % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int cc = 0; cc < kChunks; ++cc) {
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          emit(ty * 4 + i, cc * 64 + tx * 4 + w, acc[i][cc * 4 + w]);
        }
      }
    }
  }
};

#if TFREC_CCE_HAS_WMMA
template <typename T, int DCH, bool kTransA>
struct Product<T, DCH, true, kTransA> {
  static constexpr int kLd = Cfg<T, DCH, true>::kLd;
  static constexpr int kFrags = DCH / 32;  // per warp
  using ALayout = typename std::conditional<kTransA, wmma::col_major,
                                            wmma::row_major>::type;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFrags];

  __device__ __forceinline__ void Zero() {
#pragma unroll
    for (int f = 0; f < kFrags; ++f) wmma::fill_fragment(acc[f], 0.0f);
  }

  // pt: T [64][kPLd] (P or ds rounded to T).
  __device__ __forceinline__ void Accumulate(const float* /*unused*/,
                                             const T* __restrict__ pt,
                                             const T* __restrict__ b,
                                             int dlen) {
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int r0 = (warp & 3) * 16;
    const int c0 = (warp >> 2) * (DCH / 2);
#pragma unroll
    for (int k = 0; k < kTileCols; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a;
      if (kTransA) {
        wmma::load_matrix_sync(a, pt + k * kPLd + r0, kPLd);
      } else {
        wmma::load_matrix_sync(a, pt + r0 * kPLd + k, kPLd);
      }
#pragma unroll
      for (int f = 0; f < kFrags; ++f) {
        if (c0 + 16 * f >= dlen) break;  // columns past D: zero
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, b + k * kLd + c0 + 16 * f, kLd);
        wmma::mma_sync(acc[f], a, bf, acc[f]);
      }
    }
  }

  // Through a per-warp 16 x 16 float32 stage (256 floats at stage + 256 w).
  template <typename Emit>
  __device__ __forceinline__ void Store(float* stage, Emit emit) const {
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int lane = static_cast<int>(threadIdx.x) % 32;
    const int r0 = (warp & 3) * 16;
    const int c0 = (warp >> 2) * (DCH / 2);
    float* mine = stage + 256 * warp;
#pragma unroll
    for (int f = 0; f < kFrags; ++f) {
      wmma::store_matrix_sync(mine, acc[f], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int e = lane + 32 * i;
        emit(r0 + e / 16, c0 + 16 * f + e % 16, mine[e]);
      }
      __syncwarp();
    }
  }
};
#endif

// Pointers into a tile kernel's shared memory.
template <typename T, int DCH, bool kWmma>
struct Smem {
  using C = Cfg<T, DCH, kWmma>;
  T* hs;
  T* ws;
  float* s;
  T* pt;
  int64_t* col_item;
  int64_t* row_y;
  float* col_off;
  float* row_lse;
  float* row_coef;

  __device__ __forceinline__ Smem() {
    unsigned char* base = gpu::DynamicShared<unsigned char>();
    hs = reinterpret_cast<T*>(base + C::kHOff);
    ws = reinterpret_cast<T*>(base + C::kWOff);
    s = reinterpret_cast<float*>(base + C::kSOff);
    pt = reinterpret_cast<T*>(base + C::kPOff);
    col_item = reinterpret_cast<int64_t*>(base + C::kInfoOff);
    row_y = col_item + kTileCols;
    col_off = reinterpret_cast<float*>(row_y + kTileRows);
    row_lse = col_off + kTileCols;
    row_coef = row_lse + kTileRows;
  }
};

// ---------------------------------------------------------------------------
// Forward: grid (row tiles, splits). Partial (max, sum) per (split, row).
// (Kernel bodies are device functions; the __global__ wrappers follow DwBody.)
template <typename T, int DCH, bool kWmma>
__device__ __forceinline__ void ForwardBody(const TileArgs& a) {
  Smem<T, DCH, kWmma> sm;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int split = static_cast<int>(blockIdx.y);
  const int64_t t_begin = split * a.tiles_per_split;
  const int64_t t_end = std::min(a.num_tiles, t_begin + a.tiles_per_split);
  if (tid < kTileRows) sm.row_y[tid] = RowTarget(a, row0 + tid);
  const bool h_resident = a.dchunks == 1;
  if (h_resident) LoadRowTile<T, DCH>(sm.hs, a, row0, 0);
  const int r = tid >> 2;
  const int q = tid & 3;
  const int64_t row = row0 + r;
  float m = -INFINITY;
  float l = 0.0f;
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    __syncthreads();  // the previous tile's readers are done
    LoadColumnInfo(a, tile * kTileCols, sm.col_item, sm.col_off);
    __syncthreads();
    ComputeScores<T, DCH, kWmma>(a, sm.hs, sm.ws, sm.s, row0, sm.col_item,
                                 h_resident, false);
    const int64_t y = sm.row_y[r];
    float v[16];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int c = 4 * j + q;
      const int64_t item = sm.col_item[c];
      const float sv = sm.s[r * kSLd + c] + sm.col_off[c];
      bool live = item != kPaddingColumn;
      if (item == y) {  // y >= 0 here, so the column is a real item
        if (a.positive_apart) {
          live = live && !a.remove_hits;
        } else {
          a.target_logit[row] = sv;
        }
      }
      v[j] = live ? sv : -INFINITY;
      tile_max = fmaxf(tile_max, v[j]);
    }
    tile_max = QuadMax(tile_max);
    const float m_new = fmaxf(m, tile_max);
    const float ref = m_new == -INFINITY ? 0.0f : m_new;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; ++j) sum += exp2f((v[j] - ref) * gpu::kLog2e);
    l = l * exp2f((m - ref) * gpu::kLog2e) + sum;
    m = m_new;
  }
  l = QuadSum(l);
  if (q == 0 && row < a.n) {
    a.part_m[split * a.n + row] = m;
    a.part_l[split * a.n + row] = l;
  }
}

// p (or ds) of one S element in the backward. `lse`: the row's; `y`: its
// target (-1: none).
__device__ __forceinline__ float Probability(const TileArgs& a, float sv,
                                             int64_t item, int64_t y,
                                             float lse) {
  if (item == kPaddingColumn) return 0.0f;
  if (item == y && a.positive_apart && a.remove_hits) return 0.0f;
  float p = exp2f((sv - lse) * gpu::kLog2e);
  if (item == y && !a.positive_apart) p -= 1.0f;
  return p;
}

// dH: grid (row tiles, splits over column tiles, D chunks).
// dh_part[split][row][d] = sum over the split's columns of P W (no g).
template <typename T, int DCH, bool kWmma>
__device__ __forceinline__ void DhBody(const TileArgs& a) {
  Smem<T, DCH, kWmma> sm;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int split = static_cast<int>(blockIdx.y);
  const int z = static_cast<int>(blockIdx.z);
  const int64_t dz = static_cast<int64_t>(z) * DCH;
  const int dlen = static_cast<int>(std::min<int64_t>(DCH, a.d - dz));
  const int64_t t_begin = split * a.tiles_per_split;
  const int64_t t_end = std::min(a.num_tiles, t_begin + a.tiles_per_split);
  if (tid < kTileRows) {
    const int64_t row = row0 + tid;
    sm.row_y[tid] = RowTarget(a, row);
    sm.row_lse[tid] = row < a.n ? a.lse[row] : INFINITY;
  }
  const bool h_resident = a.dchunks == 1;
  if (h_resident) LoadRowTile<T, DCH>(sm.hs, a, row0, 0);
  const int r = tid >> 2;
  const int q = tid & 3;
  Product<T, DCH, kWmma, false> prod;
  prod.Zero();
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    __syncthreads();
    LoadColumnInfo(a, tile * kTileCols, sm.col_item, sm.col_off);
    __syncthreads();
    ComputeScores<T, DCH, kWmma>(a, sm.hs, sm.ws, sm.s, row0, sm.col_item,
                                 h_resident, false);
    const int64_t y = sm.row_y[r];
    const float lse = sm.row_lse[r];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int c = 4 * j + q;
      const float p = Probability(a, sm.s[r * kSLd + c] + sm.col_off[c],
                                  sm.col_item[c], y, lse);
      if (kWmma) {
        sm.pt[r * kPLd + c] = gpu::FromFloat<T>(p);
      } else {
        sm.s[r * kSLd + c] = p;
      }
    }
    // W of this block's D chunk (ws holds the last chunk after the scores).
    if (a.dchunks > 1 && z != a.dchunks - 1) {
      LoadItemTile<T, DCH>(sm.ws, a, sm.col_item, dz);
    }
    __syncthreads();
    prod.Accumulate(sm.s, sm.pt, sm.ws, dlen);
  }
  __syncthreads();  // the S tile becomes the wmma output stage
  const int64_t n = a.n;
  const int64_t d = a.d;
  float* out = a.dh_part + static_cast<int64_t>(split) * n * d;
  prod.Store(sm.s, [&](int rr, int cc, float value) {
    const int64_t row = row0 + rr;
    if (row < n && cc < dlen) out[row * d + dz + cc] = value;
  });
}

// dW: grid (column tiles, splits over row tiles, D chunks).
template <typename T, int DCH, bool kWmma>
__device__ __forceinline__ void DwBody(const TileArgs& a) {
  Smem<T, DCH, kWmma> sm;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int split = static_cast<int>(blockIdx.y);
  const int z = static_cast<int>(blockIdx.z);
  const int64_t dz = static_cast<int64_t>(z) * DCH;
  const int dlen = static_cast<int>(std::min<int64_t>(DCH, a.d - dz));
  const int64_t t_begin = split * a.tiles_per_split;
  const int64_t t_end = std::min(a.num_tiles, t_begin + a.tiles_per_split);
  const float inv_scale = a.gscale[1];
  LoadColumnInfo(a, col0, sm.col_item, sm.col_off);
  __syncthreads();
  const bool w_resident = a.dchunks == 1;
  if (w_resident) LoadItemTile<T, DCH>(sm.ws, a, sm.col_item, 0);
  const int r = tid >> 2;
  const int q = tid & 3;
  float db = 0.0f;
  Product<T, DCH, kWmma, true> prod;
  prod.Zero();
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    const int64_t row0 = tile * kTileRows;
    __syncthreads();
    if (tid < kTileRows) {
      const int64_t row = row0 + tid;
      sm.row_y[tid] = RowTarget(a, row);
      const float g = row < a.n ? a.g[row] : 0.0f;
      sm.row_lse[tid] = row < a.n ? a.lse[row] : INFINITY;
      sm.row_coef[tid] = g * inv_scale;
    }
    __syncthreads();
    ComputeScores<T, DCH, kWmma>(a, sm.hs, sm.ws, sm.s, row0, sm.col_item,
                                 false, w_resident, sm.row_coef);
    const int64_t y = sm.row_y[r];
    const float lse = sm.row_lse[r];
    const float coef = sm.row_coef[r];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int c = 4 * j + q;
      const float p = Probability(a, sm.s[r * kSLd + c] + sm.col_off[c],
                                  sm.col_item[c], y, lse);
      // g == 0: exactly 0, even for a NaN p.
      const float ds = coef == 0.0f ? 0.0f : coef * p;
      sm.s[r * kSLd + c] = ds;
      if (kWmma) sm.pt[r * kPLd + c] = gpu::FromFloat<T>(ds);
    }
    if (a.dchunks > 1 && z != a.dchunks - 1) {
      LoadRowTile<T, DCH>(sm.hs, a, row0, dz, sm.row_coef);
    }
    __syncthreads();
    if (z == 0 && tid < kTileCols) {
      float col_sum = 0.0f;
      for (int rr = 0; rr < kTileRows; ++rr) {
        col_sum += sm.s[rr * kSLd + tid];
      }
      db += col_sum;
    }
    prod.Accumulate(sm.s, sm.pt, sm.hs, dlen);
  }
  __syncthreads();  // the S tile becomes the wmma output stage
  const int64_t num_cols = a.num_cols;
  const int64_t d = a.d;
  const float scale = a.gscale[0];
  if (a.dw_part == nullptr) {
    T* out = static_cast<T*>(a.dw_out);
    prod.Store(sm.s, [&](int cr, int cc, float value) {
      const int64_t col = col0 + cr;
      if (col < num_cols && cc < dlen) {
        out[col * d + dz + cc] = gpu::FromFloat<T>(value * scale);
      }
    });
    if (z == 0 && tid < kTileCols && col0 + tid < num_cols &&
        a.db_out != nullptr) {
      a.db_out[col0 + tid] = db * scale;
    }
  } else {
    float* out = a.dw_part + static_cast<int64_t>(split) * num_cols * d;
    prod.Store(sm.s, [&](int cr, int cc, float value) {
      const int64_t col = col0 + cr;
      if (col < num_cols && cc < dlen) out[col * d + dz + cc] = value;
    });
    if (z == 0 && tid < kTileCols && col0 + tid < num_cols &&
        a.db_part != nullptr) {
      a.db_part[split * num_cols + col0 + tid] = db;
    }
  }
}

// The kernels; tensor-core instantiations compiled for an architecture
// without them are empty (the host never launches them there).
template <typename T, int DCH, bool kWmma>
__global__ void __launch_bounds__(kThreads) ForwardKernel(const TileArgs a) {
  if constexpr (!kWmma || TFREC_CCE_HAS_WMMA) ForwardBody<T, DCH, kWmma>(a);
}
template <typename T, int DCH, bool kWmma>
__global__ void __launch_bounds__(kThreads) DhKernel(const TileArgs a) {
  if constexpr (!kWmma || TFREC_CCE_HAS_WMMA) DhBody<T, DCH, kWmma>(a);
}
template <typename T, int DCH, bool kWmma>
__global__ void __launch_bounds__(kThreads) DwKernel(const TileArgs a) {
  if constexpr (!kWmma || TFREC_CCE_HAS_WMMA) DwBody<T, DCH, kWmma>(a);
}

// ---------------------------------------------------------------------------
// Row kernels: one warp per row, 8 rows per block.

struct RowArgs {
  const void* h;
  const void* w;
  const float* bias;
  const void* targets;
  int64_t n;
  int64_t c_items;
  int64_t num_cols;
  int64_t d;
  int targets64;
  int positive_apart;
  int splits;           // partials to fold (forward) / sum (dH)
  const float* part_m;  // forward
  const float* part_l;
  const float* target_logit;
  float* loss;
  float* lse_out;
  const float* lse;  // backward
  const float* g;
  const float* dh_part;
  void* dh;
  void* dw_out;  // positive_apart: rows num_cols + t
  float* db_out;
};

// h_row . w_y + b_y over the warp (NaN for an invalid target).
template <typename T>
__device__ __forceinline__ float PositiveLogit(const RowArgs& a, int64_t row,
                                               int64_t y) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (y < 0) return NAN;
  const T* h = static_cast<const T*>(a.h) + row * a.d;
  const T* w = static_cast<const T*>(a.w) + y * a.d;
  float acc = 0.0f;
  for (int64_t k = lane; k < a.d; k += 32) {
    acc = fmaf(gpu::ToFloat(h[k]), gpu::ToFloat(w[k]), acc);
  }
  acc = gpu::WarpSum(acc);
  return acc + (a.bias != nullptr ? a.bias[y] : 0.0f);
}

__device__ __forceinline__ int64_t ValidTarget(const RowArgs& a,
                                               int64_t row) {
  const int64_t y = gpu::ReadId(a.targets, a.targets64, row);
  return (y >= 0 && y < a.c_items) ? y : -1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) CombineKernel(const RowArgs a) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps +
                      static_cast<int>(threadIdx.x) / 32;
  if (row >= a.n) return;  // the whole warp
  float m = -INFINITY;
  float l = 0.0f;
  for (int s = lane; s < a.splits; s += 32) {
    gpu::MergeLse(m, l, a.part_m[s * a.n + row], a.part_l[s * a.n + row]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float l2 = __shfl_xor_sync(0xffffffffu, l, offset);
    gpu::MergeLse(m, l, m2, l2);
  }
  float lse = FinishLse(m, l);
  float target;
  if (a.positive_apart) {
    target = PositiveLogit<T>(a, row, ValidTarget(a, row));
    lse = LogAddExp(lse, target);
  } else {
    target = a.target_logit[row];
  }
  if (lane == 0) {
    a.lse_out[row] = lse;
    a.loss[row] = lse - target;
  }
}

// d_hidden = g (sum of the dH partials) [+ positive term]; with
// positive_apart also the compact dW / db rows of the targets.
template <typename T>
__global__ void __launch_bounds__(kThreads) FinishDhKernel(const RowArgs a) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps +
                      static_cast<int>(threadIdx.x) / 32;
  if (row >= a.n) return;
  const float g = a.g[row];
  const int64_t n = a.n;
  const int64_t d = a.d;
  float ds_pos = 0.0f;
  int64_t y = -1;
  if (a.positive_apart) {
    y = ValidTarget(a, row);
    const float s_pos = PositiveLogit<T>(a, row, y);
    ds_pos = g == 0.0f ? 0.0f
                       : g * (exp2f((s_pos - a.lse[row]) * gpu::kLog2e) - 1.0f);
  }
  const T* h = static_cast<const T*>(a.h) + row * d;
  const T* w = static_cast<const T*>(a.w) + (y < 0 ? 0 : y) * d;
  T* dh = static_cast<T*>(a.dh) + row * d;
  T* dw = a.positive_apart
              ? static_cast<T*>(a.dw_out) + (a.num_cols + row) * d
              : nullptr;
  for (int64_t k = lane; k < d; k += 32) {
    float sum = 0.0f;
    for (int s = 0; s < a.splits; ++s) sum += a.dh_part[(s * n + row) * d + k];
    float v = g == 0.0f ? 0.0f : g * sum;
    if (a.positive_apart) {
      v += ds_pos * (y < 0 ? NAN : gpu::ToFloat(w[k]));
      dw[k] = gpu::FromFloat<T>(ds_pos * gpu::ToFloat(h[k]));
    }
    dh[k] = gpu::FromFloat<T>(v);
  }
  if (a.positive_apart && lane == 0 && a.db_out != nullptr) {
    a.db_out[a.num_cols + row] = ds_pos;
  }
}

// d_item_table / d_item_bias = 2^e (sum of the dW partials), in order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    FinishDwKernel(const float* __restrict__ dw_part,
                   const float* __restrict__ db_part, int splits,
                   int64_t num_cols, int64_t d, const float* gscale,
                   T* __restrict__ dw, float* __restrict__ db) {
  const float scale = gscale[0];
  const int64_t total = num_cols * d;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       i < total; i += stride) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += dw_part[s * total + i];
    dw[i] = gpu::FromFloat<T>(sum * scale);
  }
  if (db == nullptr) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       i < num_cols; i += stride) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += db_part[s * num_cols + i];
    db[i] = sum * scale;
  }
}

// gscale[0] = 2^e with max |g| / 2^e in [0.5, 1) (1 when max |g| is 0 or
// not finite), gscale[1] = 2^-e. One block.
__global__ void __launch_bounds__(kThreads)
    GradScaleKernel(const float* __restrict__ g, int64_t n, float* gscale) {
  float mx = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    mx = fmaxf(mx, fabsf(g[i]));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
  }
  float* red = reinterpret_cast<float*>(gpu::DynamicShared<unsigned char>());
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (threadIdx.x % 32 == 0) red[warp] = mx;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kWarps; ++i) mx = fmaxf(mx, red[i]);
    int e = 0;
    if (mx > 0.0f && mx <= 3.0e38f) {
      frexpf(mx, &e);
      e = e > 126 ? 126 : (e < -126 ? -126 : e);
    }
    gscale[0] = ldexpf(1.0f, e);
    gscale[1] = ldexpf(1.0f, -e);
  }
}

// ---------------------------------------------------------------------------
// Host side.

struct DeviceInfo {
  int sms = 1;
  int major = 0;
  size_t max_shared = gpu::kDefaultSharedBytes;
};

cudaError_t GetDeviceInfo(int device, DeviceInfo* info) {
  int dev = 0;
  cudaError_t err = gpu::ResolveDevice(device, &dev);
  if (err != cudaSuccess) return err;
  int value = 0;
  err = gpu::DeviceAttribute(dev, cudaDevAttrMultiProcessorCount, &value);
  if (err != cudaSuccess) return err;
  info->sms = std::max(1, value);
  err = gpu::DeviceAttribute(dev, cudaDevAttrComputeCapabilityMajor, &value);
  if (err != cudaSuccess) return err;
  info->major = value;
  err = gpu::DeviceAttribute(dev, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                             &value);
  if (err != cudaSuccess) return err;
  info->max_shared = static_cast<size_t>(value);
  return cudaSuccess;
}

size_t TileSharedBytes(CrossEntropyGpuType type, int dch, bool wmma) {
  auto pick = [&](auto tag) -> size_t {
    using T = decltype(tag);
    if (wmma) {
      return dch == 64 ? Cfg<T, 64, true>::kBytes
                       : (dch == 128 ? Cfg<T, 128, true>::kBytes
                                     : Cfg<T, 256, true>::kBytes);
    }
    return dch == 64 ? Cfg<T, 64, false>::kBytes
                     : (dch == 128 ? Cfg<T, 128, false>::kBytes
                                   : Cfg<T, 256, false>::kBytes);
  };
  switch (type) {
    case CrossEntropyGpuType::kFloat32: return pick(float{});
    case CrossEntropyGpuType::kFloat16: return pick(__half{});
    case CrossEntropyGpuType::kBFloat16: return pick(__nv_bfloat16{});
  }
  return 0;
}

size_t ElementBytes(CrossEntropyGpuType type) {
  return type == CrossEntropyGpuType::kFloat32 ? 4 : 2;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits of `tiles` (the looped dimension) so that base * splits blocks
// reach `target`, with no empty split and at most `max_splits`.
void Split(int64_t base, int64_t tiles, int64_t target, int64_t max_splits,
           int* splits, int64_t* per) {
  int64_t s = 1;
  if (tiles > 0 && base > 0 && base < target) s = CeilDiv(target, base);
  s = std::max<int64_t>(1, std::min({s, tiles, max_splits,
                                     int64_t{65535}}));
  const int64_t p = tiles > 0 ? CeilDiv(tiles, s) : 0;
  *per = p;
  *splits = static_cast<int>(p > 0 ? CeilDiv(tiles, p) : (tiles > 0 ? 1 : 0));
}

// Workspace of the split partials, at most this much (each kernel).
constexpr int64_t kMaxPartialBytes = int64_t{256} << 20;

struct Plan {
  int dch = 64;
  int dchunks = 1;
  bool wmma = false;
  size_t smem = 0;
  int64_t row_tiles = 0;
  int64_t col_tiles = 0;
  int fwd_splits = 0;
  int64_t fwd_per = 0;
  int dh_splits = 0;
  int64_t dh_per = 0;
  int dw_splits = 0;
  int64_t dw_per = 0;
  bool vec_ok = false;
  // Workspace byte offsets.
  size_t fwd_m = 0, fwd_l = 0, fwd_target = 0, fwd_bytes = 0;
  size_t bwd_gscale = 0, bwd_dh = 0, bwd_dw = 0, bwd_db = 0, bwd_bytes = 0;
};

bool ProblemValid(const FusedSoftmaxGpuProblem& p) {
  if (p.num_rows < 0 || p.dim < 0 || p.num_items < 0 || p.num_cols < 0) {
    return false;
  }
  if (p.num_rows > (int64_t{1} << 40) || p.dim > (int64_t{1} << 24) ||
      p.num_cols > (int64_t{1} << 40) || p.num_items > (int64_t{1} << 40)) {
    return false;
  }
  if (p.col_ids == nullptr && p.num_cols != p.num_items) return false;
  const int t = static_cast<int>(p.type);
  return t >= 0 && t <= 2;
}

cudaError_t MakePlan(const FusedSoftmaxGpuProblem& p, Plan* plan) {
  if (!ProblemValid(p)) return cudaErrorInvalidValue;
  DeviceInfo info;
  cudaError_t err = GetDeviceInfo(p.device, &info);
  if (err != cudaSuccess) return err;
  plan->wmma = p.type != CrossEntropyGpuType::kFloat32 &&
               p.math == CrossEntropyGpuMath::kAuto && info.major >= 8;
  int dch = p.dim <= 64 ? 64 : (p.dim <= 128 ? 128 : 256);
  while (dch > 64 && TileSharedBytes(p.type, dch, plan->wmma) >
                         info.max_shared) {
    dch /= 2;
  }
  plan->smem = TileSharedBytes(p.type, dch, plan->wmma);
  if (plan->smem > info.max_shared) return cudaErrorInvalidConfiguration;
  plan->dch = dch;
  plan->dchunks = static_cast<int>(std::max<int64_t>(1, CeilDiv(p.dim, dch)));
  const size_t vec = 16;
  plan->vec_ok =
      (p.dim * static_cast<int64_t>(ElementBytes(p.type))) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(p.hidden) % vec == 0 &&
      reinterpret_cast<uintptr_t>(p.item_table) % vec == 0;
  plan->row_tiles = CeilDiv(p.num_rows, kTileRows);
  plan->col_tiles = CeilDiv(p.num_cols, kTileCols);
  const int64_t target = 4 * static_cast<int64_t>(info.sms);
  const int64_t n = p.num_rows, d = std::max<int64_t>(1, p.dim);
  Split(plan->row_tiles, plan->col_tiles, target, 65535, &plan->fwd_splits,
        &plan->fwd_per);
  Split(plan->row_tiles * plan->dchunks, plan->col_tiles, target,
        std::max<int64_t>(1, kMaxPartialBytes / std::max<int64_t>(
                                                    1, 4 * n * d)),
        &plan->dh_splits, &plan->dh_per);
  Split(plan->col_tiles * plan->dchunks, plan->row_tiles, target,
        std::max<int64_t>(1, kMaxPartialBytes /
                                 std::max<int64_t>(1, 4 * p.num_cols * d)),
        &plan->dw_splits, &plan->dw_per);
  // Forward workspace: partial max / sum per (split, row), target logits.
  size_t off = 0;
  plan->fwd_m = off;
  off += gpu::AlignBytes(sizeof(float) * plan->fwd_splits * n);
  plan->fwd_l = off;
  off += gpu::AlignBytes(sizeof(float) * plan->fwd_splits * n);
  plan->fwd_target = off;
  off += gpu::AlignBytes(sizeof(float) * n);
  plan->fwd_bytes = std::max<size_t>(off, 256);
  // Backward workspace: grad scale, dH partials, dW / db partials.
  off = 0;
  plan->bwd_gscale = off;
  off += 256;
  plan->bwd_dh = off;
  off += gpu::AlignBytes(sizeof(float) * plan->dh_splits * n * p.dim);
  plan->bwd_dw = off;
  plan->bwd_db = off;
  if (plan->dw_splits > 1) {
    off += gpu::AlignBytes(sizeof(float) * plan->dw_splits * p.num_cols *
                           p.dim);
    plan->bwd_db = off;
    off += gpu::AlignBytes(sizeof(float) * plan->dw_splits * p.num_cols);
  }
  plan->bwd_bytes = off;
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t Launch(Kernel kernel, dim3 grid, size_t smem, const TileArgs& a,
                   cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  const cudaError_t err = gpu::AllowDynamicShared(kernel, smem);
  if (err != cudaSuccess) return err;
  TFREC_KERNEL_LAUNCH(kernel, grid, kThreads, smem, stream)(a);
  return cudaGetLastError();
}

// Calls fn.template operator()<T, DCH, kWmma>() for the plan.
template <typename Fn>
cudaError_t Dispatch(CrossEntropyGpuType type, const Plan& plan, Fn&& fn) {
  auto by_dch = [&](auto tag, auto wmma_tag) -> cudaError_t {
    using T = decltype(tag);
    constexpr bool kW = decltype(wmma_tag)::value;
    if (plan.dch == 64) return fn.template operator()<T, 64, kW>();
    if (plan.dch == 128) return fn.template operator()<T, 128, kW>();
    return fn.template operator()<T, 256, kW>();
  };
  switch (type) {
    case CrossEntropyGpuType::kFloat32:
      return by_dch(float{}, std::false_type{});
    case CrossEntropyGpuType::kFloat16:
      return plan.wmma ? by_dch(__half{}, std::true_type{})
                       : by_dch(__half{}, std::false_type{});
    case CrossEntropyGpuType::kBFloat16:
      return plan.wmma ? by_dch(__nv_bfloat16{}, std::true_type{})
                       : by_dch(__nv_bfloat16{}, std::false_type{});
  }
  return cudaErrorInvalidValue;
}

TileArgs BaseTileArgs(const FusedSoftmaxGpuProblem& p, const Plan& plan) {
  TileArgs a{};
  a.h = p.hidden;
  a.w = p.item_table;
  a.bias = p.item_bias;
  a.targets = p.targets;
  a.col_ids = p.col_ids;
  a.col_log_kq = p.col_log_kq;
  a.n = p.num_rows;
  a.c_items = p.num_items;
  a.num_cols = p.num_cols;
  a.d = p.dim;
  a.targets64 = p.targets_int64 ? 1 : 0;
  a.col_ids64 = p.col_ids_int64 ? 1 : 0;
  a.positive_apart = p.positive_apart ? 1 : 0;
  a.remove_hits = p.remove_hits ? 1 : 0;
  a.dchunks = plan.dchunks;
  a.vec_ok = plan.vec_ok ? 1 : 0;
  return a;
}

RowArgs BaseRowArgs(const FusedSoftmaxGpuProblem& p) {
  RowArgs a{};
  a.h = p.hidden;
  a.w = p.item_table;
  a.bias = p.item_bias;
  a.targets = p.targets;
  a.n = p.num_rows;
  a.c_items = p.num_items;
  a.num_cols = p.num_cols;
  a.d = p.dim;
  a.targets64 = p.targets_int64 ? 1 : 0;
  a.positive_apart = p.positive_apart ? 1 : 0;
  return a;
}

struct ForwardLauncher {
  const Plan& plan;
  const TileArgs& a;
  cudaStream_t stream;
  template <typename T, int DCH, bool kW>
  cudaError_t operator()() const {
    return Launch(ForwardKernel<T, DCH, kW>,
                  dim3(static_cast<unsigned int>(plan.row_tiles),
                       static_cast<unsigned int>(plan.fwd_splits), 1),
                  plan.smem, a, stream);
  }
};

struct BackwardLauncher {
  const Plan& plan;
  const TileArgs& a;
  cudaStream_t stream;
  template <typename T, int DCH, bool kW>
  cudaError_t operator()() const {
    TileArgs dh_args = a;
    dh_args.num_tiles = plan.col_tiles;
    dh_args.tiles_per_split = plan.dh_per;
    cudaError_t e = Launch(
        DhKernel<T, DCH, kW>,
        dim3(static_cast<unsigned int>(plan.row_tiles),
             static_cast<unsigned int>(plan.dh_splits),
             static_cast<unsigned int>(plan.dchunks)),
        plan.smem, dh_args, stream);
    if (e != cudaSuccess) return e;
    TileArgs dw_args = a;
    dw_args.num_tiles = plan.row_tiles;
    dw_args.tiles_per_split = plan.dw_per;
    return Launch(DwKernel<T, DCH, kW>,
                  dim3(static_cast<unsigned int>(plan.col_tiles),
                       static_cast<unsigned int>(plan.dw_splits),
                       static_cast<unsigned int>(plan.dchunks)),
                  plan.smem, dw_args, stream);
  }
};

unsigned int RowBlocks(int64_t n) {
  return static_cast<unsigned int>(CeilDiv(n, kWarps));
}

}  // namespace cce_gpu
}  // namespace

cudaError_t FusedSoftmaxGpuWorkspaceBytes(const FusedSoftmaxGpuProblem& p,
                                          bool backward, size_t* bytes) {
  using namespace cce_gpu;
  gpu::DeviceScope scope(p.device);
  if (scope.status() != cudaSuccess) return scope.status();
  Plan plan;
  const cudaError_t err = MakePlan(p, &plan);
  if (err != cudaSuccess) return err;
  *bytes = backward ? plan.bwd_bytes : plan.fwd_bytes;
  return cudaSuccess;
}

cudaError_t FusedSoftmaxGpuForward(const FusedSoftmaxGpuProblem& p,
                                   float* loss, float* lse, void* workspace,
                                   size_t workspace_bytes,
                                   cudaStream_t stream) {
  using namespace cce_gpu;
  gpu::DeviceScope scope(p.device);
  if (scope.status() != cudaSuccess) return scope.status();
  Plan plan;
  cudaError_t err = MakePlan(p, &plan);
  if (err != cudaSuccess) return err;
  if (p.num_rows == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < plan.fwd_bytes) {
    return cudaErrorInvalidValue;
  }
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  TileArgs a = BaseTileArgs(p, plan);
  a.num_tiles = plan.col_tiles;
  a.tiles_per_split = plan.fwd_per;
  a.part_m = reinterpret_cast<float*>(ws + plan.fwd_m);
  a.part_l = reinterpret_cast<float*>(ws + plan.fwd_l);
  a.target_logit = reinterpret_cast<float*>(ws + plan.fwd_target);
  // Target logits never written (an invalid target) read as NaN.
  err = cudaMemsetAsync(a.target_logit, 0xFF, sizeof(float) * p.num_rows,
                        stream);
  if (err != cudaSuccess) return err;
  err = Dispatch(p.type, plan, ForwardLauncher{plan, a, stream});
  if (err != cudaSuccess) return err;
  RowArgs r = BaseRowArgs(p);
  r.splits = plan.fwd_splits;
  r.part_m = a.part_m;
  r.part_l = a.part_l;
  r.target_logit = a.target_logit;
  r.loss = loss;
  r.lse_out = lse;
  return gpu::DispatchType(p.type, [&](auto tag) {
    using T = decltype(tag);
    TFREC_KERNEL_LAUNCH(CombineKernel<T>, RowBlocks(p.num_rows), kThreads, 0,
                        stream)(r);
    return cudaGetLastError();
  });
}

cudaError_t FusedSoftmaxGpuBackward(const FusedSoftmaxGpuProblem& p,
                                    const float* lse, const float* d_loss,
                                    void* d_hidden, void* d_item_table,
                                    float* d_item_bias, void* workspace,
                                    size_t workspace_bytes,
                                    cudaStream_t stream) {
  using namespace cce_gpu;
  gpu::DeviceScope scope(p.device);
  if (scope.status() != cudaSuccess) return scope.status();
  Plan plan;
  cudaError_t err = MakePlan(p, &plan);
  if (err != cudaSuccess) return err;
  const size_t elem = ElementBytes(p.type);
  if (p.num_rows == 0) {
    // No rows: zero gradients for every column.
    if (p.num_cols * p.dim > 0) {
      err = cudaMemsetAsync(d_item_table, 0, elem * p.num_cols * p.dim,
                            stream);
      if (err != cudaSuccess) return err;
    }
    if (d_item_bias != nullptr && p.num_cols > 0) {
      err = cudaMemsetAsync(d_item_bias, 0, sizeof(float) * p.num_cols,
                            stream);
    }
    return err;
  }
  if (workspace == nullptr || workspace_bytes < plan.bwd_bytes) {
    return cudaErrorInvalidValue;
  }
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  TileArgs a = BaseTileArgs(p, plan);
  a.lse = lse;
  a.g = d_loss;
  a.gscale = reinterpret_cast<float*>(ws + plan.bwd_gscale);
  a.dh_part = reinterpret_cast<float*>(ws + plan.bwd_dh);
  a.dw_out = d_item_table;
  a.db_out = d_item_bias;
  if (plan.dw_splits > 1) {
    a.dw_part = reinterpret_cast<float*>(ws + plan.bwd_dw);
    a.db_part = reinterpret_cast<float*>(ws + plan.bwd_db);
  }
  TFREC_KERNEL_LAUNCH(GradScaleKernel, 1, kThreads, sizeof(float) * kWarps,
                      stream)(d_loss, p.num_rows,
                              const_cast<float*>(a.gscale));
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = Dispatch(p.type, plan, BackwardLauncher{plan, a, stream});
  if (err != cudaSuccess) return err;
  RowArgs r = BaseRowArgs(p);
  r.splits = plan.dh_splits;
  r.lse = lse;
  r.g = d_loss;
  r.dh_part = a.dh_part;
  r.dh = d_hidden;
  r.dw_out = d_item_table;
  r.db_out = d_item_bias;
  return gpu::DispatchType(p.type, [&](auto tag) {
    using T = decltype(tag);
    if (p.dim > 0 || p.positive_apart) {
      TFREC_KERNEL_LAUNCH(FinishDhKernel<T>, RowBlocks(p.num_rows), kThreads,
                          0, stream)(r);
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
    if (plan.dw_splits > 1 && p.num_cols > 0) {
      const int64_t total = std::max<int64_t>(p.num_cols * p.dim, p.num_cols);
      const unsigned int blocks = static_cast<unsigned int>(
          std::min<int64_t>(CeilDiv(total, kThreads), 4096));
      TFREC_KERNEL_LAUNCH(FinishDwKernel<T>, blocks, kThreads, 0, stream)(
          a.dw_part, a.db_part, plan.dw_splits, p.num_cols, p.dim, a.gscale,
          static_cast<T*>(d_item_table), d_item_bias);
      return cudaGetLastError();
    }
    return cudaSuccess;
  });
}

namespace {

FusedSoftmaxGpuProblem CceProblem(const CutCrossEntropyGpuDims& d,
                                  const void* hidden, const void* item_table,
                                  const float* item_bias,
                                  const void* targets) {
  FusedSoftmaxGpuProblem p;
  p.type = d.type;
  p.num_rows = d.num_rows;
  p.dim = d.dim;
  p.num_items = d.num_items;
  p.num_cols = d.num_items;
  p.hidden = hidden;
  p.item_table = item_table;
  p.item_bias = d.has_bias ? item_bias : nullptr;
  p.targets = targets;
  p.targets_int64 = d.targets_int64;
  p.positive_apart = false;
  p.math = d.math;
  p.device = d.device;
  return p;
}

}  // namespace

cudaError_t CutCrossEntropyGpuWorkspaceBytes(const CutCrossEntropyGpuDims& d,
                                             bool backward, size_t* bytes) {
  return FusedSoftmaxGpuWorkspaceBytes(
      CceProblem(d, nullptr, nullptr, nullptr, nullptr), backward, bytes);
}

cudaError_t CutCrossEntropyGpuForward(const CutCrossEntropyGpuDims& d,
                                      const void* hidden,
                                      const void* item_table,
                                      const float* item_bias,
                                      const void* targets, float* loss,
                                      float* lse, void* workspace,
                                      size_t workspace_bytes,
                                      cudaStream_t stream) {
  return FusedSoftmaxGpuForward(
      CceProblem(d, hidden, item_table, item_bias, targets), loss, lse,
      workspace, workspace_bytes, stream);
}

cudaError_t CutCrossEntropyGpuBackward(
    const CutCrossEntropyGpuDims& d, const void* hidden,
    const void* item_table, const float* item_bias, const void* targets,
    const float* lse, const float* d_loss, void* d_hidden,
    void* d_item_table, float* d_item_bias, void* workspace,
    size_t workspace_bytes, cudaStream_t stream) {
  return FusedSoftmaxGpuBackward(
      CceProblem(d, hidden, item_table, item_bias, targets), lse, d_loss,
      d_hidden, d_item_table, d.has_bias ? d_item_bias : nullptr, workspace,
      workspace_bytes, stream);
}

}  // namespace kernels
}  // namespace tfrec_fast
