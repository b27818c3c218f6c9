#include "kernels/sparse/pattern_search.h"

#include <cstdio>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "kernels/sparse/pattern_config.h"
#include "kernels/sparse/planted.h"

namespace sparseaccel {
namespace {

constexpr int64_t kDim = 64;

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
  for (const auto& head : heads) {
    std::vector<HeadSample> samples = {PlantedHead(head.planted, n, kDim, &rng)};
    HeadChoice choice = SearchHead(samples, kDim, 0.55, candidates);
    if (choice.pattern.kind != head.expected) {
      for (const HeadPattern& p : candidates) {
        HeadChoice alone = SearchHead(samples, kDim, 1.0 - 1e-9, {p});
        std::printf("%s v=%ld s=%ld k=%ld w=%ld: density %.3f tiles %.3f error %.3f recall %.3f\n",
                    std::string(PatternName(p.kind)).c_str(), long(p.vertical_slash.vertical),
                    long(p.vertical_slash.slash), long(p.top_k), long(p.window),
                    alone.fidelity.density, alone.fidelity.tile_cost, alone.fidelity.relative_error,
                    alone.fidelity.recall);
      }
    }
    EXPECT_EQ(choice.pattern.kind, head.expected)
        << PatternName(choice.pattern.kind) << " chosen for planted "
        << static_cast<int>(head.planted) << ", error " << choice.fidelity.relative_error;
    EXPECT_LE(choice.fidelity.density, 0.55);
    EXPECT_GT(choice.fidelity.recall, 0.75);
  }
}

TEST(PatternSearchTest, RespectsTheTargetAndFallsBackToTheSparsest) {
  std::mt19937 rng(12);
  const int64_t n = 300;
  std::vector<HeadSample> samples = {PlantedHead(Planted::kNone, n, kDim, &rng),
                                     PlantedHead(Planted::kNone, n, kDim, &rng)};
  const std::vector<HeadPattern> candidates = CandidatePatterns(n);
  HeadChoice loose = SearchHead(samples, kDim, 0.9, candidates);
  EXPECT_LE(loose.fidelity.density, 0.9);
  HeadChoice impossible = SearchHead(samples, kDim, 1e-4, candidates);
  for (const HeadPattern& p : candidates) {
    double density = 0;
    for (const HeadSample& s : samples) {
      density += IndexDensity(BuildIndex(p, s.q.data(), kDim, s.k.data(), kDim, n, kDim)) / 2;
    }
    EXPECT_GE(density, impossible.fidelity.density - 1e-12);
  }
  EXPECT_EQ(SearchHead(samples, kDim, 1.0, candidates).pattern.kind, HeadPattern::Kind::kDense);
}

SparseConfig ExampleConfig() {
  SparseConfig config;
  config.num_layers = 2;
  config.num_heads = 3;
  config.dense_below_tokens = 1000;
  config.target_density = 0.15;
  config.calibration_prompts = 2;
  config.calibration_tokens = 512;
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
