// CUDA kernels for id-range validation (see validate_ids_gpu.h): the first
// bad position by gpu::FindFirstBad.
#include "custom_ops/kernels/validate_ids_gpu.h"

#include <algorithm>
#include <cstdint>

#include "custom_ops/kernels/gpu_kernel_helpers.cu.h"

namespace tfrec_fast {
namespace kernels {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill an H100 several times over; larger inputs loop.
constexpr int64_t kMaxBlocks = 4096;

template <typename Id>
__global__ void FirstOutOfRangeKernel(const Id* __restrict__ ids, int64_t n,
                                      int64_t num_items,
                                      unsigned long long* first_bad) {
  gpu::FindFirstBad(
      n,
      [&](int64_t p) {
        const int64_t id = static_cast<int64_t>(ids[p]);
        return id < 0 || id >= num_items;
      },
      first_bad);
}

}  // namespace

template <typename Id>
cudaError_t LaunchFirstOutOfRange(const Id* ids, int64_t n, int64_t num_items,
                                  unsigned long long* first_bad_device,
                                  cudaStream_t stream) {
  // All bits set: larger than any position, i.e. "none found yet".
  cudaError_t err = cudaMemsetAsync(first_bad_device, 0xFF,
                                    sizeof(*first_bad_device), stream);
  if (err != cudaSuccess || n <= 0) return err;
  const int64_t blocks =
      std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
  FirstOutOfRangeKernel<Id><<<static_cast<unsigned int>(blocks), kThreads, 0,
                              stream>>>(ids, n, num_items, first_bad_device);
  return cudaGetLastError();
}

template <typename Id>
cudaError_t FindFirstOutOfRange(const Id* ids, int64_t n, int64_t num_items,
                                unsigned long long* scratch_device,
                                cudaStream_t stream, int64_t* first_bad,
                                int64_t* bad_value) {
  cudaError_t err =
      LaunchFirstOutOfRange(ids, n, num_items, scratch_device, stream);
  if (err != cudaSuccess) return err;
  unsigned long long found = 0;
  err = cudaMemcpyAsync(&found, scratch_device, sizeof(found),
                        cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return err;
  *first_bad = found < static_cast<unsigned long long>(n)
                   ? static_cast<int64_t>(found)
                   : n;
  if (*first_bad == n) return cudaSuccess;
  Id value{};
  err = cudaMemcpyAsync(&value, ids + *first_bad, sizeof(Id),
                        cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  *bad_value = static_cast<int64_t>(value);
  return err;
}

#define TFREC_FAST_INSTANTIATE(Id)                                          \
  template cudaError_t LaunchFirstOutOfRange<Id>(                           \
      const Id*, int64_t, int64_t, unsigned long long*, cudaStream_t);      \
  template cudaError_t FindFirstOutOfRange<Id>(                             \
      const Id*, int64_t, int64_t, unsigned long long*, cudaStream_t,       \
      int64_t*, int64_t*);
TFREC_FAST_INSTANTIATE(int32_t)
TFREC_FAST_INSTANTIATE(int64_t)
#undef TFREC_FAST_INSTANTIATE

}  // namespace kernels
}  // namespace tfrec_fast
