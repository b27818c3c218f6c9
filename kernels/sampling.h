#ifndef SPARSEACCEL_KERNELS_SAMPLING_H_
#define SPARSEACCEL_KERNELS_SAMPLING_H_

// Picking the next token from a row of logits, reproducibly: a seeded draw depends only on
// (seed, step) through a counter-based generator, so the same request gives the same tokens on
// any machine, in one process or split across the prefill and decode services.

#include <cstdint>

namespace sparseaccel {

struct SamplingParams {
  float temperature = 0;  // <= 0: greedy (argmax, ties to the lowest id).
  int32_t top_k = 0;      // 0: no top-k cut.
  float top_p = 1;        // Keep the smallest set of most likely tokens whose mass >= top_p.
  uint64_t seed = 0;
};

// Uniform double in [0, 1) for draw `step` of `seed` (splitmix64 of both).
double SamplingUniform(uint64_t seed, uint64_t step);

// Samples from softmax(logits / temperature) restricted by top_k then top_p (the order of
// Hugging Face's logits warpers); candidates are ranked by logit, ties to the lower id.
int32_t SampleTokenCpu(const float* logits, int64_t vocab_size, const SamplingParams& params,
                       uint64_t step);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_SAMPLING_H_
