#include "kernels/rmsnorm.h"

#include <cmath>

#include "kernels/parallel.h"

namespace sparseaccel {

void RmsNormCpu(const float* x, const float* weight, int64_t rows, int64_t dim, float eps,
                float* out) {
#pragma omp parallel for schedule(static) if (rows * dim >= kMinParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * dim;
    double sum_sq = 0;
    for (int64_t i = 0; i < dim; ++i) sum_sq += static_cast<double>(row[i]) * row[i];
    const float inv_rms = static_cast<float>(1.0 / std::sqrt(sum_sq / dim + eps));
    float* dst = out + r * dim;
    for (int64_t i = 0; i < dim; ++i) dst[i] = row[i] * inv_rms * weight[i];
  }
}

}  // namespace sparseaccel
