// CUDA kernels of CCEMinus with per-row negatives (given [N, K] or generated
// by counter_rng.h); shared negatives run on the tile engine of
// cut_cross_entropy.cu.cc. See cce_minus_gpu.h for the meaning, the design
// and the API.
//
// Thread block: 256 threads = 8 warps; `wpr` warps (1, 2, 4 or 8) share a
// row, so a block holds 8 / wpr rows; warp `slice` of a row takes the groups
// of 4 negatives g = slice, slice + wpr, ... (negatives 4 g .. 4 g + 3).
// Lane l owns the elements d = l + 32 i of every D-long vector:
//   kOnePass (D <= 256): h_t (8 floats), the 4 current w rows (32) and the
//     dh accumulator (8) in registers; a w row read is 32 lanes x 8
//     coalesced loads.
//   otherwise: h_t and w rows read from global memory (L1 / L2) in each
//     pass over d, the dh accumulator in shared memory ([8 warps][D]
//     floats, lane-owned elements: no barrier inside a warp's walk).
// A group's 4 dot products are reduced with interleaved xor shuffles, so
// every lane ends with the same logits and the same running (max, sum):
// control flow stays warp-uniform. The row's warps then meet in shared
// memory and its first warp merges the partial sums with the positive in
// slice order (deterministic).
//
// The draw of (row, j) is counter_rng::UniformDraw / UnigramDraw of
// RowKey(CallKey(seed, step), row_offset + row), so the backward sees the
// forward's negatives exactly.
#include "custom_ops/kernels/cce_minus_gpu.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "custom_ops/kernels/counter_rng.h"
#include "custom_ops/kernels/cut_cross_entropy_gpu.h"
#include "custom_ops/kernels/gpu_kernel_helpers.cu.h"

namespace tfrec_fast {
namespace kernels {
namespace {
namespace ccem_gpu {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 4;     // negatives in flight per warp
constexpr int kPerLane = 8;   // d elements a lane holds in one pass
constexpr int kPass = 32 * kPerLane;

struct Args {
  const void* h;
  const void* w;
  const float* bias;
  const void* targets;
  const void* neg_ids;         // given [N, K]
  const float* neg_log_kq;     // given [N, K]
  const float* accept;         // unigram [C]
  const int64_t* alias;        // unigram [C]
  const float* log_q_table;    // unigram [C]
  int64_t n;
  int64_t c;
  int64_t d;
  int64_t k;
  uint64_t call_key;
  int64_t row_offset;
  float log_k;         // float(log(double(K)))
  float uniform_corr;  // float(log(double(K)) - log(double(C)))
  int sampling;        // CceMinusGpuSampling
  int targets64;
  int neg64;
  int remove_hits;
  int wpr;             // warps per row
  // Forward.
  float* loss;
  float* lse_out;
  // Backward.
  const float* lse;
  const float* g;
  void* dh;
  float* dw_acc;  // float32 [C, D], zeroed
  float* db_acc;  // float32 [C], zeroed, or nullptr
};

// The j-th negative of `row` (-1 for an id outside [0, C)) and its
// correction log(K q).
__device__ __forceinline__ int64_t Negative(const Args& a, int64_t row,
                                            uint64_t row_key, int64_t j,
                                            float* corr) {
  int64_t id;
  if (a.sampling == static_cast<int>(CceMinusGpuSampling::kGiven)) {
    const int64_t i = row * a.k + j;
    id = gpu::ReadId(a.neg_ids, a.neg64, i);
    *corr = a.neg_log_kq[i];
  } else if (a.c <= 0) {
    id = -1;
    *corr = NAN;
  } else if (a.sampling == static_cast<int>(CceMinusGpuSampling::kUniform)) {
    id = counter_rng::UniformDraw(row_key, j, a.c);
    *corr = a.uniform_corr;
  } else {
    id = counter_rng::UnigramDraw(row_key, j, a.c, a.accept, a.alias);
    *corr = (id >= 0 && id < a.c) ? a.log_k + a.log_q_table[id] : NAN;
  }
  return (id >= 0 && id < a.c) ? id : -1;
}

__device__ __forceinline__ int64_t ValidTarget(const Args& a, int64_t row) {
  const int64_t y = gpu::ReadId(a.targets, a.targets64, row);
  return (y >= 0 && y < a.c) ? y : -1;
}

// Lane part of h_t . w_id (kOnePass: h in hv, the w values kept in wv).
template <typename T, bool kOnePass>
__device__ __forceinline__ float LaneDot(const Args& a, const T* h,
                                         const float (&hv)[kPerLane],
                                         int64_t id, float (&wv)[kPerLane]) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const T* wr = static_cast<const T*>(a.w) + id * a.d;
  float dot = 0.0f;
  if constexpr (kOnePass) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      wv[i] = d < a.d ? gpu::ToFloat(wr[d]) : 0.0f;
      dot = fmaf(hv[i], wv[i], dot);
    }
  } else {
    for (int64_t d = lane; d < a.d; d += 32) {
      dot = fmaf(gpu::ToFloat(h[d]), gpu::ToFloat(wr[d]), dot);
    }
  }
  return dot;
}

// ---------------------------------------------------------------------------
// Forward.
template <typename T, bool kOnePass>
__global__ void __launch_bounds__(kThreads) ForwardKernel(const Args a) {
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int rpb = kWarps / a.wpr;
  const int local = warp / a.wpr;
  const int slice = warp % a.wpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rpb + local;
  const bool active = row < a.n;
  float* red = gpu::DynamicShared<float>();  // [kWarps] max, [kWarps] sum
  float m = -INFINITY;
  float l = 0.0f;
  int64_t y = -1;
  const T* h = nullptr;
  float hv[kPerLane];
  if (active) {
    const uint64_t row_key =
        a.sampling == static_cast<int>(CceMinusGpuSampling::kGiven)
            ? 0
            : counter_rng::RowKey(a.call_key, a.row_offset + row);
    y = ValidTarget(a, row);
    h = static_cast<const T*>(a.h) + row * a.d;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      hv[i] = (kOnePass && d < a.d) ? gpu::ToFloat(h[d]) : 0.0f;
    }
    for (int64_t j0 = static_cast<int64_t>(slice) * kGroup; j0 < a.k;
         j0 += static_cast<int64_t>(a.wpr) * kGroup) {
      int64_t ids[kGroup];
      float corr[kGroup];
      float dot[kGroup];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        corr[u] = 0.0f;
        ids[u] = j0 + u < a.k ? Negative(a, row, row_key, j0 + u, &corr[u])
                              : -1;
      }
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        float wv[kPerLane];
        dot[u] = ids[u] >= 0 ? LaneDot<T, kOnePass>(a, h, hv, ids[u], wv)
                             : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kGroup; ++u) dot[u] = gpu::WarpSum(dot[u]);
      float v[kGroup];
      float group_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        if (j0 + u >= a.k) {
          v[u] = -INFINITY;
        } else if (ids[u] < 0) {
          v[u] = NAN;
        } else if (a.remove_hits && ids[u] == y) {
          v[u] = -INFINITY;
        } else {
          v[u] = dot[u] + (a.bias != nullptr ? a.bias[ids[u]] : 0.0f) -
                 corr[u];
        }
        group_max = fmaxf(group_max, v[u]);
      }
      const float m_new = fmaxf(m, group_max);
      const float ref = m_new == -INFINITY ? 0.0f : m_new;
      float sum = 0.0f;
#pragma unroll
      for (int u = 0; u < kGroup; ++u) sum += exp2f((v[u] - ref) * gpu::kLog2e);
      l = l * exp2f((m - ref) * gpu::kLog2e) + sum;
      m = m_new;
    }
  }
  if (lane == 0) {
    red[warp] = m;
    red[kWarps + warp] = l;
  }
  __syncthreads();
  if (!active || slice != 0) return;
  // The positive logit (uncorrected), then the row's partials in order.
  float s_pos = NAN;
  if (y >= 0) {
    float wv[kPerLane];
    s_pos = gpu::WarpSum(LaneDot<T, kOnePass>(a, h, hv, y, wv)) +
            (a.bias != nullptr ? a.bias[y] : 0.0f);
  }
  float pm = -INFINITY;
  float pl = 0.0f;
  if (s_pos != s_pos) {
    pl = NAN;
  } else if (s_pos > -INFINITY) {
    pm = s_pos;
    pl = 1.0f;
  }
  for (int s = 0; s < a.wpr; ++s) {
    gpu::MergeLse(pm, pl, red[local * a.wpr + s],
                  red[kWarps + local * a.wpr + s]);
  }
  const float lse =
      pl > 0.0f ? pm + logf(pl) : (pl == 0.0f ? -INFINITY : pl);
  if (lane == 0) {
    a.lse_out[row] = lse;
    a.loss[row] = lse - s_pos;
  }
}

// ---------------------------------------------------------------------------
// Backward: dh (deterministic), dW / db (atomics).
template <typename T, bool kOnePass>
__global__ void __launch_bounds__(kThreads) BackwardKernel(const Args a) {
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int rpb = kWarps / a.wpr;
  const int local = warp / a.wpr;
  const int slice = warp % a.wpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rpb + local;
  const bool active = row < a.n;
  const int64_t acc_stride = kOnePass ? kPass : a.d;
  // [kWarps][acc_stride] dh partials.
  float* red = gpu::DynamicShared<float>();
  float* mine = red + warp * acc_stride;
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
  if constexpr (!kOnePass) {
    for (int64_t d = lane; d < a.d; d += 32) mine[d] = 0.0f;
  }
  const float g = active ? a.g[row] : 0.0f;
  // Adds ds * w_id to the dh accumulator and ds * h_t to dW[id], db[id].
  auto scatter = [&](int64_t id, float ds, const T* h, const float* hv,
                     const float* wv) {
    const T* wr = static_cast<const T*>(a.w) + id * a.d;
    float* dw = a.dw_acc + id * a.d;
    if constexpr (kOnePass) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < a.d) {
          acc[i] = fmaf(ds, wv[i], acc[i]);
          atomicAdd(dw + d, ds * hv[i]);
        }
      }
    } else {
      for (int64_t d = lane; d < a.d; d += 32) {
        mine[d] = fmaf(ds, gpu::ToFloat(wr[d]), mine[d]);
        atomicAdd(dw + d, ds * gpu::ToFloat(h[d]));
      }
    }
    if (lane == 0 && a.db_acc != nullptr) atomicAdd(a.db_acc + id, ds);
  };
  auto poison = [&]() {  // an invalid id in the row: NaN dh
    if constexpr (kOnePass) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] = NAN;
    } else {
      for (int64_t d = lane; d < a.d; d += 32) mine[d] = NAN;
    }
  };
  if (active && g != 0.0f) {
    const uint64_t row_key =
        a.sampling == static_cast<int>(CceMinusGpuSampling::kGiven)
            ? 0
            : counter_rng::RowKey(a.call_key, a.row_offset + row);
    const int64_t y = ValidTarget(a, row);
    const float lse = a.lse[row];
    const T* h = static_cast<const T*>(a.h) + row * a.d;
    float hv[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      hv[i] = (kOnePass && d < a.d) ? gpu::ToFloat(h[d]) : 0.0f;
    }
    for (int64_t j0 = static_cast<int64_t>(slice) * kGroup; j0 < a.k;
         j0 += static_cast<int64_t>(a.wpr) * kGroup) {
      int64_t ids[kGroup];
      float corr[kGroup];
      float dot[kGroup];
      float wv[kGroup][kPerLane];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        corr[u] = 0.0f;
        ids[u] = j0 + u < a.k ? Negative(a, row, row_key, j0 + u, &corr[u])
                              : -1;
      }
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        dot[u] = ids[u] >= 0
                     ? LaneDot<T, kOnePass>(a, h, hv, ids[u], wv[u])
                     : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kGroup; ++u) dot[u] = gpu::WarpSum(dot[u]);
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        if (j0 + u >= a.k) continue;
        if (ids[u] < 0) {
          poison();
          continue;
        }
        if (a.remove_hits && ids[u] == y) continue;  // probability 0
        const float s = dot[u] +
                        (a.bias != nullptr ? a.bias[ids[u]] : 0.0f) - corr[u];
        const float ds = g * exp2f((s - lse) * gpu::kLog2e);
        if (ds != 0.0f) scatter(ids[u], ds, h, hv, wv[u]);
      }
    }
    if (slice == 0) {  // the positive: ds = g (p - 1)
      if (y < 0) {
        poison();
      } else {
        float wv[kPerLane];
        const float s_pos =
            gpu::WarpSum(LaneDot<T, kOnePass>(a, h, hv, y, wv)) +
            (a.bias != nullptr ? a.bias[y] : 0.0f);
        const float ds = g * (exp2f((s_pos - lse) * gpu::kLog2e) - 1.0f);
        if (ds != 0.0f) scatter(y, ds, h, hv, wv);
      }
    }
  }
  if constexpr (kOnePass) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) mine[lane + 32 * i] = acc[i];
  }
  __syncthreads();
  if (!active || slice != 0) return;
  T* dh = static_cast<T*>(a.dh) + row * a.d;
  for (int64_t d = lane; d < a.d; d += 32) {
    float sum = 0.0f;
    for (int s = 0; s < a.wpr; ++s) {
      sum += red[(local * a.wpr + s) * acc_stride + d];
    }
    dh[d] = gpu::FromFloat<T>(sum);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    CastKernel(const float* __restrict__ src, int64_t count,
               T* __restrict__ dst) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       i < count; i += stride) {
    dst[i] = gpu::FromFloat<T>(src[i]);
  }
}

// ---------------------------------------------------------------------------
// Host side.

bool DimsValid(const CceMinusGpuDims& d) {
  if (d.num_rows < 0 || d.num_items < 0 || d.dim < 0 ||
      d.num_negatives < 0) {
    return false;
  }
  if (d.num_rows > (int64_t{1} << 40) || d.dim > (int64_t{1} << 24) ||
      d.num_items > (int64_t{1} << 40) ||
      d.num_negatives > (int64_t{1} << 40)) {
    return false;
  }
  if (d.shared_negatives && d.sampling != CceMinusGpuSampling::kGiven) {
    return false;
  }
  const int t = static_cast<int>(d.type);
  const int s = static_cast<int>(d.sampling);
  return t >= 0 && t <= 2 && s >= 0 && s <= 2;
}

FusedSoftmaxGpuProblem SharedProblem(const CceMinusGpuDims& d,
                                     const CceMinusGpuInputs& in) {
  FusedSoftmaxGpuProblem p;
  p.type = d.type;
  p.num_rows = d.num_rows;
  p.dim = d.dim;
  p.num_items = d.num_items;
  p.num_cols = d.num_negatives;
  p.hidden = in.hidden;
  p.item_table = in.item_table;
  p.item_bias = d.has_bias ? in.item_bias : nullptr;
  p.targets = in.targets;
  p.targets_int64 = d.targets_int64;
  p.col_ids = d.num_negatives > 0 ? in.negative_ids : nullptr;
  p.col_ids_int64 = d.negative_ids_int64;
  p.col_log_kq = in.negative_log_kq;
  p.positive_apart = true;
  p.remove_hits = d.remove_hits;
  p.math = d.math;
  p.device = d.device;
  // No ids (K == 0, or a workspace query): the engine takes a null col_ids
  // for identity columns, so give it a dummy pointer it never reads.
  static const int64_t kNoIds = 0;
  if (p.col_ids == nullptr) p.col_ids = &kNoIds;
  return p;
}

cudaError_t LaunchConfig(const CceMinusGpuDims& d, int* wpr, int* sms) {
  int value = 1;
  const cudaError_t err =
      gpu::DeviceAttribute(d.device, cudaDevAttrMultiProcessorCount, &value);
  if (err != cudaSuccess) return err;
  *sms = std::max(1, value);
  // Enough warps to fill the GPU a few times over; each warp keeps at
  // least two groups of negatives.
  const int64_t target_warps = static_cast<int64_t>(*sms) * 64;
  int w = 1;
  while (w < kWarps && d.num_rows * w < target_warps &&
         d.num_negatives >= static_cast<int64_t>(w) * 2 * 2 * kGroup) {
    w *= 2;
  }
  *wpr = w;
  return cudaSuccess;
}

Args BaseArgs(const CceMinusGpuDims& d, const CceMinusGpuInputs& in, int wpr) {
  Args a{};
  a.h = in.hidden;
  a.w = in.item_table;
  a.bias = d.has_bias ? in.item_bias : nullptr;
  a.targets = in.targets;
  a.neg_ids = in.negative_ids;
  a.neg_log_kq = in.negative_log_kq;
  a.accept = in.alias_accept;
  a.alias = in.alias_index;
  a.log_q_table = in.log_q_table;
  a.n = d.num_rows;
  a.c = d.num_items;
  a.d = d.dim;
  a.k = d.num_negatives;
  a.call_key = counter_rng::CallKey(d.seed, d.step);
  a.row_offset = d.row_offset;
  const double log_k = std::log(static_cast<double>(d.num_negatives));
  a.log_k = static_cast<float>(log_k);
  a.uniform_corr = static_cast<float>(
      log_k - std::log(static_cast<double>(d.num_items)));
  a.sampling = static_cast<int>(d.sampling);
  a.targets64 = d.targets_int64 ? 1 : 0;
  a.neg64 = d.negative_ids_int64 ? 1 : 0;
  a.remove_hits = d.remove_hits ? 1 : 0;
  a.wpr = wpr;
  return a;
}

bool InputsValid(const CceMinusGpuDims& d, const CceMinusGpuInputs& in) {
  if (d.num_rows == 0) return true;
  if (in.hidden == nullptr || in.targets == nullptr) return false;
  if (d.num_items > 0 && in.item_table == nullptr) return false;
  if (d.has_bias && in.item_bias == nullptr) return false;
  if (d.num_negatives > 0) {
    if (d.sampling == CceMinusGpuSampling::kGiven &&
        (in.negative_ids == nullptr || in.negative_log_kq == nullptr)) {
      return false;
    }
    if (d.sampling == CceMinusGpuSampling::kUnigram &&
        (in.alias_accept == nullptr || in.alias_index == nullptr ||
         in.log_q_table == nullptr)) {
      return false;
    }
  }
  return true;
}

template <typename Kernel>
cudaError_t LaunchRows(Kernel kernel, const Args& a, size_t smem,
                       cudaStream_t stream) {
  const int rpb = kWarps / a.wpr;
  const int64_t blocks = (a.n + rpb - 1) / rpb;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  if (smem > gpu::kDefaultSharedBytes) {
    // The backward's [8 warps][D] float accumulator past D = 256 must fit.
    int limit = 0;
    cudaError_t err = gpu::DeviceAttribute(
        -1, cudaDevAttrMaxSharedMemoryPerBlockOptin, &limit);
    if (err != cudaSuccess) return err;
    if (smem > static_cast<size_t>(limit)) {
      return cudaErrorInvalidConfiguration;
    }
    err = gpu::AllowDynamicShared(kernel, smem);
    if (err != cudaSuccess) return err;
  }
  TFREC_KERNEL_LAUNCH(kernel, static_cast<unsigned int>(blocks), kThreads,
                      smem, stream)(a);
  return cudaGetLastError();
}

}  // namespace ccem_gpu
}  // namespace

int64_t CceMinusGpuItemGradRows(const CceMinusGpuDims& d) {
  return d.shared_negatives ? d.num_negatives + d.num_rows : d.num_items;
}

cudaError_t CceMinusGpuWorkspaceBytes(const CceMinusGpuDims& d, bool backward,
                                      size_t* bytes) {
  using namespace ccem_gpu;
  if (!DimsValid(d)) return cudaErrorInvalidValue;
  if (d.shared_negatives) {
    return FusedSoftmaxGpuWorkspaceBytes(
        SharedProblem(d, CceMinusGpuInputs{}), backward, bytes);
  }
  *bytes = 256;
  if (backward && d.type != CrossEntropyGpuType::kFloat32) {
    *bytes = std::max<size_t>(
        256, gpu::AlignBytes(sizeof(float) * d.num_items * d.dim));
  }
  return cudaSuccess;
}

cudaError_t CceMinusGpuForward(const CceMinusGpuDims& d,
                               const CceMinusGpuInputs& in, float* loss,
                               float* lse, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream) {
  using namespace ccem_gpu;
  if (!DimsValid(d) || !InputsValid(d, in)) return cudaErrorInvalidValue;
  if (d.shared_negatives) {
    return FusedSoftmaxGpuForward(SharedProblem(d, in), loss, lse, workspace,
                                  workspace_bytes, stream);
  }
  gpu::DeviceScope scope(d.device);
  if (scope.status() != cudaSuccess) return scope.status();
  if (d.num_rows == 0) return cudaSuccess;
  int wpr = 1, sms = 1;
  cudaError_t err = LaunchConfig(d, &wpr, &sms);
  if (err != cudaSuccess) return err;
  Args a = BaseArgs(d, in, wpr);
  a.loss = loss;
  a.lse_out = lse;
  const size_t smem = sizeof(float) * 2 * kWarps;
  return gpu::DispatchType(d.type, [&](auto tag) {
    using T = decltype(tag);
    return d.dim <= kPass ? LaunchRows(ForwardKernel<T, true>, a, smem, stream)
                          : LaunchRows(ForwardKernel<T, false>, a, smem,
                                       stream);
  });
}

cudaError_t CceMinusGpuBackward(const CceMinusGpuDims& d,
                                const CceMinusGpuInputs& in,
                                const float* lse, const float* d_loss,
                                void* d_hidden, void* d_item_table,
                                float* d_item_bias, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream) {
  using namespace ccem_gpu;
  if (!DimsValid(d) || !InputsValid(d, in)) return cudaErrorInvalidValue;
  if (d.shared_negatives) {
    return FusedSoftmaxGpuBackward(SharedProblem(d, in), lse, d_loss,
                                   d_hidden, d_item_table,
                                   d.has_bias ? d_item_bias : nullptr,
                                   workspace, workspace_bytes, stream);
  }
  gpu::DeviceScope scope(d.device);
  if (scope.status() != cudaSuccess) return scope.status();
  size_t needed = 0;
  cudaError_t err = CceMinusGpuWorkspaceBytes(d, true, &needed);
  if (err != cudaSuccess) return err;
  const bool is_float = d.type == CrossEntropyGpuType::kFloat32;
  if (!is_float && (workspace == nullptr || workspace_bytes < needed)) {
    return cudaErrorInvalidValue;
  }
  const int64_t count = d.num_items * d.dim;
  float* dw_acc = is_float ? static_cast<float*>(d_item_table)
                           : static_cast<float*>(workspace);
  float* db = d.has_bias ? d_item_bias : nullptr;
  if (count > 0) {
    err = cudaMemsetAsync(dw_acc, 0, sizeof(float) * count, stream);
    if (err != cudaSuccess) return err;
  }
  if (db != nullptr && d.num_items > 0) {
    err = cudaMemsetAsync(db, 0, sizeof(float) * d.num_items, stream);
    if (err != cudaSuccess) return err;
  }
  if (d.num_rows > 0) {
    int wpr = 1, sms = 1;
    err = LaunchConfig(d, &wpr, &sms);
    if (err != cudaSuccess) return err;
    Args a = BaseArgs(d, in, wpr);
    a.lse = lse;
    a.g = d_loss;
    a.dh = d_hidden;
    a.dw_acc = dw_acc;
    a.db_acc = db;
    const bool one_pass = d.dim <= kPass;
    const size_t smem =
        sizeof(float) * kWarps * (one_pass ? kPass : d.dim);
    err = gpu::DispatchType(d.type, [&](auto tag) {
      using T = decltype(tag);
      return one_pass
                 ? LaunchRows(BackwardKernel<T, true>, a, smem, stream)
                 : LaunchRows(BackwardKernel<T, false>, a, smem, stream);
    });
    if (err != cudaSuccess) return err;
  }
  if (is_float || count == 0) return cudaSuccess;
  return gpu::DispatchType(d.type, [&](auto tag) {
    using T = decltype(tag);
    const unsigned int blocks = static_cast<unsigned int>(
        std::min<int64_t>((count + kThreads - 1) / kThreads, 4096));
    TFREC_KERNEL_LAUNCH(CastKernel<T>, blocks, kThreads, 0, stream)(
        dw_acc, count, static_cast<T*>(d_item_table));
    return cudaGetLastError();
  });
}

}  // namespace kernels
}  // namespace tfrec_fast
