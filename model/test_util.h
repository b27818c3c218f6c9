#ifndef SPARSEACCEL_MODEL_TEST_UTIL_H_
#define SPARSEACCEL_MODEL_TEST_UTIL_H_

// What the engine tests share (testonly): random prompts and the relative error of logits.

#include <cstdint>
#include <random>
#include <vector>

namespace sparseaccel {

// `n` ids drawn uniformly from [0, vocab).
std::vector<int32_t> RandomTokens(int64_t n, int64_t vocab, std::mt19937* rng);

// max|a - b| / max|b| over all elements; infinity when the sizes differ or `a` holds a value
// that is not finite.
double MaxRelativeError(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_TEST_UTIL_H_
