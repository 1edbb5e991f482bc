// The vector code of the LayerNorm kernels, compiled once per instruction
// set. NOT a normal header: layer_norm.cc has cpu_isa_variants.h include it
// once per instruction set, with
//   TFREC_ISA_NS  the namespace to define (e.g. avx512),
//   TFREC_ISA_W   floats per vector (16 for AVX-512, 8 for AVX2, 4 otherwise),
// after the std headers. No include guard on purpose.
//
// One row at a time, whole vectors over D and a scalar tail; row sums are
// vector partial sums added horizontally at the end of the row.

namespace TFREC_ISA_NS {
namespace {

// W, V, Load / Store / Splat / HSum.
#include "custom_ops/kernels/cpu_tiles_impl.h"

}  // namespace

void ForwardRows(const float* x, const float* gamma, const float* beta,
                 int64_t dim, float epsilon, int64_t begin, int64_t end,
                 float* y, float* mean, float* rstd) {
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const int64_t body = dim / W * W;
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    V acc = Splat(0.0f);
    for (int64_t d = 0; d < body; d += W) acc += Load(xr + d);
    float sum = HSum(acc);
    for (int64_t d = body; d < dim; ++d) sum += xr[d];
    const float m = sum * inv_dim;
    // Two passes (centred squares), as the reference: no cancellation for
    // rows far from zero.
    const V vm = Splat(m);
    V sq = Splat(0.0f);
    for (int64_t d = 0; d < body; d += W) {
      const V c = Load(xr + d) - vm;
      sq += c * c;
    }
    float squares = HSum(sq);
    for (int64_t d = body; d < dim; ++d) {
      const float c = xr[d] - m;
      squares += c * c;
    }
    const float s = 1.0f / std::sqrt(squares * inv_dim + epsilon);
    const V vs = Splat(s);
    for (int64_t d = 0; d < body; d += W) {
      Store(yr + d, (Load(xr + d) - vm) * vs * Load(gamma + d) +
                        Load(beta + d));
    }
    for (int64_t d = body; d < dim; ++d) {
      yr[d] = (xr[d] - m) * s * gamma[d] + beta[d];
    }
    mean[r] = m;
    rstd[r] = s;
  }
}

void BackwardRows(const float* x, const float* gamma, const float* mean,
                  const float* rstd, const float* dy, int64_t dim,
                  int64_t begin, int64_t end, float* dx, float* d_gamma,
                  float* d_beta) {
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const int64_t body = dim / W * W;
  for (int64_t d = 0; d < dim; ++d) d_gamma[d] = d_beta[d] = 0.0f;
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * dim;
    const float* dyr = dy + r * dim;
    float* dxr = dx + r * dim;
    const float m = mean[r], s = rstd[r];
    const V vm = Splat(m), vs = Splat(s);
    // g = dy * gamma is stored in dx and read back in the second pass, so
    // the g in g - mean(g) is the rounded g that was summed: with FMA
    // contraction, recomputing dy * gamma - mean(g) would skip that rounding
    // (an error times rstd, up to 1 / sqrt(epsilon), where the true dx is 0:
    // D = 1, or constant rows).
    V g_acc = Splat(0.0f), gx_acc = Splat(0.0f);
    for (int64_t d = 0; d < body; d += W) {
      const V x_hat = (Load(xr + d) - vm) * vs;
      const V g = Load(dyr + d) * Load(gamma + d);
      Store(dxr + d, g);
      g_acc += g;
      gx_acc += g * x_hat;
    }
    float g_sum = HSum(g_acc), gx_sum = HSum(gx_acc);
    for (int64_t d = body; d < dim; ++d) {
      const float x_hat = (xr[d] - m) * s;
      const float g = dyr[d] * gamma[d];
      dxr[d] = g;
      g_sum += g;
      gx_sum += g * x_hat;
    }
    const float g_mean = g_sum * inv_dim, gx_mean = gx_sum * inv_dim;
    const V vg = Splat(g_mean), vgx = Splat(gx_mean);
    for (int64_t d = 0; d < body; d += W) {
      const V x_hat = (Load(xr + d) - vm) * vs;
      const V dyv = Load(dyr + d);
      Store(d_gamma + d, Load(d_gamma + d) + dyv * x_hat);
      Store(d_beta + d, Load(d_beta + d) + dyv);
      Store(dxr + d, vs * ((Load(dxr + d) - vg) - x_hat * vgx));
    }
    for (int64_t d = body; d < dim; ++d) {
      const float x_hat = (xr[d] - m) * s;
      d_gamma[d] += dyr[d] * x_hat;
      d_beta[d] += dyr[d];
      dxr[d] = s * ((dxr[d] - g_mean) - x_hat * gx_mean);
    }
  }
}

}  // namespace TFREC_ISA_NS
