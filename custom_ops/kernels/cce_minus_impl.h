// The vector code of the CCEMinus kernels, compiled once per instruction set.
// NOT a normal header: cce_minus.cc has cpu_isa_variants.h include it once
// per instruction set, with
//   TFREC_ISA_NS  the namespace to define (e.g. avx512),
//   TFREC_ISA_W   floats per vector (16 for AVX-512, 8 for AVX2, 4 otherwise),
//   TFREC_ISA_R   rows per register tile of the shared-negatives GEMM,
// after the std headers, counter_rng.h, CceMinusConsts, CceMinusSharedPack
// and the helper Target. No include guard on purpose.
//
// Pieces (W = floats per vector):
//   GatherDots   out[i] = x . rows[idx[i]]: W rows at a time, each one vector
//                accumulator, then one transposed reduction turns the W
//                accumulators into the vector of W dots (no horizontal sum
//                per row); rows are prefetched two blocks of W ahead.
//   GatherAxpy   acc += sum_i coef[i] rows[idx[i]] (dh).
//   RowIds / RowScores / RowLogSumExp: one row of per-row negatives.
//   CountRows / BackwardRows / BackwardBucket: the per-row backward
//                (histogram, pass A, pass B; see cce_minus.h).
//   ScoreTile / AccumulateTile / RankUpdate (cpu_tiles_impl.h, with the
//                vector primitives and Exp): R x 2W register tiles of the
//                shared-negatives GEMM (scores, dS W, dS^T H) against packed
//                operands.

namespace TFREC_ISA_NS {
namespace {

// W, V, VI, Load / Store / Splat / Max / HSum / HMax / RoundUp / Exp,
// ScoreTile, AccumulateTile, RankUpdate.
#include "custom_ops/kernels/cpu_tiles_impl.h"

constexpr int R = TFREC_ISA_R;
constexpr int kLevels = W == 16 ? 4 : (W == 8 ? 3 : 2);
static_assert((1 << kLevels) == W, "W must be 4, 8 or 16");
// Columns (negatives) per block of the shared GEMM: an [R, kColBlock] score
// tile stays in L1.
constexpr int64_t kColBlock = 256;
static_assert(kColBlock % W == 0, "column block must be whole vectors");

// ---------------------------------------------------------------------------
// Transposed reduction: W vectors in, the vector of their W sums out.
//
// Level l pairs vectors (a, b) whose lanes form groups of s = W >> l lanes
// (each group a partial sum of one input); the result has groups of s / 2:
// group 2g from a's group g, group 2g + 1 from b's group g (two shuffles and
// one add per pair). After log2(W) levels lane i holds the sum of input
// BitRev(i), so inputs are fed in bit-reversed order.

constexpr int BitRev(int i) {
  int r = 0;
  for (int b = 0; b < kLevels; ++b) {
    if ((i >> b) & 1) r |= 1 << (kLevels - 1 - b);
  }
  return r;
}
constexpr int LowLane(int level, int i) {
  const int s = W >> level, h = s / 2, g = i / s, k = i % s;
  return k < h ? g * s + k : W + g * s + (k - h);
}
constexpr int HighLane(int level, int i) {
  const int s = W >> level, h = s / 2, g = i / s, k = i % s;
  return k < h ? g * s + h + k : W + g * s + k;
}

template <int L, int... I>
inline V CombineGroups(V a, V b, std::integer_sequence<int, I...>) {
  const VI low = {LowLane(L, I)...};
  const VI high = {HighLane(L, I)...};
  return __builtin_shuffle(a, b, low) + __builtin_shuffle(a, b, high);
}

template <int L = 0>
inline V TransposeSum(V* v) {
  constexpr int n = W >> (L + 1);
#pragma GCC unroll 16
  for (int k = 0; k < n; ++k) {
    v[k] = CombineGroups<L>(v[2 * k], v[2 * k + 1],
                            std::make_integer_sequence<int, W>());
  }
  if constexpr (L + 1 < kLevels) {
    return TransposeSum<L + 1>(v);
  } else {
    return v[0];
  }
}

inline float Dot(const float* x, const float* y, int64_t D) {
  const int64_t Dv = D / W * W;
  V acc = Splat(0.0f);
  for (int64_t d = 0; d < Dv; d += W) acc += Load(x + d) * Load(y + d);
  float s = HSum(acc);
  for (int64_t d = Dv; d < D; ++d) s += x[d] * y[d];
  return s;
}

inline void PrefetchRow(const float* p, int64_t D) {
  for (int64_t d = 0; d < D; d += 64 / sizeof(float)) __builtin_prefetch(p + d);
}

// out[i] = x . rows[idx[i] * D, +D) for i < n. kD > 0: D == kD (fully
// unrolled); kD == 0: any D.
// How far ahead GatherDots prefetches rows, in blocks of W rows.
constexpr int64_t kPrefetchBlocks = 2;
template <int64_t kD>
inline void GatherDotsImpl(const float* x, const float* rows, int64_t D,
                           const int64_t* idx, int64_t n, float* out) {
  if constexpr (kD > 0) D = kD;
  const int64_t Dv = D / W * W;
  // Rows are prefetched kPrefetchBlocks blocks of W ahead; the first blocks
  // right away.
  for (int64_t u = 0; u < std::min(n, kPrefetchBlocks * W); ++u) {
    PrefetchRow(rows + idx[u] * D, D);
  }
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const int64_t ahead_end = std::min(n, i + (kPrefetchBlocks + 1) * W);
    for (int64_t u = i + kPrefetchBlocks * W; u < ahead_end; ++u) {
      PrefetchRow(rows + idx[u] * D, D);
    }
    V acc[W];
#pragma GCC unroll 16
    for (int u = 0; u < W; ++u) {
      const float* r = rows + idx[i + BitRev(u)] * D;
      V a = Splat(0.0f);
      for (int64_t d = 0; d < Dv; d += W) a += Load(x + d) * Load(r + d);
      acc[u] = a;
    }
    V v = TransposeSum(acc);
    if (Dv < D) {
      for (int u = 0; u < W; ++u) {
        const float* r = rows + idx[i + u] * D;
        float s = 0.0f;
        for (int64_t d = Dv; d < D; ++d) s += x[d] * r[d];
        v[u] += s;
      }
    }
    Store(out + i, v);
  }
  for (; i < n; ++i) out[i] = Dot(x, rows + idx[i] * D, D);
}

inline void GatherDots(const float* x, const float* rows, int64_t D,
                       const int64_t* idx, int64_t n, float* out) {
  switch (D) {
    case 32:
      return GatherDotsImpl<32>(x, rows, D, idx, n, out);
    case 64:
      return GatherDotsImpl<64>(x, rows, D, idx, n, out);
    case 128:
      return GatherDotsImpl<128>(x, rows, D, idx, n, out);
    default:
      return GatherDotsImpl<0>(x, rows, D, idx, n, out);
  }
}

// acc[d] += sum_{i < n} coef[i] rows[idx[i] * D + d] for d < D (acc has
// RoundUp(D) floats). Two interleaved accumulator sets hide FMA latency.
inline void GatherAxpy(const float* coef, const float* rows, int64_t D,
                       const int64_t* idx, int64_t n, float* acc) {
  const int64_t Dv = D / W * W;
  int64_t d0 = 0;
  for (; d0 + 4 * W <= Dv; d0 += 4 * W) {
    V a0 = Load(acc + d0), a1 = Load(acc + d0 + W);
    V a2 = Load(acc + d0 + 2 * W), a3 = Load(acc + d0 + 3 * W);
    V b0 = Splat(0.0f), b1 = b0, b2 = b0, b3 = b0;
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      const float* r = rows + idx[i] * D + d0;
      const float* q = rows + idx[i + 1] * D + d0;
      const V c = Splat(coef[i]), e = Splat(coef[i + 1]);
      a0 += c * Load(r);
      a1 += c * Load(r + W);
      a2 += c * Load(r + 2 * W);
      a3 += c * Load(r + 3 * W);
      b0 += e * Load(q);
      b1 += e * Load(q + W);
      b2 += e * Load(q + 2 * W);
      b3 += e * Load(q + 3 * W);
    }
    if (i < n) {
      const float* r = rows + idx[i] * D + d0;
      const V c = Splat(coef[i]);
      a0 += c * Load(r);
      a1 += c * Load(r + W);
      a2 += c * Load(r + 2 * W);
      a3 += c * Load(r + 3 * W);
    }
    Store(acc + d0, a0 + b0);
    Store(acc + d0 + W, a1 + b1);
    Store(acc + d0 + 2 * W, a2 + b2);
    Store(acc + d0 + 3 * W, a3 + b3);
  }
  for (; d0 < Dv; d0 += W) {
    V a = Load(acc + d0), b = Splat(0.0f);
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      a += Splat(coef[i]) * Load(rows + idx[i] * D + d0);
      b += Splat(coef[i + 1]) * Load(rows + idx[i + 1] * D + d0);
    }
    if (i < n) a += Splat(coef[i]) * Load(rows + idx[i] * D + d0);
    Store(acc + d0, a + b);
  }
  if (Dv < D) {
    for (int64_t i = 0; i < n; ++i) {
      const float* r = rows + idx[i] * D;
      for (int64_t d = Dv; d < D; ++d) acc[d] += coef[i] * r[d];
    }
  }
}

// ---------------------------------------------------------------------------
// Per-row negatives.

// The K negative ids of row t (read, or drawn from the counter-based RNG);
// `coins` is scratch of K floats.
inline void RowIds(const CceMinusArgs& a, const CceMinusConsts& c, int64_t t,
                   int64_t* ids, float* coins) {
  const int64_t K = a.num_negatives, C = a.num_items;
  switch (a.sampling) {
    case CceMinusSampling::kUniform: {
      const uint64_t key = counter_rng::RowKey(c.call_key, a.row_offset + t);
      for (int64_t j = 0; j < K; ++j) {
        ids[j] = counter_rng::UniformDraw(key, j, C);
      }
      return;
    }
    case CceMinusSampling::kUnigram: {
      // counter_rng::UnigramDraw in two loops: the bits, columns and coins
      // (vectorised), then a branch-free pick (the coin flips are random,
      // a branch on them would be mispredicted half the time).
      const uint64_t key = counter_rng::RowKey(c.call_key, a.row_offset + t);
      for (int64_t j = 0; j < K; ++j) {
        const uint64_t bits = counter_rng::DrawBits(key, j);
        ids[j] = counter_rng::Column(bits, C);
        coins[j] = counter_rng::Coin(bits);
      }
      const float* accept = a.alias_accept;
      const int64_t* alias = a.alias_index;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t col = ids[j];
        // All ones when the column is kept (a mask, not a branch).
        const int64_t keep = -static_cast<int64_t>(coins[j] < accept[col]);
        ids[j] = (col & keep) | (alias[col] & ~keep);
      }
      return;
    }
    default:
      if (a.negative_ids64 != nullptr) {
        std::memcpy(ids, a.negative_ids64 + t * K, sizeof(int64_t) * K);
      } else {
        const int32_t* src = a.negative_ids32 + t * K;
        for (int64_t j = 0; j < K; ++j) ids[j] = src[j];
      }
  }
}

// s[j] = s'_tj for j < K (-inf for removed hits), s[j] = -inf for
// K <= j < RoundUp(K). Returns the positive's logit s_{t, y}.
inline float RowScores(const CceMinusArgs& a, const CceMinusConsts& c,
                       int64_t t, int64_t y, const int64_t* ids, float* s) {
  const int64_t D = a.dim, K = a.num_negatives;
  const float* h = a.hidden + t * D;
  const float ninf = -std::numeric_limits<float>::infinity();
  GatherDots(h, a.table, D, ids, K, s);
  if (a.bias != nullptr) {
    for (int64_t j = 0; j < K; ++j) s[j] += a.bias[ids[j]];
  }
  switch (a.sampling) {
    case CceMinusSampling::kUniform:
      for (int64_t j = 0; j < K; ++j) s[j] -= c.uniform_log_kq;
      break;
    case CceMinusSampling::kUnigram:
      for (int64_t j = 0; j < K; ++j) {
        s[j] -= c.log_k + a.log_q_table[ids[j]];
      }
      break;
    default: {
      const float* log_kq = a.negative_log_kq + t * K;
      for (int64_t j = 0; j < K; ++j) s[j] -= log_kq[j];
    }
  }
  if (a.remove_accidental_hits) {
    for (int64_t j = 0; j < K; ++j) {
      if (ids[j] == y) s[j] = ninf;
    }
  }
  for (int64_t j = K; j < RoundUp(K); ++j) s[j] = ninf;
  return Dot(h, a.table + y * D, D) + (a.bias != nullptr ? a.bias[y] : 0.0f);
}

// log(exp(s_pos) + sum_j exp(s[j])) over kp (a multiple of W) scores.
// NaN anywhere gives NaN (it reaches the sum through exp).
inline float RowLogSumExp(const float* s, int64_t kp, float s_pos) {
  V vm = Splat(s_pos);
  for (int64_t j = 0; j < kp; j += W) vm = Max(vm, Load(s + j));
  float m = HMax(vm);
  if (s_pos != s_pos) m = s_pos;
  const V vmax = Splat(m);
  V sum = Splat(0.0f);
  for (int64_t j = 0; j < kp; j += W) sum += Exp(Load(s + j) - vmax);
  return m + std::log(std::exp(s_pos - m) + HSum(sum));
}

struct RowScratch {
  std::vector<int64_t> ids;
  std::vector<float> s;
  std::vector<float> acc;
  explicit RowScratch(const CceMinusArgs& a)
      : ids(std::max<int64_t>(a.num_negatives, 1)),
        s(std::max<int64_t>(RoundUp(a.num_negatives), W)),
        acc(std::max<int64_t>(RoundUp(a.dim), W)) {}
};

void ForwardRows(const CceMinusArgs& a, const CceMinusConsts& c,
                 int64_t begin, int64_t end, float* loss, float* lse) {
  RowScratch scratch(a);
  const int64_t kp = RoundUp(a.num_negatives);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t y = Target(a, t);
    RowIds(a, c, t, scratch.ids.data(), scratch.s.data());
    const float s_pos = RowScores(a, c, t, y, scratch.ids.data(),
                                  scratch.s.data());
    const float l = RowLogSumExp(scratch.s.data(), kp, s_pos);
    lse[t] = l;
    loss[t] = l - s_pos;
  }
}

// Bucketing: counts[n >> shift] += the entries of item n in rows
// [begin, end) (each row's positive, and its negatives but removed hits).
void CountRows(const CceMinusArgs& a, const CceMinusConsts& c, int64_t begin,
               int64_t end, int shift, int64_t* counts) {
  RowScratch scratch(a);
  const int64_t K = a.num_negatives;
  const int64_t* ids = scratch.ids.data();
  for (int64_t t = begin; t < end; ++t) {
    const int64_t y = Target(a, t);
    ++counts[y >> shift];
    RowIds(a, c, t, scratch.ids.data(), scratch.s.data());
    if (a.remove_accidental_hits) {
      for (int64_t j = 0; j < K; ++j) counts[ids[j] >> shift] += ids[j] != y;
    } else {
      for (int64_t j = 0; j < K; ++j) ++counts[ids[j] >> shift];
    }
  }
}

// Pass A, rows [begin, end) (one bucketing chunk): d_hidden rows, and each
// logit's entry (t << shift | item offset, ds) written at
// cursor[item >> shift]++ (positive first, then the negatives in order), so
// that every bucket's entries are in (t, j) order.
template <typename Entry>
void BackwardRows(const CceMinusArgs& a, const CceMinusConsts& c,
                  const float* lse, const float* d_loss, int64_t begin,
                  int64_t end, int shift, float* d_hidden, int64_t* cursor,
                  Entry* entries) {
  using Key = decltype(Entry::key);
  RowScratch scratch(a);
  const int64_t D = a.dim, K = a.num_negatives, kp = RoundUp(K);
  const Key mask = static_cast<Key>((uint64_t{1} << shift) - 1);
  const int64_t* ids = scratch.ids.data();
  float* s = scratch.s.data();
  float* acc = scratch.acc.data();
  for (int64_t t = begin; t < end; ++t) {
    const int64_t y = Target(a, t);
    RowIds(a, c, t, scratch.ids.data(), s);
    const float s_pos = RowScores(a, c, t, y, ids, s);
    const float g = d_loss[t];
    const V vl = Splat(lse[t]), vg = Splat(g);
    for (int64_t j = 0; j < kp; j += W) {
      Store(s + j, vg * Exp(Load(s + j) - vl));
    }
    const float ds_pos = g * (std::exp(s_pos - lse[t]) - 1.0f);
    const float* wy = a.table + y * D;
    for (int64_t d = 0; d < D; ++d) acc[d] = ds_pos * wy[d];
    GatherAxpy(s, a.table, D, ids, K, acc);
    std::memcpy(d_hidden + t * D, acc, sizeof(float) * D);
    const Key row = static_cast<Key>(t) << shift;
    entries[cursor[y >> shift]++] = Entry{row | (static_cast<Key>(y) & mask),
                                          ds_pos};
    for (int64_t j = 0; j < K; ++j) {
      const int64_t n = ids[j];
      if (a.remove_accidental_hits && n == y) continue;
      entries[cursor[n >> shift]++] =
          Entry{row | (static_cast<Key>(n) & mask), s[j]};
    }
  }
}

// Pass B, one bucket: the d_table (and d_bias) rows of items [lo, hi),
// dw_n = sum of ds h_t over the bucket's entries of item n, in their
// (t, j) order. The bucket's rows of d_table stay in L2 while it runs.
// kD > 0: D == kD (unrolled).
template <int64_t kD, typename Entry>
void BackwardBucketImpl(const CceMinusArgs& a, const Entry* entries,
                        int64_t count, int shift, int64_t lo, int64_t hi,
                        float* d_table, float* d_bias) {
  using Key = decltype(Entry::key);
  const Key mask = static_cast<Key>((uint64_t{1} << shift) - 1);
  const int64_t D = kD > 0 ? kD : a.dim;
  const int64_t Dv = D / W * W;
  const float* hidden = a.hidden;
  float* out = d_table + lo * D;
  std::memset(out, 0, sizeof(float) * (hi - lo) * D);
  if (d_bias != nullptr) std::memset(d_bias + lo, 0, sizeof(float) * (hi - lo));
  constexpr int64_t kAhead = 8;  // entries whose h rows are prefetched
  for (int64_t e = 0; e < count; ++e) {
    if (e + kAhead < count) {
      PrefetchRow(hidden + static_cast<int64_t>(entries[e + kAhead].key >>
                                                shift) * D, D);
    }
    const Entry entry = entries[e];
    const int64_t item = static_cast<int64_t>(entry.key & mask);
    const float* h = hidden + static_cast<int64_t>(entry.key >> shift) * D;
    float* dw = out + item * D;
    const V vds = Splat(entry.ds);
#pragma GCC unroll 16
    for (int64_t d = 0; d < Dv; d += W) {
      Store(dw + d, Load(dw + d) + vds * Load(h + d));
    }
    for (int64_t d = Dv; d < D; ++d) dw[d] += entry.ds * h[d];
    if (d_bias != nullptr) d_bias[lo + item] += entry.ds;
  }
}

template <typename Entry>
void BackwardBucket(const CceMinusArgs& a, const Entry* entries,
                    int64_t count, int shift, int64_t lo, int64_t hi,
                    float* d_table, float* d_bias) {
  switch (a.dim) {
    case 32:
      return BackwardBucketImpl<32>(a, entries, count, shift, lo, hi,
                                    d_table, d_bias);
    case 64:
      return BackwardBucketImpl<64>(a, entries, count, shift, lo, hi,
                                    d_table, d_bias);
    case 128:
      return BackwardBucketImpl<128>(a, entries, count, shift, lo, hi,
                                     d_table, d_bias);
    default:
      return BackwardBucketImpl<0>(a, entries, count, shift, lo, hi,
                                   d_table, d_bias);
  }
}

// ---------------------------------------------------------------------------
// Shared negatives (tiles: cpu_tiles_impl.h).

// Rows of R: the positives' logits and, for hit removal, the range of
// `pack.sorted` entries equal to each row's target.
struct SharedRowBlock {
  int64_t rows = 0;
  float s_pos[R];
  int64_t hit_begin[R];
  int64_t hit_end[R];
};

inline void PrepareSharedBlock(const CceMinusArgs& a,
                               const CceMinusSharedPack& pack, int64_t i0,
                               int64_t rows, SharedRowBlock* blk) {
  const int64_t D = a.dim;
  blk->rows = rows;
  for (int r = 0; r < R; ++r) {
    blk->s_pos[r] = 0.0f;
    blk->hit_begin[r] = blk->hit_end[r] = 0;
    if (r >= rows) continue;
    const int64_t t = i0 + r, y = Target(a, t);
    blk->s_pos[r] = Dot(a.hidden + t * D, a.table + y * D, D) +
                    (a.bias != nullptr ? a.bias[y] : 0.0f);
    if (a.remove_accidental_hits && a.num_negatives > 0) {
      const int64_t* ids = pack.sorted_ids;
      const int64_t* lo = std::lower_bound(ids, ids + a.num_negatives, y);
      const int64_t* hi = std::upper_bound(lo, ids + a.num_negatives, y);
      blk->hit_begin[r] = lo - ids;
      blk->hit_end[r] = hi - ids;
    }
  }
}

// Adds the corrections (off) to row r's scores of columns [jb, jb + nc) and
// masks its hits.
inline void CorrectSharedRow(const CceMinusSharedPack& pack,
                             const SharedRowBlock& blk, int r, int64_t jb,
                             int64_t nc, float* row) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < nc; j += W) {
    Store(row + j, Load(row + j) + Load(pack.off + jb + j));
  }
  for (int64_t h = blk.hit_begin[r]; h < blk.hit_end[r]; ++h) {
    const int64_t j = pack.sorted_pos[h];
    if (j >= jb && j < jb + nc) row[j - jb] = ninf;
  }
}

void SharedForwardRows(const CceMinusArgs& a, const CceMinusSharedPack& pack,
                       int64_t begin, int64_t end, float* loss, float* lse) {
  const int64_t D = a.dim, kp = pack.kp;
  std::vector<float> S(R * kColBlock);
  std::vector<float> hb(R * std::max<int64_t>(D, 1));
  SharedRowBlock blk;
  float m[R], l[R];
  for (int64_t i0 = begin; i0 < end; i0 += R) {
    const int64_t rows = std::min<int64_t>(R, end - i0);
    const float* h = a.hidden + i0 * D;
    if (rows < R) {
      std::fill(hb.begin(), hb.end(), 0.0f);
      std::memcpy(hb.data(), h, sizeof(float) * rows * D);
      h = hb.data();
    }
    PrepareSharedBlock(a, pack, i0, rows, &blk);
    for (int r = 0; r < R; ++r) {
      m[r] = blk.s_pos[r];
      l[r] = 1.0f;
    }
    for (int64_t jb = 0; jb < kp; jb += kColBlock) {
      const int64_t nc = std::min(kColBlock, kp - jb);
      ScoreTile<R>(h, D, D, pack.wT + jb, kp, nc, S.data(), kColBlock);
      for (int r = 0; r < rows; ++r) {
        float* row = S.data() + r * kColBlock;
        CorrectSharedRow(pack, blk, r, jb, nc, row);
        V vm = Splat(m[r]);
        for (int64_t j = 0; j < nc; j += W) vm = Max(vm, Load(row + j));
        float m_new = HMax(vm);
        if (m[r] != m[r]) m_new = m[r];
        const V vmax = Splat(m_new);
        V sum = Splat(0.0f);
        for (int64_t j = 0; j < nc; j += W) sum += Exp(Load(row + j) - vmax);
        l[r] = l[r] * std::exp(m[r] - m_new) + HSum(sum);
        m[r] = m_new;
      }
    }
    for (int r = 0; r < rows; ++r) {
      const float v = m[r] + std::log(l[r]);
      lse[i0 + r] = v;
      loss[i0 + r] = v - blk.s_pos[r];
    }
  }
}

// Rows [begin, end): d_hidden rows, the target rows K + t of d_table (and
// d_bias), and this chunk's partial dW_neg [Kp, Dp] and db_neg [Kp] (added
// to; zero them first).
void SharedBackwardRows(const CceMinusArgs& a, const CceMinusSharedPack& pack,
                        const float* lse, const float* d_loss, int64_t begin,
                        int64_t end, float* partial_dw, float* partial_db,
                        const CceMinusGrads& grads) {
  const int64_t D = a.dim, Dp = pack.dp;
  const int64_t K = a.num_negatives, kp = pack.kp;
  std::vector<float> S(R * kColBlock);
  std::vector<float> hb(R * Dp), dhb(R * Dp);
  SharedRowBlock blk;
  float g[R], ds_pos[R];
  V vl[R];
  for (int64_t i0 = begin; i0 < end; i0 += R) {
    const int64_t rows = std::min<int64_t>(R, end - i0);
    std::fill(hb.begin(), hb.end(), 0.0f);
    std::fill(dhb.begin(), dhb.end(), 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(hb.data() + r * Dp, a.hidden + (i0 + r) * D,
                  sizeof(float) * D);
    }
    PrepareSharedBlock(a, pack, i0, rows, &blk);
    for (int r = 0; r < R; ++r) {
      g[r] = r < rows ? d_loss[i0 + r] : 0.0f;
      vl[r] = Splat(r < rows ? lse[i0 + r] : 0.0f);
      ds_pos[r] = r < rows ? g[r] * (std::exp(blk.s_pos[r] - lse[i0 + r]) -
                                     1.0f)
                           : 0.0f;
    }
    for (int64_t jb = 0; jb < kp; jb += kColBlock) {
      const int64_t nc = std::min(kColBlock, kp - jb);
      const int64_t nk = std::min(nc, K - jb);
      ScoreTile<R>(hb.data(), Dp, D, pack.wT + jb, kp, nc, S.data(),
                   kColBlock);
      for (int r = 0; r < R; ++r) {
        float* row = S.data() + r * kColBlock;
        if (r >= rows) {
          std::memset(row, 0, sizeof(float) * nc);
          continue;
        }
        CorrectSharedRow(pack, blk, r, jb, nc, row);
        const V vg = Splat(g[r]);
        for (int64_t j = 0; j < nc; j += W) {
          const V p = vg * Exp(Load(row + j) - vl[r]);
          Store(row + j, p);
          Store(partial_db + jb + j, Load(partial_db + jb + j) + p);
        }
      }
      AccumulateTile<R>(S.data(), kColBlock, nk, pack.wrows + jb * Dp, Dp, Dp,
                        dhb.data(), Dp);
      RankUpdate<R>(S.data(), kColBlock, nk, hb.data(), Dp, Dp,
                    partial_dw + jb * Dp, Dp);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = i0 + r, y = Target(a, t);
      const float* wy = a.table + y * D;
      const float* h = a.hidden + t * D;
      float* dh = grads.d_hidden + t * D;
      float* dw = grads.d_table + (K + t) * D;
      for (int64_t d = 0; d < D; ++d) {
        dh[d] = dhb[r * Dp + d] + ds_pos[r] * wy[d];
        dw[d] = ds_pos[r] * h[d];
      }
      if (grads.d_bias != nullptr) grads.d_bias[K + t] = ds_pos[r];
    }
  }
}

}  // namespace

void ForwardRowsEntry(const CceMinusArgs& a, const CceMinusConsts& c,
                      int64_t begin, int64_t end, float* loss, float* lse) {
  ForwardRows(a, c, begin, end, loss, lse);
}

void CountRowsEntry(const CceMinusArgs& a, const CceMinusConsts& c,
                    int64_t begin, int64_t end, int shift, int64_t* counts) {
  CountRows(a, c, begin, end, shift, counts);
}

template <typename Entry>
void BackwardRowsEntry(const CceMinusArgs& a, const CceMinusConsts& c,
                       const float* lse, const float* d_loss, int64_t begin,
                       int64_t end, int shift, float* d_hidden,
                       int64_t* cursor, Entry* entries) {
  BackwardRows<Entry>(a, c, lse, d_loss, begin, end, shift, d_hidden, cursor,
                      entries);
}

template <typename Entry>
void BackwardBucketEntry(const CceMinusArgs& a, const Entry* entries,
                         int64_t count, int shift, int64_t lo, int64_t hi,
                         float* d_table, float* d_bias) {
  BackwardBucket<Entry>(a, entries, count, shift, lo, hi, d_table, d_bias);
}

void SharedForwardRowsEntry(const CceMinusArgs& a,
                            const CceMinusSharedPack& pack, int64_t begin,
                            int64_t end, float* loss, float* lse) {
  SharedForwardRows(a, pack, begin, end, loss, lse);
}

void SharedBackwardRowsEntry(const CceMinusArgs& a,
                             const CceMinusSharedPack& pack, const float* lse,
                             const float* d_loss, int64_t begin, int64_t end,
                             float* partial_dw, float* partial_db,
                             const CceMinusGrads& grads) {
  SharedBackwardRows(a, pack, lse, d_loss, begin, end, partial_dw, partial_db,
                     grads);
}

}  // namespace TFREC_ISA_NS
