// Row-wise LayerNorm forward and backward (see layer_norm.h): dispatch to
// the vector code in layer_norm_impl.h (one copy per instruction set:
// cpu_isa.h).
#include "custom_ops/kernels/layer_norm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "custom_ops/kernels/cpu_isa.h"

namespace tfrec_fast {
namespace kernels {

namespace ln_impl {
#define TFREC_ISA_IMPL "custom_ops/kernels/layer_norm_impl.h"
#include "custom_ops/kernels/cpu_isa_variants.h"
}  // namespace ln_impl

void LayerNormForward(const float* x, const float* gamma, const float* beta,
                      int64_t dim, float epsilon, int64_t begin, int64_t end,
                      float* y, float* mean, float* rstd) {
  TFREC_FAST_ISA_DISPATCH(ln_impl, ForwardRows(x, gamma, beta, dim, epsilon,
                                               begin, end, y, mean, rstd));
}

void LayerNormBackward(const float* x, const float* gamma, const float* mean,
                       const float* rstd, const float* dy, int64_t dim,
                       int64_t begin, int64_t end, float* dx, float* d_gamma,
                       float* d_beta) {
  TFREC_FAST_ISA_DISPATCH(ln_impl,
                          BackwardRows(x, gamma, mean, rstd, dy, dim, begin,
                                       end, dx, d_gamma, d_beta));
}

}  // namespace kernels
}  // namespace tfrec_fast
