// The vector code of the packed attention kernels, compiled once per
// instruction set. NOT a normal header: ragged_attention.cc has
// cpu_isa_variants.h include it once per instruction set, with
//   TFREC_ISA_NS  the namespace to define (e.g. avx512),
//   TFREC_ISA_W   floats per vector (16 for AVX-512, 8 for AVX2, 4 otherwise),
//   TFREC_ISA_R   query rows per block (the register tile height),
// after the std headers and aligned_floats.h. No include guard on purpose.
//
// The tiles come from cpu_tiles_impl.h (shared with the cross-entropy
// kernels), used here as (R = query rows per block):
//   ScoreTile       S = scale q K^T, and dP = dO V^T
//   AccumulateTile  O += P V, and dQ += dS K
//   RankUpdate      dV += P^T dO, and dK += dS^T Q
// streaming packed, zero-padded per-thread copies (K^T, V^T, K, V of the
// current (sequence, head)), so inner loops are unit-stride vectors.

namespace TFREC_ISA_NS {
namespace {

// W, V, Load / Store / Splat / Exp, ScoreTile, AccumulateTile, RankUpdate,
// PackTransposed, PackRows, MaskTail.
#include "custom_ops/kernels/cpu_tiles_impl.h"

constexpr int R = TFREC_ISA_R;
// Keys per block of the online softmax: an [R, kKeyBlock] tile of scores
// (and of dP in the backward) stays in L1.
constexpr int64_t kKeyBlock = 256;
static_assert(kKeyBlock % W == 0, "key block must be whole vectors");

struct ForwardScratch {
  AlignedFloats kT, vp, q, s, o;
};

void ForwardItem(const RaggedAttentionDims& dims,
                 const RaggedAttentionForwardArgs& args,
                 const RaggedAttentionItem& it, ForwardScratch* scratch) {
  const int64_t H = dims.num_heads, Dh = dims.head_dim, Dv = dims.value_dim;
  const int64_t Dvp = RoundUp(Dv);
  const int64_t nkeys = it.key_end;
  const int64_t np = RoundUp(nkeys);
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t qs = dims.QKStride(), vs = dims.VStride();
  const float* q0 = args.q + it.start * qs + it.head * Dh;
  const float* k0 = args.k + it.start * qs + it.head * Dh;
  const float* v0 = args.v + it.start * vs + it.head * Dv;
  float* out0 = args.out + (it.start * H + it.head) * Dv;
  float* lse0 = args.lse + it.start * H + it.head;

  float* kT = scratch->kT.Get(Dh * np);
  float* vp = scratch->vp.Get(np * Dvp);
  float* qb = scratch->q.Get(R * Dh);
  float* S = scratch->s.Get(R * kKeyBlock);
  float* O = scratch->o.Get(R * Dvp);
  PackTransposed(k0, qs, nkeys, Dh, np, kT);
  PackRows(v0, vs, nkeys, Dv, Dvp, np, vp);

  float m[R], l[R];
  for (int64_t i0 = it.q_begin; i0 < it.q_end; i0 += R) {
    const int64_t rows = std::min<int64_t>(R, it.q_end - i0);
    for (int r = 0; r < R; ++r) {
      const float* src = q0 + (i0 + r) * qs;
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
  AlignedFloats kT, vT, kp, dk, dv, q, dout, s, ds, dq;
};

void BackwardItem(const RaggedAttentionDims& dims,
                  const RaggedAttentionBackwardArgs& args,
                  const RaggedAttentionItem& it, BackwardScratch* scratch) {
  const int64_t H = dims.num_heads, Dh = dims.head_dim, Dv = dims.value_dim;
  const int64_t Dhp = RoundUp(Dh), Dvp = RoundUp(Dv);
  const int64_t nkeys = it.key_end;
  const int64_t np = RoundUp(nkeys);
  const float scale = dims.scale;
  const int64_t qs = dims.QKStride(), vs = dims.VStride();
  const int64_t qoff = it.start * qs + it.head * Dh;  // q, k, dq, dk
  const int64_t voff = it.start * vs + it.head * Dv;  // v, dv
  const int64_t ooff = (it.start * H + it.head) * Dv;  // out, d_out (dense)
  const float* q0 = args.q + qoff;
  const float* k0 = args.k + qoff;
  const float* v0 = args.v + voff;
  const float* out0 = args.out + ooff;
  const float* dout0 = args.d_out + ooff;
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
  PackTransposed(k0, qs, nkeys, Dh, np, kT);
  PackTransposed(v0, vs, nkeys, Dv, np, vT);
  PackRows(k0, qs, nkeys, Dh, Dhp, np, kp);
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
      for (int64_t d = 0; d < Dh; ++d) qr[d] = q0[(i0 + r) * qs + d];
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
      float* dst = args.dq + qoff + (i0 + r) * qs;
      for (int64_t d = 0; d < Dh; ++d) dst[d] = dq[r * Dhp + d];
    }
  }
  if (it.partial < 0) {  // owns the whole (sequence, head)
    for (int64_t j = 0; j < nkeys; ++j) {
      float* dkr = args.dk + qoff + j * qs;
      float* dvr = args.dv + voff + j * vs;
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

}  // namespace TFREC_ISA_NS
