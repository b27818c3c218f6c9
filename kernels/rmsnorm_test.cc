#include "kernels/rmsnorm.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/activation.h"

namespace sparseaccel {
namespace {

TEST(RmsNormTest, MatchesDoublePrecisionLoop) {
  std::mt19937 rng(33);
  std::normal_distribution<float> dist(0.5f, 2.0f);
  const int64_t rows = 7, dim = 96;
  std::vector<float> x(rows * dim), w(dim), out(rows * dim);
  for (float& v : x) v = dist(rng);
  for (float& v : w) v = dist(rng);
  RmsNormCpu(x.data(), w.data(), rows, dim, 1e-5f, out.data());
  for (int64_t r = 0; r < rows; ++r) {
    double ms = 0;
    for (int64_t i = 0; i < dim; ++i) ms += double(x[r * dim + i]) * x[r * dim + i];
    ms /= dim;
    for (int64_t i = 0; i < dim; ++i) {
      double expected = x[r * dim + i] / std::sqrt(ms + 1e-5) * w[i];
      EXPECT_NEAR(out[r * dim + i], expected, 1e-5 * std::fabs(expected) + 1e-6);
    }
  }
}

TEST(SwiGluTest, MatchesFormula) {
  std::mt19937 rng(43);
  std::uniform_real_distribution<float> dist(-8.0f, 8.0f);
  std::vector<float> gate(257), up(257), out(257);
  for (size_t i = 0; i < gate.size(); ++i) gate[i] = dist(rng), up[i] = dist(rng);
  SwiGluCpu(gate.data(), up.data(), gate.size(), out.data());
  for (size_t i = 0; i < gate.size(); ++i) {
    double g = gate[i];
    double expected = g / (1 + std::exp(-g)) * up[i];
    EXPECT_NEAR(out[i], expected, 1e-5 * std::fabs(expected) + 1e-6);
  }
}

}  // namespace
}  // namespace sparseaccel
