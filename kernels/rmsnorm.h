#ifndef SPARSEACCEL_KERNELS_RMSNORM_H_
#define SPARSEACCEL_KERNELS_RMSNORM_H_

#include <cstdint>

namespace sparseaccel {

// out[r][i] = x[r][i] / sqrt(mean_i(x[r][i]^2) + eps) * weight[i], rows of `dim` floats
// (Llama's RMSNorm; the mean is accumulated in double). `out` may alias `x`.
void RmsNormCpu(const float* x, const float* weight, int64_t rows, int64_t dim, float eps,
                float* out);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_RMSNORM_H_
