#include "kernels/rope.h"

#include <cmath>

#include "kernels/parallel.h"

namespace sparseaccel {

std::vector<float> RopeInverseFrequencies(int64_t head_dim, double theta,
                                          const Llama3RopeScaling& scaling) {
  const int64_t half = head_dim / 2;
  std::vector<float> inv_freq(half);
  // Hugging Face computes these in fp32; doing the same keeps the angles bit-identical.
  for (int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv_freq[i] = 1.0f / std::pow(static_cast<float>(theta), exponent);
  }
  if (!scaling.enabled) return inv_freq;
  const double low_freq_wavelen = scaling.original_max_positions / scaling.low_freq_factor;
  const double high_freq_wavelen = scaling.original_max_positions / scaling.high_freq_factor;
  for (int64_t i = 0; i < half; ++i) {
    const double freq = inv_freq[i];
    const double wavelen = 2 * M_PI / freq;
    double scaled = freq;
    if (wavelen > low_freq_wavelen) {
      scaled = freq / scaling.factor;
    } else if (wavelen >= high_freq_wavelen) {
      const double smooth = (scaling.original_max_positions / wavelen - scaling.low_freq_factor) /
                            (scaling.high_freq_factor - scaling.low_freq_factor);
      scaled = (1 - smooth) * freq / scaling.factor + smooth * freq;
    }
    inv_freq[i] = static_cast<float>(scaled);
  }
  return inv_freq;
}

void ApplyRopeCpu(float* x, int64_t rows, int64_t num_heads, int64_t head_dim,
                  const int64_t* positions, const float* inv_freq) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows * num_heads * head_dim >= kMinParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < half; ++i) {
      // The angle in fp32 as Hugging Face forms it (position * inv_freq), trig in double.
      const float angle = static_cast<float>(positions[r]) * inv_freq[i];
      const float cos_a = static_cast<float>(std::cos(static_cast<double>(angle)));
      const float sin_a = static_cast<float>(std::sin(static_cast<double>(angle)));
      for (int64_t h = 0; h < num_heads; ++h) {
        float* head = x + (r * num_heads + h) * head_dim;
        const float a = head[i], b = head[i + half];
        head[i] = a * cos_a - b * sin_a;
        head[i + half] = b * cos_a + a * sin_a;
      }
    }
  }
}

}  // namespace sparseaccel
