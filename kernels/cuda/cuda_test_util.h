#ifndef SPARSEACCEL_KERNELS_CUDA_CUDA_TEST_UTIL_H_
#define SPARSEACCEL_KERNELS_CUDA_CUDA_TEST_UTIL_H_

// Shared by the GPU kernel tests: bf16 conversions, a fixture with a fresh seed per test
// (recorded, printed on failure), and a relative-error check.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kernels/cuda/attention_inner_loop.h"

namespace sparseaccel {
namespace cuda {

constexpr uint8_t kNanBytes = 0xff;

inline uint16_t ToBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (std::isnan(x)) return 0x7fc0;
  bits += 0x7fff + ((bits >> 16) & 1);  // Round to nearest even.
  return static_cast<uint16_t>(bits >> 16);
}

inline float FromBf16(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

inline std::vector<float> FromBf16(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  std::transform(v.begin(), v.end(), out.begin(), [](uint16_t b) { return FromBf16(b); });
  return out;
}

inline const char* InnerLoopName(AttentionInnerLoop loop) {
  switch (loop) {
    case AttentionInnerLoop::kAuto:
      return "auto";
    case AttentionInnerLoop::kMmaSync:
      return "mma.sync";
    case AttentionInnerLoop::kWgmma:
      return "wgmma";
  }
  return "?";
}

// True when `status` says a kernel asked for wgmma on a device without it: that variant is
// skipped (said once on stderr); every other status is the test's to check.
inline bool WgmmaUnavailable(AttentionInnerLoop loop, const absl::Status& status) {
  if (loop != AttentionInnerLoop::kWgmma || !absl::IsFailedPrecondition(status)) return false;
  static bool said = false;
  if (!said) std::fprintf(stderr, "wgmma variants skipped: %s\n", status.ToString().c_str());
  said = true;
  return true;
}

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    RecordProperty("seed", std::to_string(seed_));
  }

  // bf16 values of N(0, stddev) (resampled until no element is exactly zero).
  std::vector<uint16_t> RandomBf16(size_t count, float stddev = 1.f) {
    std::normal_distribution<float> dist(0.f, stddev);
    std::vector<uint16_t> v(count);
    for (uint16_t& x : v) {
      do {
        x = ToBf16(dist(rng_));
      } while (FromBf16(x) == 0.f);
    }
    return v;
  }

  // Every element finite, and max|a-b| / max|b| below `bound`.
  void ExpectClose(const std::vector<float>& actual, const std::vector<float>& expected,
                   double bound, const std::string& what) {
    ASSERT_EQ(actual.size(), expected.size()) << what;
    double max_diff = 0, max_ref = 0;
    for (size_t i = 0; i < actual.size(); ++i) {
      ASSERT_TRUE(std::isfinite(actual[i])) << what << " element " << i << " seed " << seed_;
      max_diff = std::max(max_diff, std::abs(double(actual[i]) - expected[i]));
      max_ref = std::max(max_ref, std::abs(double(expected[i])));
    }
    ASSERT_GT(max_ref, 0) << what;
    EXPECT_LT(max_diff / max_ref, bound) << what << " seed " << seed_;
  }

  uint32_t seed_ = 0;
  std::mt19937_64 rng_;
};

// Both evaluate `expr` once (it usually launches a kernel).
#define ASSERT_OK(expr)                                       \
  do {                                                        \
    const ::absl::Status assert_ok_status_ = (expr);          \
    ASSERT_TRUE(assert_ok_status_.ok()) << assert_ok_status_; \
  } while (0)
#define ASSERT_OK_AND_ASSIGN(lhs, expr)            \
  auto lhs##_or = (expr);                          \
  ASSERT_TRUE(lhs##_or.ok()) << lhs##_or.status(); \
  auto lhs = std::move(*lhs##_or)

}  // namespace cuda
}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_CUDA_CUDA_TEST_UTIL_H_
