#ifndef SPARSEACCEL_KERNELS_ROPE_H_
#define SPARSEACCEL_KERNELS_ROPE_H_

// Rotary position embeddings as Hugging Face's Llama applies them ("rotate_half": element i of
// a head is paired with element i + head_dim/2), with Llama 3.1's frequency scaling.

#include <cstdint>
#include <vector>

namespace sparseaccel {

// Llama 3.1's `rope_scaling` ("rope_type": "llama3"): wavelengths longer than
// original_max_positions / low_freq_factor are divided by `factor`, shorter than
// original_max_positions / high_freq_factor kept, and the band between interpolated smoothly.
struct Llama3RopeScaling {
  bool enabled = false;
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  double original_max_positions = 8192;
};

// head_dim / 2 inverse frequencies: theta^(-2i/head_dim), then the llama3 scaling if enabled.
std::vector<float> RopeInverseFrequencies(int64_t head_dim, double theta,
                                          const Llama3RopeScaling& scaling);

// Rotates `rows` rows of `num_heads` heads x head_dim floats in place; row r sits at
// positions[r]. For each pair (x_i, x_{i+h}), h = head_dim/2, angle = position * inv_freq[i]:
// x_i' = x_i cos - x_{i+h} sin, x_{i+h}' = x_{i+h} cos + x_i sin.
void ApplyRopeCpu(float* x, int64_t rows, int64_t num_heads, int64_t head_dim,
                  const int64_t* positions, const float* inv_freq);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_ROPE_H_
