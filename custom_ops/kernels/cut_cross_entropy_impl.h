// The vector code of the cut cross-entropy kernels, compiled once per
// instruction set. NOT a normal header: cut_cross_entropy.cc has
// cpu_isa_variants.h include it once per instruction set, with
//   TFREC_ISA_NS  the namespace to define (e.g. avx512),
//   TFREC_ISA_W   floats per vector (16 for AVX-512, 8 for AVX2, 4 otherwise),
//   TFREC_ISA_R   rows per register tile,
// after the std headers and aligned_floats.h. No include guard on purpose.
//
// See cut_cross_entropy.h for the algorithm. The tiles (cpu_tiles_impl.h)
// are used as (R rows t, one block of kCceItemBlock items c):
//   ScoreTile       S[t, c] = h_t . w_c            (a = h rows, bT = W^T)
//   AccumulateTile  dH[t, :] += sum_c dS[t, c] w_c  (b = W rows)
//   RankUpdate      dW[c, :] += sum_t dS[t, c] h_t  (a = h rows)

namespace TFREC_ISA_NS {
namespace {

#include "custom_ops/kernels/cpu_tiles_impl.h"

constexpr int R = TFREC_ISA_R;
constexpr int64_t kBlock = kCceItemBlock;
constexpr int64_t kStride = kCceItemStride;
static_assert(kBlock % (2 * W) == 0, "item block must be whole tiles");
static_assert(kStride % W == 0, "packed stride must be whole vectors");
static_assert(kCceRowChunk % R == 0, "row chunk must be whole tiles");
static_assert(kCceRowAlign % R == 0, "row padding must be whole tiles");

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct ForwardScratch {
  AlignedFloats tail, s, m, l, target_logit;
};

// Rows [r0, r1) (at most kCceRowChunk): loss and lse. Item blocks outside,
// row tiles inside, so a block's packed W^T (D x kStride floats) stays in L2
// while every row of the chunk meets it.
//
// The running (max, sum) of each row is kept per vector lane (lane k sees
// the items c = k mod W of every block) and the lanes are merged once per
// chunk: no horizontal max / sum and no scalar exp per row and block, which
// would cost about a tenth of the ScoreTile time.
void ForwardChunk(const CutCrossEntropyDims& dims,
                  const CutCrossEntropyForwardArgs& args, int64_t r0,
                  int64_t r1, ForwardScratch* scratch) {
  const int64_t D = dims.dim, C = dims.num_items;
  const int64_t num_blocks = (C + kBlock - 1) / kBlock;
  const float* packed = args.workspace;
  const float* bias_all = packed + num_blocks * D * kStride;
  float* tail = scratch->tail.Get(R * D);
  float* S = scratch->s.Get(R * kBlock);
  float* m = scratch->m.Get(kCceRowChunk * W);
  float* l = scratch->l.Get(kCceRowChunk * W);
  float* sy = scratch->target_logit.Get(kCceRowChunk);
  const int64_t n = r1 - r0;
  for (int64_t i = 0; i < n; ++i) {
    Store(m + i * W, Splat(kNegInf));
    Store(l + i * W, Splat(0.0f));
    sy[i] = kNaN;  // every target is in some block; set there
  }
  // The last tile of the chunk may be short: its rows are copied, zero
  // padded, so ScoreTile can always compute R rows.
  const int64_t full_end = r0 + n / R * R;
  if (full_end < r1) {
    std::memset(tail, 0, sizeof(float) * R * D);
    std::memcpy(tail, args.hidden + full_end * D,
                sizeof(float) * (r1 - full_end) * D);
  }
  const V ninf = Splat(kNegInf);
  const V zero = Splat(0.0f);
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    const int64_t c0 = blk * kBlock;
    const int64_t nk = std::min(kBlock, C - c0);
    const int64_t nkp = RoundUp(nk);
    const float* wt = packed + blk * D * kStride;
    const float* bias = bias_all + blk * kBlock;
    for (int64_t t0 = r0; t0 < r1; t0 += R) {
      const int64_t rows = std::min<int64_t>(R, r1 - t0);
      const float* a = t0 < full_end ? args.hidden + t0 * D : tail;
      ScoreTile<R>(a, D, D, wt, kStride, nkp, 1.0f, S, kBlock);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = t0 - r0 + r;
        float* srow = S + r * kBlock;
        // Pass 1: add the bias (-inf on padded items), per-lane block max.
        V mx = ninf;
        for (int64_t j = 0; j < nkp; j += W) {
          const V s = Load(srow + j) + Load(bias + j);
          Store(srow + j, s);
          mx = Max(mx, s);
        }
        const int64_t y = args.targets[t0 + r] - c0;
        if (y >= 0 && y < nk) sy[i] = srow[y];
        // Pass 2: rescale the lane sums to the new lane max and add this
        // block's exp(s - max). A lane with no finite logit yet shifts by 0
        // (its exps are 0, not NaN); a NaN logit stays NaN in its lane.
        const V m_old = Load(m + i * W);
        const V m_new = Max(m_old, mx);
        const V shift = m_new == ninf ? zero : m_new;
        V sum0 = Load(l + i * W) * Exp(m_old - shift);
        V sum1 = zero;
        int64_t j = 0;
        for (; j + 2 * W <= nkp; j += 2 * W) {
          sum0 += Exp(Load(srow + j) - shift);
          sum1 += Exp(Load(srow + j + W) - shift);
        }
        if (j < nkp) sum0 += Exp(Load(srow + j) - shift);
        Store(m + i * W, m_new);
        Store(l + i * W, sum0 + sum1);
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* mi = m + i * W;
    const float* li = l + i * W;
    float top = kNegInf;
    for (int64_t k = 0; k < W; ++k) top = mi[k] > top ? mi[k] : top;
    float sum = 0.0f;
    for (int64_t k = 0; k < W; ++k) {
      // Lanes without a finite logit hold l = 0 (or NaN, which must stay).
      sum += top == kNegInf || li[k] == 0.0f ? li[k]
                                             : li[k] * std::exp(mi[k] - top);
    }
    // sum == 0: every logit was -inf. A NaN sum stays NaN.
    const float lse = sum == 0.0f ? kNegInf : top + std::log(sum);
    args.lse[r0 + i] = lse;
    args.loss[r0 + i] = lse - sy[i];
  }
}

struct BackwardScratch {
  AlignedFloats wt, wr, dw, db, bias, s;
};

// dS = g (exp(S + bias - lse) - onehot(y)) in place for the R rows of tile
// t0 (live-row indices; rows past the last live one get 0).
inline void SoftmaxGrad(const CutCrossEntropyBackwardArgs& args,
                        const CutCrossEntropyBackwardPlan& plan, int64_t t0,
                        int64_t c0, int64_t nk, int64_t nkp, const float* bias,
                        float* S) {
  const int64_t live = static_cast<int64_t>(plan.rows.size());
  for (int r = 0; r < R; ++r) {
    float* srow = S + r * kBlock;
    const int64_t i = t0 + r;
    if (i >= live) {
      std::memset(srow, 0, sizeof(float) * nkp);
      continue;
    }
    const int64_t row = plan.rows[i];
    const float g = args.d_loss[row];
    const V vg = Splat(g);
    const V vlse = Splat(args.lse[row]);
    for (int64_t j = 0; j < nkp; j += W) {
      Store(srow + j, vg * Exp(Load(srow + j) + Load(bias + j) - vlse));
    }
    const int64_t y = args.targets[row] - c0;
    if (y >= 0 && y < nk) srow[y] -= g;  // the row's target is in this block
  }
}

// Item blocks of group `group`: their dW rows and db entries, and the
// group's dH partial (zeroed here, by the thread that fills it).
void BackwardGroup(const CutCrossEntropyDims& dims,
                   const CutCrossEntropyBackwardArgs& args,
                   const CutCrossEntropyBackwardPlan& plan, int64_t group,
                   BackwardScratch* scratch) {
  const int64_t D = dims.dim, C = dims.num_items;
  const int64_t Dp = plan.padded_dim;
  const int64_t live = static_cast<int64_t>(plan.rows.size());
  const int64_t tiles_end = (live + R - 1) / R * R;
  const float* hp = args.workspace;  // [padded_rows, Dp], live rows of h
  float* partial = args.workspace + plan.partial_offset +
                   group * plan.padded_rows * Dp;
  std::memset(partial, 0, sizeof(float) * tiles_end * Dp);

  float* wt = scratch->wt.Get(D * kStride);
  float* wr = scratch->wr.Get(kBlock * Dp);
  float* dw = scratch->dw.Get(kBlock * Dp);
  float* db = scratch->db.Get(kBlock);
  float* bias = scratch->bias.Get(kBlock);
  float* S = scratch->s.Get(R * kBlock);

  for (int64_t blk = plan.block_begin[group];
       blk < plan.block_begin[group + 1]; ++blk) {
    const int64_t c0 = blk * kBlock;
    const int64_t nk = std::min(kBlock, C - c0);
    const int64_t nkp = RoundUp(nk);
    const float* w0 = args.item_table + c0 * D;
    PackTransposed(w0, D, nk, D, kStride, wt);
    PackRows(w0, D, nk, D, Dp, kBlock, wr);
    for (int64_t j = 0; j < kBlock; ++j) {
      bias[j] = j >= nk ? kNegInf : (dims.has_bias ? args.item_bias[c0 + j]
                                                   : 0.0f);
    }
    std::memset(dw, 0, sizeof(float) * kBlock * Dp);
    std::memset(db, 0, sizeof(float) * kBlock);
    for (int64_t t0 = 0; t0 < live; t0 += R) {
      ScoreTile<R>(hp + t0 * Dp, Dp, D, wt, kStride, nkp, 1.0f, S, kBlock);
      SoftmaxGrad(args, plan, t0, c0, nk, nkp, bias, S);
      if (dims.has_bias) {
        for (int64_t j = 0; j < nkp; j += W) {
          V acc = Load(db + j);
          for (int r = 0; r < R; ++r) acc += Load(S + r * kBlock + j);
          Store(db + j, acc);
        }
      }
      AccumulateTile<R>(S, kBlock, nk, wr, Dp, Dp, partial + t0 * Dp, Dp);
      RankUpdate<R>(S, kBlock, nk, hp + t0 * Dp, Dp, Dp, dw, Dp);
    }
    for (int64_t j = 0; j < nk; ++j) {
      std::memcpy(args.d_item_table + (c0 + j) * D, dw + j * Dp,
                  sizeof(float) * D);
    }
    if (dims.has_bias) {
      std::memcpy(args.d_item_bias + c0, db, sizeof(float) * nk);
    }
  }
}

}  // namespace

// Item blocks [begin, end): W^T into [D, kStride] panels (zero past the last
// item), bias into [kBlock] (-inf past the last item: probability 0).
void PackForward(const CutCrossEntropyDims& dims,
                 const CutCrossEntropyForwardArgs& args, int64_t begin,
                 int64_t end) {
  const int64_t D = dims.dim, C = dims.num_items;
  const int64_t num_blocks = (C + kBlock - 1) / kBlock;
  float* bias_all = args.workspace + num_blocks * D * kStride;
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t c0 = blk * kBlock;
    const int64_t nk = std::min(kBlock, C - c0);
    PackTransposed(args.item_table + c0 * D, D, nk, D, kStride,
                   args.workspace + blk * D * kStride);
    float* bias = bias_all + blk * kBlock;
    for (int64_t j = 0; j < kBlock; ++j) {
      bias[j] = j >= nk ? kNegInf
                        : (dims.has_bias ? args.item_bias[c0 + j] : 0.0f);
    }
  }
}

void ForwardWorker(const CutCrossEntropyDims& dims,
                   const CutCrossEntropyForwardArgs& args,
                   std::atomic<int64_t>* next) {
  ForwardScratch scratch;
  const int64_t units = (dims.num_rows + kCceRowChunk - 1) / kCceRowChunk;
  for (int64_t u = next->fetch_add(1); u < units; u = next->fetch_add(1)) {
    const int64_t r0 = u * kCceRowChunk;
    ForwardChunk(dims, args, r0, std::min(dims.num_rows, r0 + kCceRowChunk),
                 &scratch);
  }
}

void BackwardWorker(const CutCrossEntropyDims& dims,
                    const CutCrossEntropyBackwardArgs& args,
                    const CutCrossEntropyBackwardPlan& plan,
                    std::atomic<int64_t>* next) {
  BackwardScratch scratch;
  for (int64_t g = next->fetch_add(1); g < plan.num_groups;
       g = next->fetch_add(1)) {
    BackwardGroup(dims, args, plan, g, &scratch);
  }
}

}  // namespace TFREC_ISA_NS
