#ifndef SPARSEACCEL_KERNELS_ACTIVATION_H_
#define SPARSEACCEL_KERNELS_ACTIVATION_H_

#include <cstdint>

namespace sparseaccel {

// Llama's MLP gate: out[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + exp(-x)).
// `out` may alias `gate` or `up`.
void SwiGluCpu(const float* gate, const float* up, int64_t count, float* out);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_ACTIVATION_H_
