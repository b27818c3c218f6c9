#include "kernels/sparse/pattern_search.h"

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "kernels/sparse/pattern_config.h"
#include "kernels/sparse/planted.h"

namespace sparseaccel {
namespace {

constexpr int64_t kDim = 64;

// Searching these heads alone, to print what each candidate measures when a test fails.
void PrintCandidates(const std::vector<HeadSample>& samples,
                     const std::vector<HeadPattern>& candidates, int64_t n) {
  for (const HeadPattern& p : candidates) {
    const HeadChoice alone = SearchHead(samples, kDim, SearchRule{1.0 - 1e-9, 0}, {p}, n);
    std::printf(
        "%s v=%ld s=%ld k=%ld w=%ld: density %.3f tiles %.3f error %.3f recall %.3f tail %.3f\n",
        std::string(PatternName(p.kind)).c_str(), long(p.vertical_slash.vertical),
        long(p.vertical_slash.slash), long(p.top_k), long(p.window), alone.fidelity.density,
        alone.fidelity.tile_cost, alone.fidelity.relative_error, alone.fidelity.recall,
        alone.fidelity.tail_recall);
  }
}

TEST(PatternSearchTest, PicksThePlantedPatternPerHead) {
  std::mt19937 rng(11);
  const int64_t n = 1024;
  const std::vector<HeadPattern> candidates = CandidatePatterns(n);
  const struct {
    Planted planted;
    HeadPattern::Kind expected;
  } heads[] = {{Planted::kVertical, HeadPattern::Kind::kVerticalSlash},
               {Planted::kSlash, HeadPattern::Kind::kVerticalSlash},
               {Planted::kBlock, HeadPattern::Kind::kBlockSparse},
               {Planted::kSinkLocal, HeadPattern::Kind::kAShape}};
  const SearchRule rule{0.55, 0.75};
  for (const auto& head : heads) {
    std::vector<HeadSample> samples = {PlantedHead(head.planted, n, kDim, &rng)};
    HeadChoice choice = SearchHead(samples, kDim, rule, candidates, n);
    if (choice.pattern.kind != head.expected) PrintCandidates(samples, candidates, n);
    EXPECT_EQ(choice.pattern.kind, head.expected)
        << PatternName(choice.pattern.kind) << " chosen for planted "
        << static_cast<int>(head.planted) << ": " << choice.reason;
    EXPECT_LE(choice.fidelity.density, rule.target_density);
    EXPECT_GE(RecallScore(choice.fidelity), rule.recall_floor);
  }
}

// A head that attends locally everywhere except in its last queries, which look up one key far
// back (a question about a passkey): A-shape keeps nearly all of the mean recall but none of
// the lookup, so the search must not take it.
TEST(PatternSearchTest, KeepsTheLookupOfTheLastQueries) {
  std::mt19937 rng(13);
  const int64_t n = 1024, needle = 411;
  HeadSample sample = PlantedHead(Planted::kSinkLocal, n, kDim, &rng);
  std::normal_distribution<float> normal;
  std::vector<float> u(kDim);
  for (float& x : u) x = normal(rng);
  for (int64_t t = 0; t < kDim; ++t) {
    sample.k[needle * kDim + t] += 2.0f * u[t];
    for (int64_t i = n - kTailQueries; i < n; ++i) sample.q[i * kDim + t] += 2.0f * u[t];
  }
  const std::vector<HeadSample> samples = {sample};
  const std::vector<HeadPattern> candidates = CandidatePatterns(n);
  HeadPattern a_shape;
  a_shape.kind = HeadPattern::Kind::kAShape;
  a_shape.sink = kBlockSize;
  a_shape.window = n / 5;
  const Fidelity local = SearchHead(samples, kDim, SearchRule{1 - 1e-9, 0}, {a_shape}, n).fidelity;
  EXPECT_GT(local.recall, 0.8);
  EXPECT_LT(local.tail_recall, 0.5);
  const HeadChoice choice = SearchHead(samples, kDim, SearchRule{0.3, 0.8}, candidates, n);
  if (choice.pattern.kind == HeadPattern::Kind::kAShape) PrintCandidates(samples, candidates, n);
  EXPECT_NE(choice.pattern.kind, HeadPattern::Kind::kAShape) << choice.reason;
  EXPECT_GE(choice.fidelity.tail_recall, 0.8) << choice.reason;
}

// The rule judges the worst sample: a candidate perfect on one prompt and poor on the other
// loses to one that is good on both, and with no candidate at the floor the head stays dense.
TEST(PatternSearchTest, ChoosesOnTheWorstSampleAndFallsBackToDense) {
  HeadPattern a, b;
  a.kind = HeadPattern::Kind::kAShape;
  b.kind = HeadPattern::Kind::kBlockSparse;
  const Fidelity a_worst = WorstOf(WorstOf(kNoSamples, Fidelity{0.05, 0.06, 1.0, 0.01, 1.0}),
                                   Fidelity{0.05, 0.06, 0.99, 0.3, 0.4});
  const Fidelity b_worst = WorstOf(WorstOf(kNoSamples, Fidelity{0.08, 0.09, 0.93, 0.1, 0.92}),
                                   Fidelity{0.08, 0.09, 0.94, 0.1, 0.91});
  EXPECT_DOUBLE_EQ(a_worst.tail_recall, 0.4);
  EXPECT_DOUBLE_EQ(a_worst.relative_error, 0.3);
  HeadChoice choice = ChooseCandidate({a, b}, {a_worst, b_worst}, SearchRule{0.1, 0.9});
  EXPECT_EQ(choice.pattern.kind, HeadPattern::Kind::kBlockSparse) << choice.reason;
  EXPECT_DOUBLE_EQ(choice.fidelity.tail_recall, 0.91);
  // Over the target: the cheapest candidate that keeps the floor, said so.
  choice = ChooseCandidate({a, b}, {a_worst, b_worst}, SearchRule{0.06, 0.9});
  EXPECT_EQ(choice.pattern.kind, HeadPattern::Kind::kBlockSparse);
  EXPECT_NE(choice.reason.find("no candidate within density"), std::string::npos);
  choice = ChooseCandidate({a, b}, {a_worst, b_worst}, SearchRule{0.1, 0.95});
  EXPECT_EQ(choice.pattern.kind, HeadPattern::Kind::kDense);
  EXPECT_NE(choice.reason.find("no candidate keeps recall"), std::string::npos) << choice.reason;
  EXPECT_EQ(ChooseCandidate({a, b}, {a_worst, b_worst}, SearchRule{1.0, 0.9}).pattern.kind,
            HeadPattern::Kind::kDense);
}

TEST(PatternSearchTest, StructurelessHeadsPayForTheirRecall) {
  std::mt19937 rng(12);
  const int64_t n = 300;
  std::vector<HeadSample> samples = {PlantedHead(Planted::kNone, n, kDim, &rng),
                                     PlantedHead(Planted::kNone, n, kDim, &rng)};
  const std::vector<HeadPattern> candidates = CandidatePatterns(n);
  // Nearly uniform attention: keeping 90% of it costs more than 30% of the pairs.
  HeadChoice strict = SearchHead(samples, kDim, SearchRule{0.3, 0.9}, candidates, n);
  EXPECT_GE(RecallScore(strict.fidelity), 0.9);
  EXPECT_GT(strict.fidelity.density, 0.3);
  HeadChoice loose = SearchHead(samples, kDim, SearchRule{0.9, 0}, candidates, n);
  EXPECT_LE(loose.fidelity.density, 0.9);
  // No candidate within the target: the cheapest of all.
  HeadChoice impossible = SearchHead(samples, kDim, SearchRule{1e-4, 0}, candidates, n);
  for (const HeadPattern& p : candidates) {
    double cost = 0;
    for (const HeadSample& s : samples) {
      cost =
          std::max(cost, IndexTileCost(BuildIndex(p, s.q.data(), kDim, s.k.data(), kDim, n, kDim)));
    }
    EXPECT_GE(cost, impossible.fidelity.tile_cost - 1e-12);
  }
  EXPECT_EQ(SearchHead(samples, kDim, SearchRule{1.0, 0.9}, candidates, n).pattern.kind,
            HeadPattern::Kind::kDense);
}

// Budgets chosen at one length keep their fraction of the prompt at another; sinks and last_q
// stay.
TEST(PatternConfigTest, BudgetsScaleWithThePromptLength) {
  HeadPattern a_shape{HeadPattern::Kind::kAShape, 64, 400}, bs, vs;
  bs.kind = HeadPattern::Kind::kBlockSparse;
  bs.top_k = 3;
  vs.kind = HeadPattern::Kind::kVerticalSlash;
  vs.vertical_slash = {100, 300, 64};
  EXPECT_EQ(PatternAtLength(a_shape, 16384, 4096).window, 1600);
  EXPECT_EQ(PatternAtLength(a_shape, 16384, 4096).sink, 64);
  EXPECT_EQ(PatternAtLength(a_shape, 1024, 4096).window, 100);
  EXPECT_EQ(PatternAtLength(a_shape, 100, 4096).window, kBlockSize);
  EXPECT_EQ(PatternAtLength(bs, 16384, 4096).top_k, 12);
  EXPECT_EQ(PatternAtLength(bs, 1000, 4096).top_k, 1);
  EXPECT_EQ(PatternAtLength(vs, 16384, 4096).vertical_slash.vertical, 400);
  EXPECT_EQ(PatternAtLength(vs, 16384, 4096).vertical_slash.slash, 1200);
  EXPECT_EQ(PatternAtLength(vs, 16384, 4096).vertical_slash.last_q, 64);
  EXPECT_EQ(PatternAtLength(vs, 1024, 4096).vertical_slash.vertical, 25);
  EXPECT_EQ(PatternAtLength(vs, 100, 4096).vertical_slash.vertical, 4);
  EXPECT_EQ(PatternAtLength(vs, 100, 4096).vertical_slash.slash, kBlockSize);
  EXPECT_EQ(PatternAtLength(a_shape, 16384, 0).window, 400);  // Absolute budgets.
}

SparseConfig ExampleConfig() {
  SparseConfig config;
  config.num_layers = 2;
  config.num_heads = 3;
  config.dense_below_tokens = 1000;
  config.target_density = 0.15;
  config.calibration_prompts = 2;
  config.calibration_tokens = 512;
  config.budget_tokens = 512;
  config.calibration_seed = 18446744073709551557u;  // Above int64's range.
  HeadPattern dense, a_shape{HeadPattern::Kind::kAShape, 64, 256}, vs, bs;
  vs.kind = HeadPattern::Kind::kVerticalSlash;
  vs.vertical_slash = {100, 300, 64};
  bs.kind = HeadPattern::Kind::kBlockSparse;
  bs.top_k = 5;
  config.heads = {{dense, a_shape, vs}, {bs, vs, a_shape}};
  return config;
}

TEST(PatternConfigTest, RoundTrips) {
  const SparseConfig config = ExampleConfig();
  const std::string json = SparseConfigToJson(config);
  absl::StatusOr<SparseConfig> parsed = ParseSparseConfig(json);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(SparseConfigToJson(*parsed), json);
  EXPECT_EQ(parsed->heads[0][2].vertical_slash.slash, 300);
  EXPECT_EQ(parsed->heads[1][0].top_k, 5);
  EXPECT_EQ(parsed->heads[0][1].window, 256);
  EXPECT_EQ(parsed->calibration_seed, config.calibration_seed);
  EXPECT_EQ(parsed->budget_tokens, 512);
  // Configs written before budget_tokens existed keep absolute budgets.
  std::string old = json;
  old.erase(old.find("\"budget_tokens\""), std::string("\"budget_tokens\": 512,").size());
  absl::StatusOr<SparseConfig> absolute = ParseSparseConfig(old);
  ASSERT_TRUE(absolute.ok()) << absolute.status() << old;
  EXPECT_EQ(absolute->budget_tokens, 0);
}

TEST(PatternConfigTest, OneHeadIsOneLineOfTheConfigsJson) {
  const SparseConfig config = ExampleConfig();
  EXPECT_EQ(HeadPatternToJson(config.heads[0][0]), R"({"pattern":"dense"})");
  EXPECT_EQ(HeadPatternToJson(config.heads[0][1]),
            R"({"pattern":"a_shape","sink":64,"window":256})");
  EXPECT_EQ(HeadPatternToJson(config.heads[0][2]),
            R"({"last_q":64,"pattern":"vertical_slash","slash":300,"vertical":100})");
  EXPECT_EQ(HeadPatternToJson(config.heads[1][0]), R"({"pattern":"block_sparse","top_k":5})");
}

TEST(PatternConfigTest, BadConfigsFailCleanly) {
  const std::string good = SparseConfigToJson(ExampleConfig());
  auto replaced = [&](const std::string& from, const std::string& to) {
    std::string text = good;
    size_t at = text.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return text.replace(at, from.size(), to);
  };
  const std::pair<std::string, std::string> cases[] = {
      {replaced("\"version\": 1", "\"version\": 2"), "version"},
      {replaced("\"num_heads\": 3", "\"num_heads\": 4"), "heads"},
      {replaced("\"num_layers\": 2", "\"num_layers\": 3"), "layers"},
      {replaced("\"a_shape\"", "\"strided\""), "unknown pattern"},
      {replaced("\"top_k\": 5", "\"top_k\": 0"), "top_k"},
      {replaced("\"slash\": 300", "\"slash\": -3"), "slash"},
      {replaced("\"window\": 256", "\"window\": \"big\""), "window"},
      {replaced("\"target_density\": 0.15", "\"target_density\": 2"), "target_density"},
      {replaced("\"top_k\": 5", "\"topk\": 5"), "unknown key 'topk'"},
      {replaced("\"seed\": 18446744073709551557", "\"seed\": -1"), "seed"},
      {replaced("\"dense_below_tokens\"", "\"dense_below\""), "unknown key 'dense_below'"},
      {replaced("\"budget_tokens\": 512", "\"budget_tokens\": -1"), "budget_tokens"},
      {"{", "JSON"},
      {"[]", "JSON"},
  };
  for (const auto& [text, expected] : cases) {
    absl::StatusOr<SparseConfig> parsed = ParseSparseConfig(text);
    ASSERT_FALSE(parsed.ok()) << expected;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(parsed.status().message()).find(expected), std::string::npos)
        << parsed.status();
  }
  EXPECT_EQ(LoadSparseConfig("/nonexistent.json").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace sparseaccel
