// Layer normalisation of [N, D] rows (the transformer blocks' token-wise
// LayerNorm), forward and backward in one pass over each row each.
//
//   y = (x - mean) * rstd * gamma + beta,  rstd = 1 / sqrt(var + epsilon)
//   dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),  g = dy * gamma
//   dgamma = sum_rows dy * x_hat,  dbeta = sum_rows dy
//
// Framework-free (std only). Both functions work on a row range so callers
// can split rows across threads; the backward writes per-range partial
// dgamma / dbeta sums that the caller adds up.
#ifndef TFREC_FAST_KERNELS_LAYER_NORM_H_
#define TFREC_FAST_KERNELS_LAYER_NORM_H_

#include <cstdint>

namespace tfrec_fast {
namespace kernels {

// Rows [begin, end) of x [N, D]: y [N, D], mean [N], rstd [N].
void LayerNormForward(const float* x, const float* gamma, const float* beta,
                      int64_t dim, float epsilon, int64_t begin, int64_t end,
                      float* y, float* mean, float* rstd);

// Rows [begin, end): dx [N, D]; d_gamma and d_beta [D] receive the sums over
// these rows (overwritten, not accumulated).
void LayerNormBackward(const float* x, const float* gamma, const float* mean,
                       const float* rstd, const float* dy, int64_t dim,
                       int64_t begin, int64_t end, float* dx, float* d_gamma,
                       float* d_beta);

}  // namespace kernels
}  // namespace tfrec_fast

#endif  // TFREC_FAST_KERNELS_LAYER_NORM_H_
