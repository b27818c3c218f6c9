#include "kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace sparseaccel {
namespace {

std::vector<float> RandomLogits(int64_t vocab, std::mt19937* rng) {
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> logits(vocab);
  for (float& x : logits) x = dist(*rng);
  return logits;
}

TEST(SamplingTest, GreedyTakesArgmaxLowestIdOnTies) {
  std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f};
  EXPECT_EQ(SampleTokenCpu(logits.data(), 4, {}, 0), 1);
  SamplingParams top1{1.0f, 1, 1.0f, 9};
  EXPECT_EQ(SampleTokenCpu(logits.data(), 4, top1, 3), 1);
}

TEST(SamplingTest, SeededDrawsRepeatAndVary) {
  std::mt19937 rng(std::random_device{}());
  std::vector<float> logits = RandomLogits(1000, &rng);
  SamplingParams p{1.0f, 0, 1.0f, 42};
  std::map<int32_t, int> seen;
  for (uint64_t step = 0; step < 50; ++step) {
    int32_t t = SampleTokenCpu(logits.data(), 1000, p, step);
    EXPECT_EQ(t, SampleTokenCpu(logits.data(), 1000, p, step));
    ++seen[t];
  }
  EXPECT_GT(seen.size(), 5u);
  EXPECT_NE(SamplingUniform(1, 0), SamplingUniform(1, 1));
  EXPECT_NE(SamplingUniform(1, 0), SamplingUniform(2, 0));
}

TEST(SamplingTest, TopKAndTopPNeverReturnExcludedTokens) {
  std::mt19937 rng(std::random_device{}());
  const int64_t vocab = 300;
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<float> logits = RandomLogits(vocab, &rng);
    std::vector<int32_t> order(vocab);
    for (int i = 0; i < vocab; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
    const int top_k = 1 + static_cast<int>(rng() % 20);
    SamplingParams pk{0.7f, top_k, 1.0f, rng()};
    // Top-p set at temperature 1.3.
    SamplingParams pp{1.3f, 0, 0.6f, rng()};
    std::vector<double> probs(vocab);
    double total = 0;
    for (int i = 0; i < vocab; ++i)
      total += probs[i] = std::exp((logits[order[i]] - logits[order[0]]) / 1.3);
    int64_t nucleus = 0;
    for (double mass = 0; nucleus < vocab && mass < 0.6 * total;) mass += probs[nucleus++];
    for (uint64_t step = 0; step < 200; ++step) {
      int32_t tk = SampleTokenCpu(logits.data(), vocab, pk, step);
      int rank_k = std::find(order.begin(), order.end(), tk) - order.begin();
      EXPECT_LT(rank_k, top_k);
      int32_t tp = SampleTokenCpu(logits.data(), vocab, pp, step);
      int rank_p = std::find(order.begin(), order.end(), tp) - order.begin();
      EXPECT_LT(rank_p, nucleus);
    }
  }
}

TEST(SamplingTest, FrequenciesFollowSoftmax) {
  std::vector<float> logits = {1.0f, 0.0f, 2.0f, -1.0f};
  SamplingParams p{1.0f, 0, 1.0f, 7};
  std::vector<int> counts(4);
  const int draws = 20000;
  for (int s = 0; s < draws; ++s) ++counts[SampleTokenCpu(logits.data(), 4, p, s)];
  double z = std::exp(1.0) + 1 + std::exp(2.0) + std::exp(-1.0);
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(counts[i] / double(draws), std::exp(double(logits[i])) / z, 0.015) << i;
  }
}

}  // namespace
}  // namespace sparseaccel
