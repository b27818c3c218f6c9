#ifndef SPARSEACCEL_MODEL_TEST_UTIL_H_
#define SPARSEACCEL_MODEL_TEST_UTIL_H_

// What the model tests share (testonly): scratch folders, random prompts and the relative error
// of logits.

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace sparseaccel {

// $TEST_TMPDIR/<name> (or /tmp/<name>), created if absent.
std::string TestTempDir(const std::string& name);

// `n` ids drawn uniformly from [0, vocab).
std::vector<int32_t> RandomTokens(int64_t n, int64_t vocab, std::mt19937* rng);

// max|a - b| / max|b| over all elements; infinity when the sizes differ or `a` holds a value
// that is not finite.
double MaxRelativeError(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_TEST_UTIL_H_
