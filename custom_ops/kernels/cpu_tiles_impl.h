// Vector primitives and tiles shared by the CPU kernels (packed attention,
// cut cross-entropy, CCEMinus), compiled once per instruction set. NOT a
// normal header: an *_impl.h includes it inside its per-ISA namespace (see
// cpu_isa_variants.h), with
//   TFREC_ISA_W  floats per vector (16 for AVX-512, 8 for AVX2, 4 otherwise)
// defined, after <algorithm>, <cmath>, <cstdint>, <cstring> and <limits>.
// No include guard on purpose: every inclusion defines its own copy in the
// enclosing namespace, compiled for that namespace's target.
//
// Vectors are GCC vector extensions (V: W floats, VI: W int32), so one source
// gives AVX-512, AVX2 + FMA and baseline code; a * b + c contracts to FMA.
//
// Primitives: V (W floats), Load / Store (unaligned), Splat, Max, Iota,
// HSum / HMax (horizontal), RoundUp (to whole vectors), Exp.
//
// Tiles (W = floats per vector, NR = rows of the register tile):
//   ScoreTile       S[r, j]  = [mult *] sum_d a[r, d] * bT[d, j]
//   AccumulateTile  acc[r, c] += sum_j P[r, j] * b[j, c]
//   RankUpdate      out[j, c] += sum_r P[r, j] * a[r, c]
// Each keeps an NR x 2W block of accumulators in registers and streams the
// other operand from a packed, zero-padded copy, so inner loops are
// unit-stride vector loads plus scalar broadcasts. Strides of packed operands
// that are large powers of two alias in the L1 cache (a 1 KiB stride maps 64
// rows onto 4 sets); callers pad such strides by a vector.

constexpr int64_t W = TFREC_ISA_W;

typedef float V __attribute__((vector_size(TFREC_ISA_W * 4)));
typedef float Vu __attribute__((vector_size(TFREC_ISA_W * 4), aligned(4)));
typedef int32_t VI __attribute__((vector_size(TFREC_ISA_W * 4)));

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
// for r < NR and j < ncols (a multiple of W); without the multiply when
// kScaled is false.
template <int NR, bool kScaled>
void ScoreTileImpl(const float* a, int64_t as, int64_t inner, const float* bT,
                   int64_t bs, int64_t ncols, float mult, float* S,
                   int64_t ss) {
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
      if constexpr (kScaled) {
        acc0[r] *= vmult;
        acc1[r] *= vmult;
      }
      Store(S + r * ss + j, acc0[r]);
      Store(S + r * ss + j + W, acc1[r]);
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
    for (int r = 0; r < NR; ++r) {
      if constexpr (kScaled) acc0[r] *= vmult;
      Store(S + r * ss + j, acc0[r]);
    }
  }
}

// S = mult * a bT (see ScoreTileImpl).
template <int NR>
inline void ScoreTile(const float* a, int64_t as, int64_t inner,
                      const float* bT, int64_t bs, int64_t ncols, float mult,
                      float* S, int64_t ss) {
  ScoreTileImpl<NR, true>(a, as, inner, bT, bs, ncols, mult, S, ss);
}

// S = a bT (see ScoreTileImpl).
template <int NR>
inline void ScoreTile(const float* a, int64_t as, int64_t inner,
                      const float* bT, int64_t bs, int64_t ncols, float* S,
                      int64_t ss) {
  ScoreTileImpl<NR, false>(a, as, inner, bT, bs, ncols, 1.0f, S, ss);
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
[[maybe_unused]] void PackTransposed(const float* src, int64_t stride, int64_t n, int64_t dim,
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
[[maybe_unused]] void PackRows(const float* src, int64_t stride, int64_t n, int64_t dim,
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
