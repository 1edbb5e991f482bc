// A growable, 64-byte aligned float buffer: the per-thread scratch (tiles,
// packed operands) of the CPU kernels' workers, kept across the work items
// one worker processes.
//
// Framework-free (std only).
#ifndef TFREC_FAST_KERNELS_ALIGNED_FLOATS_H_
#define TFREC_FAST_KERNELS_ALIGNED_FLOATS_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

namespace tfrec_fast {
namespace kernels {

class AlignedFloats {
 public:
  AlignedFloats() = default;
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  ~AlignedFloats() { std::free(data_); }

  // At least `count` floats (contents unspecified), valid until the next
  // Get. Grows by at least half its size, so that slowly growing requests
  // reallocate rarely.
  float* Get(int64_t count) {
    const size_t need = static_cast<size_t>(std::max<int64_t>(count, 1));
    if (need > size_) {
      std::free(data_);
      size_ = std::max(need, size_ + size_ / 2);
      const size_t bytes = (size_ * sizeof(float) + 63) / 64 * 64;
      data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (data_ == nullptr) std::abort();
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_ALIGNED_FLOATS_H_
