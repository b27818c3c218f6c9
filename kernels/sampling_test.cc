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
  std::mt19937 rng(34);
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
  std::mt19937 rng(44);
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

// The generator is part of the contract (the CUDA twin and the services reproduce it): pinned
// values, computed independently from the published splitmix64 (first output for state 0 is
// 0xe220a8397b1dcdaf).
TEST(SamplingTest, UniformIsPinnedSplitMix64) {
  EXPECT_DOUBLE_EQ(SamplingUniform(0, 0), 0.6524484863740322);
  EXPECT_DOUBLE_EQ(SamplingUniform(42, 7), 0.08603176010658542);
  EXPECT_DOUBLE_EQ(SamplingUniform(0xdeadbeef, 123456789), 0.2567994109553027);
  for (uint64_t step = 0; step < 1000; ++step) {
    const double u = SamplingUniform(99, step);
    EXPECT_GE(u, 0.0);
    EXPECT_LT(u, 1.0);
  }
}

// A tiny top_p keeps exactly one token (the most likely, lowest id on ties), whatever the draw.
TEST(SamplingTest, TinyTopPKeepsOnlyTheBestToken) {
  std::vector<float> logits = {0.3f, 4.0f, -2.0f, 4.0f, 1.0f};
  SamplingParams p{2.0f, 0, 1e-6f, 5};
  for (uint64_t step = 0; step < 100; ++step) {
    EXPECT_EQ(SampleTokenCpu(logits.data(), 5, p, step), 1);
  }
}

// Top-k then top-p: top-p renormalizes over the k survivors. Logits (3, 2, 1, 0, ...) at T=1:
// among the top 3 the masses are 0.665, 0.245, 0.090, so top_p 0.8 keeps the first two.
TEST(SamplingTest, TopPAppliesAfterTopK) {
  std::vector<float> logits(50, -1.0f);
  logits[7] = 3.0f, logits[3] = 2.0f, logits[20] = 1.0f, logits[0] = 0.0f;
  SamplingParams p{1.0f, 3, 0.8f, 17};
  std::map<int32_t, int> counts;
  const int draws = 4000;
  for (int s = 0; s < draws; ++s) ++counts[SampleTokenCpu(logits.data(), 50, p, s)];
  ASSERT_EQ(counts.size(), 2u);
  const double z = std::exp(3.0) + std::exp(2.0);
  EXPECT_NEAR(counts[7] / double(draws), std::exp(3.0) / z, 0.03);
  EXPECT_NEAR(counts[3] / double(draws), std::exp(2.0) / z, 0.03);
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
