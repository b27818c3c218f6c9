#include "kernels/rope.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace sparseaccel {
namespace {

TEST(RopeTest, UnscaledFrequenciesAreClosedForm) {
  std::vector<float> f = RopeInverseFrequencies(128, 500000.0, {});
  ASSERT_EQ(f.size(), 64u);
  for (int i = 0; i < 64; ++i) {
    EXPECT_NEAR(f[i], std::pow(500000.0, -2.0 * i / 128), 1e-6 * f[i]);
  }
}

// Llama 3.1 (factor 8, low 1, high 4, original 8192): high frequencies (wavelength < 2048)
// unchanged, low ones (wavelength > 8192) divided by 8, the band between interpolated.
TEST(RopeTest, Llama3ScalingBands) {
  Llama3RopeScaling s{true, 8.0, 1.0, 4.0, 8192};
  std::vector<float> base = RopeInverseFrequencies(128, 500000.0, {});
  std::vector<float> scaled = RopeInverseFrequencies(128, 500000.0, s);
  int high = 0, low = 0, mid = 0;
  for (int i = 0; i < 64; ++i) {
    double wavelen = 2 * M_PI / base[i];
    if (wavelen < 2048) {
      EXPECT_FLOAT_EQ(scaled[i], base[i]);
      ++high;
    } else if (wavelen > 8192) {
      EXPECT_NEAR(scaled[i], base[i] / 8.0, 1e-6 * base[i]);
      ++low;
    } else {
      double smooth = (8192 / wavelen - 1.0) / 3.0;
      double expected = (1 - smooth) * base[i] / 8 + smooth * base[i];
      EXPECT_NEAR(scaled[i], expected, 1e-6 * expected);
      EXPECT_LT(scaled[i], base[i]);
      EXPECT_GT(scaled[i], base[i] / 8);
      ++mid;
    }
  }
  EXPECT_GT(high, 0);
  EXPECT_GT(low, 0);
  EXPECT_GT(mid, 0);
}

TEST(RopeTest, RotatesPairsByPositionTimesFrequency) {
  std::mt19937 rng(30);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  const int64_t heads = 3, dim = 16, rows = 4;
  std::vector<float> inv_freq = RopeInverseFrequencies(dim, 10000.0, {});
  std::vector<float> x(rows * heads * dim);
  for (float& v : x) v = dist(rng);
  std::vector<float> original = x;
  const int64_t positions[rows] = {0, 1, 17, 4000};
  ApplyRopeCpu(x.data(), rows, heads, dim, positions, inv_freq.data());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* in = original.data() + (r * heads + h) * dim;
      const float* out = x.data() + (r * heads + h) * dim;
      for (int64_t i = 0; i < dim / 2; ++i) {
        double angle = double(positions[r]) * std::pow(10000.0, -2.0 * i / dim);
        double a = in[i], b = in[i + dim / 2];
        EXPECT_NEAR(out[i], a * std::cos(angle) - b * std::sin(angle), 2e-4);
        EXPECT_NEAR(out[i + dim / 2], b * std::cos(angle) + a * std::sin(angle), 2e-4);
      }
    }
  }
  // Rotations keep norms.
  for (int64_t r = 0; r < rows * heads; ++r) {
    double n0 = 0, n1 = 0;
    for (int64_t i = 0; i < dim; ++i) {
      n0 += original[r * dim + i] * original[r * dim + i];
      n1 += x[r * dim + i] * x[r * dim + i];
    }
    EXPECT_NEAR(n0, n1, 1e-5 * n0);
  }
}

}  // namespace
}  // namespace sparseaccel
