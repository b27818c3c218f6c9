#include "model/sparse/sparse_prefill.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "kernels/sampling.h"
#include "model/checkpoint/checkpoint_maker.h"
#include "model/test_util.h"

namespace sparseaccel {
namespace {

std::unique_ptr<LlamaCpu> TinyModel() {
  const char* tmp = getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/sparse_model";
  CheckpointOptions options;
  options.config = PresetConfig("tiny").value();
  options.seed = 31;
  options.init_std = 0.08;
  EXPECT_TRUE(WriteRandomCheckpoint(dir, options).ok());
  return LlamaCpu::Load(dir).value();
}

SparseConfig UniformConfig(const ModelConfig& model, const std::vector<HeadPattern>& cycle,
                           int64_t dense_below) {
  SparseConfig config;
  config.num_layers = model.num_hidden_layers;
  config.num_heads = model.num_attention_heads;
  config.dense_below_tokens = dense_below;
  for (int64_t l = 0; l < config.num_layers; ++l) {
    config.heads.emplace_back();
    for (int64_t h = 0; h < config.num_heads; ++h) {
      config.heads.back().push_back(cycle[(l + h) % cycle.size()]);
    }
  }
  return config;
}

std::vector<float> Prefill(LlamaCpu* model, const std::vector<int32_t>& prompt,
                           AttentionOverride* attention) {
  model->SetAttentionOverride(attention);
  ContiguousKvStore kv(model->kv_shape(), prompt.size());
  std::vector<float> logits;
  EXPECT_TRUE(model->Forward({SequenceChunk{prompt, 0, &kv, LogitsFor::kAll}}, &logits).ok());
  model->SetAttentionOverride(nullptr);
  return logits;
}

TEST(SparsePrefillTest, FullBudgetsEqualDenseAndShortPromptsStayDense) {
  auto model = TinyModel();
  std::mt19937 rng(32);
  std::vector<int32_t> prompt(300);
  for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % 512);
  const int64_t n = static_cast<int64_t>(prompt.size());
  HeadPattern a_shape{HeadPattern::Kind::kAShape, 0, n}, vs, bs;
  vs.kind = HeadPattern::Kind::kVerticalSlash;
  vs.vertical_slash = {n, n, 64};
  bs.kind = HeadPattern::Kind::kBlockSparse;
  bs.top_k = n;
  auto full = SparsePrefillAttention::Create(model->config(),
                                             UniformConfig(model->config(), {a_shape, vs, bs}, 64));
  ASSERT_TRUE(full.ok());
  const std::vector<float> dense = Prefill(model.get(), prompt, nullptr);
  // Each row runs the engine's attention row over the same keys: bit for bit.
  EXPECT_EQ(Prefill(model.get(), prompt, full->get()), dense);
  EXPECT_NEAR((*full)->MeanDensity(), 1.0, 1e-9);

  // Below dense_below_tokens nothing changes, bit for bit.
  HeadPattern tiny_window{HeadPattern::Kind::kAShape, 0, 64};
  auto sparse = SparsePrefillAttention::Create(
      model->config(), UniformConfig(model->config(), {tiny_window}, n + 1));
  EXPECT_EQ(Prefill(model.get(), prompt, sparse->get()), dense);
}

TEST(SparsePrefillTest, SearchedConfigRunsAndReportsItsDistanceFromDense) {
  auto model = TinyModel();
  std::mt19937 rng(33);
  std::vector<int32_t> prompt(512);
  for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % 512);
  // Calibrate on the prompt itself and on a second one, then prefill sparsely.
  std::vector<int32_t> other(400);
  for (int32_t& t : other) t = static_cast<int32_t>(rng() % 512);
  absl::StatusOr<ModelSearch> search =
      SearchModelPatterns(model.get(), {prompt, other}, SearchRule{0.5, 0}, 256);
  ASSERT_TRUE(search.ok()) << search.status();
  const SparseConfig& config = search->config;
  EXPECT_EQ(config.calibration_prompts, 2);
  EXPECT_EQ(config.calibration_tokens, 512);
  EXPECT_EQ(config.budget_tokens, 512);
  ASSERT_EQ(search->choices.size(), config.heads.size());
  for (const auto& layer : search->choices) {
    for (const HeadChoice& choice : layer) EXPECT_LE(choice.fidelity.density, 0.5);
  }
  EXPECT_LE(search->mean.density, 0.5);
  EXPECT_GT(search->mean.recall, 0);
  absl::StatusOr<SparseConfig> parsed = ParseSparseConfig(SparseConfigToJson(config));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(SparseConfigToJson(*parsed), SparseConfigToJson(config));
  auto sparse = SparsePrefillAttention::Create(model->config(), config);
  ASSERT_TRUE(sparse.ok());
  const std::vector<float> dense = Prefill(model.get(), prompt, nullptr);
  const std::vector<float> approx = Prefill(model.get(), prompt, sparse->get());
  const double error = MaxRelativeError(approx, dense);
  EXPECT_TRUE(std::isfinite(error));
  EXPECT_LT((*sparse)->MeanDensity(), 0.5 + 1e-9);
  const int64_t vocab = model->config().vocab_size;
  int same = 0;
  for (size_t r = 0; r < prompt.size(); ++r) {
    same += SampleTokenCpu(&approx[r * vocab], vocab, {}, 0) ==
            SampleTokenCpu(&dense[r * vocab], vocab, {}, 0);
  }
  RecordProperty("max_relative_logit_error", std::to_string(error));
  RecordProperty("greedy_agreement", std::to_string(double(same) / prompt.size()));
  std::printf(
      "sparse prefill: density %.3f, max relative logit error %.4f, greedy agreement "
      "%.3f\n",
      (*sparse)->MeanDensity(), error, double(same) / prompt.size());
}

TEST(SparsePrefillTest, BadSearchInputsAndMismatchedConfigsAreRejected) {
  auto model = TinyModel();
  const std::vector<int32_t> prompt(100, 7);
  EXPECT_EQ(SearchModelPatterns(model.get(), {}, SearchRule{0.5, 0.9}, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SearchModelPatterns(model.get(), {prompt}, SearchRule{0, 0.9}, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SearchModelPatterns(model.get(), {prompt}, SearchRule{0.5, 1.5}, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SearchModelPatterns(model.get(), {prompt, {}}, SearchRule{0.5, 0.9}, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  SparseConfig config = UniformConfig(model->config(), {HeadPattern{}}, 0);
  config.num_heads += 1;
  EXPECT_EQ(SparsePrefillAttention::Create(model->config(), config).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sparseaccel
