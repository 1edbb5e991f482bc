// GPU id-range validation: the CUDA counterpart of validate_ids.h.
//
// Framework-free (CUDA runtime API only): the kernels live in
// validate_ids.cu.cc, compiled by nvcc; this header is also included by the
// g++-compiled TensorFlow GPU kernel (custom_ops/tf/validate_ids_op_gpu.cc).
#ifndef TFREC_FAST_KERNELS_VALIDATE_IDS_GPU_H_
#define TFREC_FAST_KERNELS_VALIDATE_IDS_GPU_H_

#include <cstdint>

#include <cuda_runtime_api.h>

namespace tfrec_fast {
namespace kernels {

// Enqueues on `stream` a scan of the device array ids[0, n): afterwards the
// device scalar *first_bad_device holds the smallest position p with ids[p]
// outside [0, num_items), or a value >= n (all bits set) if every id is
// valid. Asynchronous; returns the launch status.
template <typename Id>
cudaError_t LaunchFirstOutOfRange(const Id* ids, int64_t n, int64_t num_items,
                                  unsigned long long* first_bad_device,
                                  cudaStream_t stream);

// LaunchFirstOutOfRange, then waits on `stream` and copies the answer to
// host memory: *first_bad = the smallest bad position, or n if all ids are
// valid; when one is bad, *bad_value = ids[*first_bad]. `scratch_device` is
// one device scalar the caller owns.
template <typename Id>
cudaError_t FindFirstOutOfRange(const Id* ids, int64_t n, int64_t num_items,
                                unsigned long long* scratch_device,
                                cudaStream_t stream, int64_t* first_bad,
                                int64_t* bad_value);

}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_VALIDATE_IDS_GPU_H_
