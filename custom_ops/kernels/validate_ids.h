// Id-range validation: the cheap check every fused op runs before it trusts
// an id as an index into an item table.
//
// Framework-free (std only) so that the same code builds into the TensorFlow
// op library and into the standalone kernel library used by the GPU harness.
#ifndef TFREC_FAST_KERNELS_VALIDATE_IDS_H_
#define TFREC_FAST_KERNELS_VALIDATE_IDS_H_

#include <cstdint>

namespace tfrec_fast {
namespace kernels {

// Returns the smallest position p in [begin, end) with ids[p] outside
// [0, num_items), or -1 if every id in the range is valid.
template <typename Id>
int64_t FirstOutOfRange(const Id* ids, int64_t begin, int64_t end,
                        int64_t num_items) {
  // Scan in blocks without a branch per element so the compiler vectorises
  // the common all-valid case; only a block that has a bad id is rescanned.
  constexpr int64_t kBlock = 256;
  for (int64_t block = begin; block < end; block += kBlock) {
    const int64_t block_end = block + kBlock < end ? block + kBlock : end;
    bool any_bad = false;
    for (int64_t p = block; p < block_end; ++p) {
      const int64_t id = static_cast<int64_t>(ids[p]);
      any_bad |= (id < 0) | (id >= num_items);
    }
    if (any_bad) {
      for (int64_t p = block; p < block_end; ++p) {
        const int64_t id = static_cast<int64_t>(ids[p]);
        if (id < 0 || id >= num_items) return p;
      }
    }
  }
  return -1;
}

}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_VALIDATE_IDS_H_
