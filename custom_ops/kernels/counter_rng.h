// Counter-based negative draws for CCEMinus: a pure function of (seed, step,
// row, draw), so the backward pass (and the pure-TF reference in
// tfrec_fast/ops/counter_rng.py, bit for bit) regenerates the forward's
// negatives and no [N, K] id tensor ever exists.
//
//   Mix64(z):  z ^= z >> 30; z *= 0xbf58476d1ce4e5b9;
//              z ^= z >> 27; z *= 0x94d049bb133111eb; z ^= z >> 31
//              (SplitMix64's finaliser; all arithmetic mod 2^64)
//   CallKey(seed, step)   = Mix64(Mix64(seed) ^ step)
//   RowKey(call_key, row) = Mix64(call_key ^ row)    row = row_offset + t
//   DrawBits(row_key, j)  = Mix64(row_key + (j + 1) * 0x9e3779b97f4a7c15)
//   Column(bits, C)       = min(int64(double(bits >> 11) * 2^-53 * double(C)),
//                               C - 1)
//   Coin(bits)            = float(Mix64(bits ^ 0xd1b54a32d192ed03) >> 40)
//                           * 2^-24          (exact in float32, in [0, 1))
//   uniform draw:  Column(bits, C)
//   unigram draw:  c = Column(bits, C); Coin(bits) < accept[c] ? c : alias[c]
//                  (Walker's alias table, as tfrec_fast.samplers.Unigram)
//
// Every operation is exact integer arithmetic or one correctly rounded IEEE
// multiply, so CPU, CUDA and TensorFlow agree bit for bit. Usable from host
// and device code.
#ifndef TFREC_FAST_KERNELS_COUNTER_RNG_H_
#define TFREC_FAST_KERNELS_COUNTER_RNG_H_

#include <cstdint>

#if defined(__CUDACC__)
#define TFREC_HD __host__ __device__ __forceinline__
#else
#define TFREC_HD inline
#endif

namespace tfrec_fast {
namespace kernels {
namespace counter_rng {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
constexpr uint64_t kCoinSalt = 0xd1b54a32d192ed03ULL;

TFREC_HD uint64_t Mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xbf58476d1ce4e5b9ULL;
  z ^= z >> 27;
  z *= 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return z;
}

TFREC_HD uint64_t CallKey(int64_t seed, int64_t step) {
  return Mix64(Mix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(step));
}

TFREC_HD uint64_t RowKey(uint64_t call_key, int64_t row) {
  return Mix64(call_key ^ static_cast<uint64_t>(row));
}

TFREC_HD uint64_t DrawBits(uint64_t row_key, int64_t draw) {
  return Mix64(row_key + (static_cast<uint64_t>(draw) + 1ULL) * kGolden);
}

TFREC_HD int64_t Column(uint64_t bits, int64_t num_items) {
  // 2^-53: the 53 high bits as a double in [0, 1).
  const double u = static_cast<double>(bits >> 11) * 1.1102230246251565e-16;
  const int64_t c = static_cast<int64_t>(u * static_cast<double>(num_items));
  return c < num_items - 1 ? c : num_items - 1;
}

TFREC_HD float Coin(uint64_t bits) {
  // 2^-24: 24 bits, exact in float32.
  return static_cast<float>(Mix64(bits ^ kCoinSalt) >> 40) * 5.9604644775390625e-08f;
}

// The draw of row `row` (global: row_offset + t), draw index j in [0, K).
TFREC_HD int64_t UniformDraw(uint64_t row_key, int64_t draw, int64_t num_items) {
  return Column(DrawBits(row_key, draw), num_items);
}

template <typename IndexT>
TFREC_HD int64_t UnigramDraw(uint64_t row_key, int64_t draw, int64_t num_items,
                             const float* accept, const IndexT* alias) {
  const uint64_t bits = DrawBits(row_key, draw);
  const int64_t c = Column(bits, num_items);
  return Coin(bits) < accept[c] ? c : static_cast<int64_t>(alias[c]);
}

}  // namespace counter_rng
}  // namespace kernels
}  // namespace tfrec_fast

#undef TFREC_HD
#endif  // TFREC_FAST_KERNELS_COUNTER_RNG_H_
