// CCEMinus on the CPU: work split, bucketing of the per-row draws by item,
// packing of shared negatives, and the dispatch to the vector code in
// cce_minus_impl.h (one copy per instruction set: cpu_isa.h). See
// cce_minus.h for the algorithm.
#include "custom_ops/kernels/cce_minus.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

#include "custom_ops/kernels/counter_rng.h"
#include "custom_ops/kernels/cpu_isa.h"

namespace tfrec_fast {
namespace kernels {

// Per-call constants of the generated modes.
struct CceMinusConsts {
  uint64_t call_key = 0;       // counter_rng::CallKey(seed, step)
  float log_k = 0.0f;          // float(log(double(K)))
  float uniform_log_kq = 0.0f;  // float(log(double(K)) - log(double(C)))
};

// Shared negatives, packed once per call (layouts depend on the vector
// width W of the chosen instruction set).
struct CceMinusSharedPack {
  int64_t kp = 0;               // K rounded up to a multiple of W
  int64_t dp = 0;               // D rounded up to a multiple of W (>= W)
  const float* wT = nullptr;    // [D, kp]: w_{n_j}[d] at d * kp + j, 0 pad
  const float* wrows = nullptr;  // [kp, dp]: w_{n_j} rows, 0 pad (backward)
  const float* off = nullptr;   // [kp]: b_{n_j} - log_kq_j; -inf for j >= K
  const int64_t* sorted_ids = nullptr;  // [K] negative ids, ascending
  const int64_t* sorted_pos = nullptr;  // [K] their positions j
};

// One logit's gradient in the per-row backward, bucketed by item:
// key = t << shift | (item's offset in its bucket of 2^shift items), and
// ds = d objective / d logit. KeyT: uint32_t when the keys fit (8 bytes an
// entry), else uint64_t (packed: 12 bytes).
template <typename KeyT>
struct __attribute__((packed)) CceMinusEntry {
  KeyT key;
  float ds;
};

namespace {

inline int64_t Target(const CceMinusArgs& a, int64_t t) {
  return a.targets64 != nullptr ? a.targets64[t]
                                : static_cast<int64_t>(a.targets32[t]);
}

inline int64_t SharedNegative(const CceMinusArgs& a, int64_t j) {
  return a.negative_ids64 != nullptr
             ? a.negative_ids64[j]
             : static_cast<int64_t>(a.negative_ids32[j]);
}

}  // namespace

namespace cm_impl {
#define TFREC_ISA_IMPL "custom_ops/kernels/cce_minus_impl.h"
#include "custom_ops/kernels/cpu_isa_variants.h"
}  // namespace cm_impl

namespace {

// Floats per vector of the chosen instruction set (TFREC_ISA_W).
int VectorWidth() { return CpuIsaVectorFloats(GetCpuIsa()); }

// Rows per task of the per-row passes (each row gathers K table rows).
constexpr int64_t kRowsPerTask = 32;
// Rows per task of the shared forward (a multiple of every R).
constexpr int64_t kSharedRowsPerTask = 64;
// Rows per chunk of the shared backward: one partial dW_neg per chunk.
constexpr int64_t kSharedChunkRows = 256;
// Cap on the shared backward's partials (floats: 64 MiB).
constexpr int64_t kMaxPartialFloats = int64_t{16} << 20;
// d_table bytes of one per-row pass-B bucket (kept in L2 while it is
// summed).
constexpr int64_t kBucketBytes = int64_t{256} << 10;

void Run(const CceMinusParallelFor& parallel, int64_t n,
         const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (!parallel || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  parallel(n, fn);
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

CceMinusConsts MakeConsts(const CceMinusArgs& a) {
  CceMinusConsts c;
  c.call_key = counter_rng::CallKey(a.seed, a.step);
  const double log_k =
      std::log(static_cast<double>(std::max<int64_t>(a.num_negatives, 1)));
  c.log_k = static_cast<float>(log_k);
  c.uniform_log_kq =
      a.num_items > 0
          ? static_cast<float>(log_k -
                               std::log(static_cast<double>(a.num_items)))
          : 0.0f;
  return c;
}

struct SharedPackStorage {
  std::vector<float> wT, wrows, off;
  std::vector<int64_t> sorted_ids, sorted_pos;
  CceMinusSharedPack pack;
};

void BuildSharedPack(const CceMinusArgs& a, bool with_rows,
                     SharedPackStorage* st) {
  const int64_t K = a.num_negatives, D = a.dim;
  const int64_t w = VectorWidth();
  const int64_t kp = CeilDiv(K, w) * w;
  const int64_t dp = std::max<int64_t>(CeilDiv(D, w) * w, w);
  st->wT.assign(static_cast<size_t>(D * kp), 0.0f);
  st->off.assign(static_cast<size_t>(kp),
                 -std::numeric_limits<float>::infinity());
  if (with_rows) st->wrows.assign(static_cast<size_t>(kp * dp), 0.0f);
  std::vector<std::pair<int64_t, int64_t>> sorted(static_cast<size_t>(K));
  for (int64_t j = 0; j < K; ++j) {
    const int64_t id = SharedNegative(a, j);
    const float* row = a.table + id * D;
    for (int64_t d = 0; d < D; ++d) st->wT[d * kp + j] = row[d];
    if (with_rows) std::memcpy(&st->wrows[j * dp], row, sizeof(float) * D);
    st->off[j] =
        (a.bias != nullptr ? a.bias[id] : 0.0f) - a.negative_log_kq[j];
    sorted[j] = {id, j};
  }
  std::sort(sorted.begin(), sorted.end());
  st->sorted_ids.resize(static_cast<size_t>(K));
  st->sorted_pos.resize(static_cast<size_t>(K));
  for (int64_t j = 0; j < K; ++j) {
    st->sorted_ids[j] = sorted[j].first;
    st->sorted_pos[j] = sorted[j].second;
  }
  st->pack.kp = kp;
  st->pack.dp = dp;
  st->pack.wT = st->wT.data();
  st->pack.wrows = with_rows ? st->wrows.data() : nullptr;
  st->pack.off = st->off.data();
  st->pack.sorted_ids = st->sorted_ids.data();
  st->pack.sorted_pos = st->sorted_pos.data();
}

void SharedBackward(const CceMinusArgs& a, const float* lse,
                    const float* d_loss, const CceMinusGrads& grads,
                    const CceMinusParallelFor& parallel) {
  const int64_t N = a.num_rows, K = a.num_negatives, D = a.dim;
  SharedPackStorage st;
  BuildSharedPack(a, /*with_rows=*/true, &st);
  const CceMinusSharedPack& pack = st.pack;
  const int64_t per_chunk = pack.kp * pack.dp + pack.kp;
  // The chunking depends on the shapes only: the sums are the same for any
  // number of threads.
  int64_t rows_per_chunk = kSharedChunkRows;
  const int64_t max_chunks =
      std::max<int64_t>(1, kMaxPartialFloats / std::max<int64_t>(per_chunk, 1));
  if (CeilDiv(N, rows_per_chunk) > max_chunks) {
    rows_per_chunk = CeilDiv(CeilDiv(N, max_chunks), 16) * 16;
  }
  const int64_t chunks = CeilDiv(N, rows_per_chunk);
  std::vector<float> partial_dw(static_cast<size_t>(chunks * pack.kp * pack.dp),
                                0.0f);
  std::vector<float> partial_db(static_cast<size_t>(chunks * pack.kp), 0.0f);
  Run(parallel, chunks, [&](int64_t c) {
    const int64_t begin = c * rows_per_chunk;
    const int64_t end = std::min(N, begin + rows_per_chunk);
    float* pdw = partial_dw.data() + c * pack.kp * pack.dp;
    float* pdb = partial_db.data() + c * pack.kp;
    TFREC_FAST_ISA_DISPATCH(
        cm_impl, SharedBackwardRowsEntry(a, pack, lse, d_loss, begin, end,
                                         pdw, pdb, grads));
  });
  // dW_neg[j] = sum of the chunks' partials, in chunk order.
  constexpr int64_t kReduceRows = 64;
  Run(parallel, CeilDiv(K, kReduceRows), [&](int64_t b) {
    std::vector<float> row(static_cast<size_t>(pack.dp));
    const int64_t j_end = std::min(K, (b + 1) * kReduceRows);
    for (int64_t j = b * kReduceRows; j < j_end; ++j) {
      std::fill(row.begin(), row.end(), 0.0f);
      float bias_sum = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* p = partial_dw.data() + (c * pack.kp + j) * pack.dp;
        for (int64_t d = 0; d < pack.dp; ++d) row[d] += p[d];
        bias_sum += partial_db[c * pack.kp + j];
      }
      std::memcpy(grads.d_table + j * D, row.data(), sizeof(float) * D);
      if (grads.d_bias != nullptr) grads.d_bias[j] = bias_sum;
    }
  });
}

// Buckets of 2^shift items: at most kBucketBytes of d_table rows (an L2's
// worth) and at least about 4 buckets per worker.
int BucketShift(const CceMinusArgs& a, int64_t workers) {
  int shift = 20;
  while (shift > 0 &&
         ((int64_t{1} << shift) * std::max<int64_t>(a.dim, 1) * 4 >
              kBucketBytes ||
          (int64_t{1} << shift) * 4 * workers > a.num_items)) {
    --shift;
  }
  return shift;
}

template <typename Entry>
void PerRowBackward(const CceMinusArgs& a, const CceMinusConsts& consts,
                    const float* lse, const float* d_loss,
                    const CceMinusGrads& grads, int shift, int num_workers,
                    const CceMinusParallelFor& parallel) {
  const int64_t N = a.num_rows, C = a.num_items;
  const int64_t workers = std::max(num_workers, 1);
  const int64_t bucket_items = int64_t{1} << shift;
  const int64_t buckets = CeilDiv(C, bucket_items);
  // Chunks: contiguous row ranges, each with its per-bucket histogram (then
  // cursors). Filled in row order, every bucket's entries end up in
  // increasing (t, j) order whatever the chunking.
  int64_t chunks = std::min<int64_t>(16 * workers, CeilDiv(N, 32));
  const int64_t rows_per_chunk = CeilDiv(N, std::max<int64_t>(chunks, 1));
  chunks = CeilDiv(N, rows_per_chunk);
  std::vector<int64_t> counts(static_cast<size_t>(chunks * buckets), 0);
  Run(parallel, chunks, [&](int64_t c) {
    const int64_t begin = c * rows_per_chunk;
    const int64_t end = std::min(N, begin + rows_per_chunk);
    TFREC_FAST_ISA_DISPATCH(
        cm_impl, CountRowsEntry(a, consts, begin, end, shift,
                                counts.data() + c * buckets));
  });
  std::vector<int64_t> start(static_cast<size_t>(buckets + 1));
  int64_t total = 0;
  for (int64_t b = 0; b < buckets; ++b) {
    start[b] = total;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k = counts[c * buckets + b];
      counts[c * buckets + b] = total;  // now chunk c's cursor for bucket b
      total += k;
    }
  }
  start[buckets] = total;

  // Pass A: d_hidden and the entries, by chunk. (Not value-initialised:
  // every entry is written.)
  std::unique_ptr<Entry[]> entries(new Entry[std::max<int64_t>(total, 1)]);
  Run(parallel, chunks, [&](int64_t c) {
    const int64_t begin = c * rows_per_chunk;
    const int64_t end = std::min(N, begin + rows_per_chunk);
    TFREC_FAST_ISA_DISPATCH(
        cm_impl, BackwardRowsEntry<Entry>(
                     a, consts, lse, d_loss, begin, end, shift, grads.d_hidden,
                     counts.data() + c * buckets, entries.get()));
  });

  // Pass B: buckets (item ranges), largest first.
  std::vector<int64_t> order(static_cast<size_t>(buckets));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return start[x + 1] - start[x] > start[y + 1] - start[y];
  });
  Run(parallel, buckets, [&](int64_t i) {
    const int64_t b = order[i];
    const int64_t lo = b * bucket_items;
    const int64_t hi = std::min(C, lo + bucket_items);
    TFREC_FAST_ISA_DISPATCH(
        cm_impl, BackwardBucketEntry<Entry>(
                     a, entries.get() + start[b], start[b + 1] - start[b],
                     shift, lo, hi, grads.d_table, grads.d_bias));
  });
}

}  // namespace

int64_t CceMinusGradTableRows(const CceMinusArgs& args) {
  return args.sampling == CceMinusSampling::kGivenShared
             ? args.num_negatives + args.num_rows
             : args.num_items;
}

void CceMinusForward(const CceMinusArgs& args, float* loss, float* lse,
                     int num_workers, const CceMinusParallelFor& parallel) {
  (void)num_workers;
  const int64_t N = args.num_rows;
  if (N == 0) return;
  if (args.sampling == CceMinusSampling::kGivenShared) {
    SharedPackStorage st;
    BuildSharedPack(args, /*with_rows=*/false, &st);
    Run(parallel, CeilDiv(N, kSharedRowsPerTask), [&](int64_t i) {
      const int64_t begin = i * kSharedRowsPerTask;
      const int64_t end = std::min(N, begin + kSharedRowsPerTask);
      TFREC_FAST_ISA_DISPATCH(
          cm_impl,
          SharedForwardRowsEntry(args, st.pack, begin, end, loss, lse));
    });
    return;
  }
  const CceMinusConsts consts = MakeConsts(args);
  Run(parallel, CeilDiv(N, kRowsPerTask), [&](int64_t i) {
    const int64_t begin = i * kRowsPerTask;
    const int64_t end = std::min(N, begin + kRowsPerTask);
    TFREC_FAST_ISA_DISPATCH(
        cm_impl, ForwardRowsEntry(args, consts, begin, end, loss, lse));
  });
}

void CceMinusBackward(const CceMinusArgs& args, const float* lse,
                      const float* d_loss, const CceMinusGrads& grads,
                      int num_workers, const CceMinusParallelFor& parallel) {
  const int64_t N = args.num_rows;
  const int64_t rows = CceMinusGradTableRows(args);
  if (N == 0) {
    std::memset(grads.d_table, 0, sizeof(float) * rows * args.dim);
    if (grads.d_bias != nullptr) {
      std::memset(grads.d_bias, 0, sizeof(float) * rows);
    }
    return;
  }
  if (args.sampling == CceMinusSampling::kGivenShared) {
    SharedBackward(args, lse, d_loss, grads, parallel);
    return;
  }
  const CceMinusConsts consts = MakeConsts(args);
  const int shift = BucketShift(args, std::max(num_workers, 1));
  const uint64_t max_key = (static_cast<uint64_t>(N - 1) << shift) |
                           ((uint64_t{1} << shift) - 1);
  if (max_key <= std::numeric_limits<uint32_t>::max()) {
    PerRowBackward<CceMinusEntry<uint32_t>>(args, consts, lse, d_loss, grads,
                                            shift, num_workers, parallel);
  } else {
    PerRowBackward<CceMinusEntry<uint64_t>>(args, consts, lse, d_loss, grads,
                                            shift, num_workers, parallel);
  }
}

}  // namespace kernels
}  // namespace tfrec_fast
