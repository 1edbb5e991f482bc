// The vector code of the packed attention kernels, compiled once per
// instruction set. NOT a normal header: ragged_attention.cc includes it
// several times, each time inside a `#pragma GCC target` region and with
//   TFREC_RA_NS  the namespace to define (e.g. avx512),
//   TFREC_RA_W   floats per vector (16 for AVX-512, 8 for AVX2, 4 otherwise),
//   TFREC_RA_R   query rows per block (the register tile height),
// after the std headers and ScratchBuffer. No include guard on purpose.
//
// Tiles (W = floats per vector, R = query rows per block):
//   ScoreTile       S[r, j]  = mult * sum_d a[r, d] * bT[d, j]   (q K^T, dO V^T)
//   AccumulateTile  acc[r, c] += sum_j P[r, j] * b[j, c]         (P V, dS K)
//   RankUpdate      out[j, c] += sum_r P[r, j] * a[r, c]         (P^T dO, dS^T Q)
// Each keeps an R x 2W block of accumulators in registers and streams the
// other operand from a packed, zero-padded per-thread copy (K^T, V^T, K, V
// of the current (sequence, head)), so inner loops are unit-stride vectors.

namespace TFREC_RA_NS {
namespace {

constexpr int64_t W = TFREC_RA_W;
constexpr int R = TFREC_RA_R;
// Keys per block of the online softmax: an [R, kKeyBlock] tile of scores
// (and of dP in the backward) stays in L1.
constexpr int64_t kKeyBlock = 256;
static_assert(kKeyBlock % W == 0, "key block must be whole vectors");

typedef float V __attribute__((vector_size(TFREC_RA_W * 4)));
typedef float Vu __attribute__((vector_size(TFREC_RA_W * 4), aligned(4)));
typedef int32_t VI __attribute__((vector_size(TFREC_RA_W * 4)));

inline V Load(const float* p) { return *reinterpret_cast<const Vu*>(p); }
inline void Store(float* p, V v) { *reinterpret_cast<Vu*>(p) = v; }
inline V Splat(float x) {
  V v = {};
  return v + x;
}
inline V Max(V a, V b) { return a > b ? a : b; }
inline V Iota() {
  V v = {};
  for (int i = 0; i < W; ++i) v[i] = static_cast<float>(i);
  return v;
}
inline float HSum(V v) {
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
inline float HMax(V v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline int64_t RoundUp(int64_t x) { return (x + W - 1) / W * W; }

// exp(x), about 1 ulp (Cephes expf polynomial after range reduction by
// ln 2); exp(x) = 0 for x < -87 (and -inf), NaN stays NaN.
inline V Exp(V x) {
  const V hi = Splat(88.3762626647949f);
  const V lo = Splat(-87.0f);
  const VI tiny = x < lo;
  const VI nan = x != x;
  V xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const V magic = Splat(12582912.0f);  // 1.5 * 2^23: round to integer
  const V t = xc * Splat(1.44269504088896341f) + magic;
  const V n = t - magic;
  V r = xc - n * Splat(0.693359375f);
  r = r - n * Splat(-2.12194440e-4f);
  V y = Splat(1.9875691500e-4f);
  y = y * r + Splat(1.3981999507e-3f);
  y = y * r + Splat(8.3334519073e-3f);
  y = y * r + Splat(4.1665795894e-2f);
  y = y * r + Splat(1.6666665459e-1f);
  y = y * r + Splat(5.0000001201e-1f);
  y = y * (r * r) + r + Splat(1.0f);
  const VI ni = reinterpret_cast<VI>(t) - reinterpret_cast<VI>(magic);
  const V result = reinterpret_cast<V>(reinterpret_cast<VI>(y) + (ni << 23));
  const V flushed = tiny ? Splat(0.0f) : result;
  return nan ? x : flushed;
}

// S[r * ss + j] = mult * sum_{d < inner} a[r * as + d] * bT[d * bs + j]
// for r < NR and j < ncols (a multiple of W).
template <int NR>
void ScoreTile(const float* a, int64_t as, int64_t inner, const float* bT,
               int64_t bs, int64_t ncols, float mult, float* S, int64_t ss) {
  const V vmult = Splat(mult);
  int64_t j = 0;
  for (; j + 2 * W <= ncols; j += 2 * W) {
    V acc0[NR], acc1[NR];
    for (int r = 0; r < NR; ++r) acc0[r] = acc1[r] = Splat(0.0f);
    const float* b = bT + j;
    for (int64_t d = 0; d < inner; ++d, b += bs) {
      const V b0 = Load(b), b1 = Load(b + W);
      for (int r = 0; r < NR; ++r) {
        const V x = Splat(a[r * as + d]);
        acc0[r] += x * b0;
        acc1[r] += x * b1;
      }
    }
    for (int r = 0; r < NR; ++r) {
      Store(S + r * ss + j, acc0[r] * vmult);
      Store(S + r * ss + j + W, acc1[r] * vmult);
    }
  }
  if (j < ncols) {
    V acc0[NR];
    for (int r = 0; r < NR; ++r) acc0[r] = Splat(0.0f);
    const float* b = bT + j;
    for (int64_t d = 0; d < inner; ++d, b += bs) {
      const V b0 = Load(b);
      for (int r = 0; r < NR; ++r) acc0[r] += Splat(a[r * as + d]) * b0;
    }
    for (int r = 0; r < NR; ++r) Store(S + r * ss + j, acc0[r] * vmult);
  }
}

// acc[r * cs + c] += sum_{j < nk} P[r * ps + j] * b[j * bs + c]
// for r < NR and c < width (a multiple of W).
template <int NR>
void AccumulateTile(const float* P, int64_t ps, int64_t nk, const float* b,
                    int64_t bs, int64_t width, float* acc, int64_t cs) {
  int64_t c = 0;
  for (; c + 2 * W <= width; c += 2 * W) {
    V a0[NR], a1[NR];
    for (int r = 0; r < NR; ++r) {
      a0[r] = Load(acc + r * cs + c);
      a1[r] = Load(acc + r * cs + c + W);
    }
    const float* bj = b + c;
    for (int64_t j = 0; j < nk; ++j, bj += bs) {
      const V b0 = Load(bj), b1 = Load(bj + W);
      for (int r = 0; r < NR; ++r) {
        const V x = Splat(P[r * ps + j]);
        a0[r] += x * b0;
        a1[r] += x * b1;
      }
    }
    for (int r = 0; r < NR; ++r) {
      Store(acc + r * cs + c, a0[r]);
      Store(acc + r * cs + c + W, a1[r]);
    }
  }
  if (c < width) {
    V a0[NR];
    for (int r = 0; r < NR; ++r) a0[r] = Load(acc + r * cs + c);
    const float* bj = b + c;
    for (int64_t j = 0; j < nk; ++j, bj += bs) {
      const V b0 = Load(bj);
      for (int r = 0; r < NR; ++r) a0[r] += Splat(P[r * ps + j]) * b0;
    }
    for (int r = 0; r < NR; ++r) Store(acc + r * cs + c, a0[r]);
  }
}

// out[j * os + c] += sum_{r < NR} P[r * ps + j] * a[r * as + c]
// for j < nk and c < width (a multiple of W).
template <int NR>
void RankUpdate(const float* P, int64_t ps, int64_t nk, const float* a,
                int64_t as, int64_t width, float* out, int64_t os) {
  int64_t c = 0;
  for (; c + 2 * W <= width; c += 2 * W) {
    V x0[NR], x1[NR];
    for (int r = 0; r < NR; ++r) {
      x0[r] = Load(a + r * as + c);
      x1[r] = Load(a + r * as + c + W);
    }
    float* o = out + c;
    for (int64_t j = 0; j < nk; ++j, o += os) {
      V o0 = Load(o), o1 = Load(o + W);
      for (int r = 0; r < NR; ++r) {
        const V p = Splat(P[r * ps + j]);
        o0 += p * x0[r];
        o1 += p * x1[r];
      }
      Store(o, o0);
      Store(o + W, o1);
    }
  }
  if (c < width) {
    V x0[NR];
    for (int r = 0; r < NR; ++r) x0[r] = Load(a + r * as + c);
    float* o = out + c;
    for (int64_t j = 0; j < nk; ++j, o += os) {
      V o0 = Load(o);
      for (int r = 0; r < NR; ++r) o0 += Splat(P[r * ps + j]) * x0[r];
      Store(o, o0);
    }
  }
}

// dst[d * np + j] = src[j * stride + d] for j < n, d < dim; zero for
// n <= j < np (keys past the last one score 0 and are masked).
void PackTransposed(const float* src, int64_t stride, int64_t n, int64_t dim,
                    int64_t np, float* dst) {
  for (int64_t d = 0; d < dim; ++d) {
    float* row = dst + d * np;
    for (int64_t j = n; j < np; ++j) row[j] = 0.0f;
  }
  // Blocks of 8 keys: each source row is read once, each destination row
  // gets 8 neighbouring writes.
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float* s = src + j * stride;
    for (int64_t d = 0; d < dim; ++d) {
      float* t = dst + d * np + j;
      for (int64_t u = 0; u < 8; ++u) t[u] = s[u * stride + d];
    }
  }
  for (; j < n; ++j) {
    const float* s = src + j * stride;
    for (int64_t d = 0; d < dim; ++d) dst[d * np + j] = s[d];
  }
}

// dst[j * dimp + d] = src[j * stride + d] for j < n, d < dim; zero for
// d >= dim and for n <= j < np.
void PackRows(const float* src, int64_t stride, int64_t n, int64_t dim,
              int64_t dimp, int64_t np, float* dst) {
  for (int64_t j = 0; j < n; ++j) {
    const float* s = src + j * stride;
    float* t = dst + j * dimp;
    for (int64_t d = 0; d < dim; ++d) t[d] = s[d];
    for (int64_t d = dim; d < dimp; ++d) t[d] = 0.0f;
  }
  std::memset(dst + n * dimp, 0, sizeof(float) * (np - n) * dimp);
}

// Sets row[j] = fill for j in [lim, ncols) (ncols a multiple of W).
inline void MaskTail(float* row, int64_t lim, int64_t ncols, float fill) {
  const V iota = Iota();
  const V vfill = Splat(fill);
  const V vlim = Splat(static_cast<float>(lim));
  for (int64_t j = lim / W * W; j < ncols; j += W) {
    const V idx = iota + static_cast<float>(j);
    Store(row + j, idx < vlim ? Load(row + j) : vfill);
  }
}

struct ForwardScratch {
  ScratchBuffer kT, vp, q, s, o;
};

void ForwardItem(const RaggedAttentionDims& dims,
                 const RaggedAttentionForwardArgs& args,
                 const RaggedAttentionItem& it, ForwardScratch* scratch) {
  const int64_t H = dims.num_heads, Dh = dims.head_dim, Dv = dims.value_dim;
  const int64_t Dvp = RoundUp(Dv);
  const int64_t nkeys = it.key_end;
  const int64_t np = RoundUp(nkeys);
  const float ninf = -std::numeric_limits<float>::infinity();
  const float* q0 = args.q + (it.start * H + it.head) * Dh;
  const float* k0 = args.k + (it.start * H + it.head) * Dh;
  const float* v0 = args.v + (it.start * H + it.head) * Dv;
  float* out0 = args.out + (it.start * H + it.head) * Dv;
  float* lse0 = args.lse + it.start * H + it.head;

  float* kT = scratch->kT.Get(Dh * np);
  float* vp = scratch->vp.Get(np * Dvp);
  float* qb = scratch->q.Get(R * Dh);
  float* S = scratch->s.Get(R * kKeyBlock);
  float* O = scratch->o.Get(R * Dvp);
  PackTransposed(k0, H * Dh, nkeys, Dh, np, kT);
  PackRows(v0, H * Dv, nkeys, Dv, Dvp, np, vp);

  float m[R], l[R];
  for (int64_t i0 = it.q_begin; i0 < it.q_end; i0 += R) {
    const int64_t rows = std::min<int64_t>(R, it.q_end - i0);
    for (int r = 0; r < R; ++r) {
      const float* src = q0 + (i0 + r) * H * Dh;
      for (int64_t d = 0; d < Dh; ++d) qb[r * Dh + d] = r < rows ? src[d] : 0;
      m[r] = ninf;
      l[r] = 0.0f;
    }
    std::memset(O, 0, sizeof(float) * R * Dvp);
    const int64_t kmax = dims.causal ? i0 + rows : nkeys;
    for (int64_t kb = 0; kb < kmax; kb += kKeyBlock) {
      const int64_t ke = std::min(kb + kKeyBlock, kmax);
      const int64_t nk = ke - kb;
      const int64_t nkp = RoundUp(nk);
      ScoreTile<R>(qb, Dh, Dh, kT + kb, np, nkp, dims.scale, S, kKeyBlock);
      for (int r = 0; r < R; ++r) {
        float* srow = S + r * kKeyBlock;
        const int64_t lim =
            r >= rows ? 0
                      : (dims.causal ? std::min(i0 + r + 1, ke) - kb : nk);
        if (lim <= 0) {  // no key of this block is visible to row r
          std::memset(srow, 0, sizeof(float) * nkp);
          continue;
        }
        MaskTail(srow, lim, nkp, ninf);
        V mx = Splat(ninf);
        for (int64_t j = 0; j < nkp; j += W) mx = Max(mx, Load(srow + j));
        const float block_max = HMax(mx);
        const float m_new = block_max > m[r] ? block_max : m[r];
        const float alpha = m[r] == ninf ? 0.0f : std::exp(m[r] - m_new);
        const V vm = Splat(m_new);
        V sum = Splat(0.0f);
        for (int64_t j = 0; j < nkp; j += W) {
          const V p = Exp(Load(srow + j) - vm);
          Store(srow + j, p);
          sum += p;
        }
        l[r] = l[r] * alpha + HSum(sum);
        if (alpha != 1.0f) {
          for (int64_t c = 0; c < Dvp; ++c) O[r * Dvp + c] *= alpha;
        }
        m[r] = m_new;
      }
      AccumulateTile<R>(S, kKeyBlock, nk, vp + kb * Dvp, Dvp, Dvp, O, Dvp);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = 1.0f / l[r];
      float* dst = out0 + (i0 + r) * H * Dv;
      for (int64_t c = 0; c < Dv; ++c) dst[c] = O[r * Dvp + c] * inv;
      lse0[(i0 + r) * H] = m[r] + std::log(l[r]);
    }
  }
}

struct BackwardScratch {
  ScratchBuffer kT, vT, kp, dk, dv, q, dout, s, ds, dq;
};

void BackwardItem(const RaggedAttentionDims& dims,
                  const RaggedAttentionBackwardArgs& args,
                  const RaggedAttentionItem& it, BackwardScratch* scratch) {
  const int64_t H = dims.num_heads, Dh = dims.head_dim, Dv = dims.value_dim;
  const int64_t Dhp = RoundUp(Dh), Dvp = RoundUp(Dv);
  const int64_t nkeys = it.key_end;
  const int64_t np = RoundUp(nkeys);
  const float scale = dims.scale;
  const int64_t qoff = (it.start * H + it.head) * Dh;
  const int64_t voff = (it.start * H + it.head) * Dv;
  const float* q0 = args.q + qoff;
  const float* k0 = args.k + qoff;
  const float* v0 = args.v + voff;
  const float* out0 = args.out + voff;
  const float* dout0 = args.d_out + voff;
  const float* lse0 = args.lse + it.start * H + it.head;

  float* kT = scratch->kT.Get(Dh * np);
  float* vT = scratch->vT.Get(Dv * np);
  float* kp = scratch->kp.Get(np * Dhp);
  float* dk = scratch->dk.Get(np * Dhp);
  float* dv = scratch->dv.Get(np * Dvp);
  float* qb = scratch->q.Get(R * Dhp);
  float* db = scratch->dout.Get(R * Dvp);
  float* S = scratch->s.Get(R * kKeyBlock);
  float* dS = scratch->ds.Get(R * kKeyBlock);
  float* dq = scratch->dq.Get(R * Dhp);
  PackTransposed(k0, H * Dh, nkeys, Dh, np, kT);
  PackTransposed(v0, H * Dv, nkeys, Dv, np, vT);
  PackRows(k0, H * Dh, nkeys, Dh, Dhp, np, kp);
  std::memset(dk, 0, sizeof(float) * np * Dhp);
  std::memset(dv, 0, sizeof(float) * np * Dvp);

  float row_lse[R], row_d[R];
  const V iota = Iota();
  for (int64_t i0 = it.q_begin; i0 < it.q_end; i0 += R) {
    const int64_t rows = std::min<int64_t>(R, it.q_end - i0);
    for (int r = 0; r < R; ++r) {
      float* qr = qb + r * Dhp;
      float* dr = db + r * Dvp;
      std::memset(qr, 0, sizeof(float) * Dhp);
      std::memset(dr, 0, sizeof(float) * Dvp);
      row_lse[r] = 0.0f;
      row_d[r] = 0.0f;
      if (r >= rows) continue;
      const int64_t t = (i0 + r) * H;
      for (int64_t d = 0; d < Dh; ++d) qr[d] = q0[t * Dh + d];
      float dot = 0.0f;
      for (int64_t c = 0; c < Dv; ++c) {
        dr[c] = dout0[t * Dv + c];
        dot += dr[c] * out0[t * Dv + c];
      }
      row_d[r] = dot;
      row_lse[r] = lse0[t];
    }
    std::memset(dq, 0, sizeof(float) * R * Dhp);
    const int64_t kmax = dims.causal ? i0 + rows : nkeys;
    for (int64_t kb = 0; kb < kmax; kb += kKeyBlock) {
      const int64_t ke = std::min(kb + kKeyBlock, kmax);
      const int64_t nk = ke - kb;
      const int64_t nkp = RoundUp(nk);
      ScoreTile<R>(qb, Dhp, Dh, kT + kb, np, nkp, scale, S, kKeyBlock);
      ScoreTile<R>(db, Dvp, Dv, vT + kb, np, nkp, 1.0f, dS, kKeyBlock);
      for (int r = 0; r < R; ++r) {
        float* srow = S + r * kKeyBlock;
        float* dsrow = dS + r * kKeyBlock;
        const int64_t lim =
            r >= rows ? 0
                      : (dims.causal ? std::min(i0 + r + 1, ke) - kb : nk);
        if (lim <= 0) {
          std::memset(srow, 0, sizeof(float) * nkp);
          std::memset(dsrow, 0, sizeof(float) * nkp);
          continue;
        }
        const V vlse = Splat(row_lse[r]);
        const V vd = Splat(row_d[r]);
        const V vscale = Splat(scale);
        const V vlim = Splat(static_cast<float>(lim));
        for (int64_t j = 0; j < nkp; j += W) {
          V p = Exp(Load(srow + j) - vlse);
          if (j + W > lim) p = (iota + static_cast<float>(j)) < vlim ? p : 0;
          Store(srow + j, p);
          Store(dsrow + j, p * (Load(dsrow + j) - vd) * vscale);
        }
      }
      RankUpdate<R>(S, kKeyBlock, nk, db, Dvp, Dvp, dv + kb * Dvp, Dvp);
      RankUpdate<R>(dS, kKeyBlock, nk, qb, Dhp, Dhp, dk + kb * Dhp, Dhp);
      AccumulateTile<R>(dS, kKeyBlock, nk, kp + kb * Dhp, Dhp, Dhp, dq, Dhp);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = args.dq + qoff + (i0 + r) * H * Dh;
      for (int64_t d = 0; d < Dh; ++d) dst[d] = dq[r * Dhp + d];
    }
  }
  if (it.partial < 0) {  // owns the whole (sequence, head)
    for (int64_t j = 0; j < nkeys; ++j) {
      float* dkr = args.dk + qoff + j * H * Dh;
      float* dvr = args.dv + voff + j * H * Dv;
      for (int64_t d = 0; d < Dh; ++d) dkr[d] = dk[j * Dhp + d];
      for (int64_t c = 0; c < Dv; ++c) dvr[c] = dv[j * Dvp + c];
    }
  } else {
    float* pk = args.workspace + it.partial;
    float* pv = pk + nkeys * Dh;
    for (int64_t j = 0; j < nkeys; ++j) {
      for (int64_t d = 0; d < Dh; ++d) pk[j * Dh + d] = dk[j * Dhp + d];
      for (int64_t c = 0; c < Dv; ++c) pv[j * Dv + c] = dv[j * Dvp + c];
    }
  }
}

}  // namespace

void ForwardWorker(const RaggedAttentionDims& dims,
                   const RaggedAttentionForwardArgs& args,
                   const RaggedAttentionPlan& plan,
                   std::atomic<int64_t>* next) {
  ForwardScratch scratch;
  const int64_t n = static_cast<int64_t>(plan.items.size());
  for (int64_t i = next->fetch_add(1); i < n; i = next->fetch_add(1)) {
    ForwardItem(dims, args, plan.items[i], &scratch);
  }
}

void BackwardWorker(const RaggedAttentionDims& dims,
                    const RaggedAttentionBackwardArgs& args,
                    const RaggedAttentionPlan& plan,
                    std::atomic<int64_t>* next) {
  BackwardScratch scratch;
  const int64_t n = static_cast<int64_t>(plan.items.size());
  for (int64_t i = next->fetch_add(1); i < n; i = next->fetch_add(1)) {
    BackwardItem(dims, args, plan.items[i], &scratch);
  }
}

}  // namespace TFREC_RA_NS
