#include "kernels/activation.h"

#include <cmath>

#include "kernels/parallel.h"

namespace sparseaccel {

void SwiGluCpu(const float* gate, const float* up, int64_t count, float* out) {
#pragma omp parallel for schedule(static) if (count >= kMinParallelWork)
  for (int64_t i = 0; i < count; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

}  // namespace sparseaccel
