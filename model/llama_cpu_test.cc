#include "model/llama_cpu.h"

#include <sys/stat.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/checkpoint_maker.h"

namespace sparseaccel {
namespace {

// A tiny GQA model with llama3 rope scaling, fresh weights per test run.
std::unique_ptr<LlamaCpu> TinyModel(const std::string& name, bool tied = false) {
  const char* base = getenv("TEST_TMPDIR");
  const std::string dir = std::string(base ? base : "/tmp") + "/" + name;
  CheckpointOptions options;
  options.config = PresetConfig("tiny").value();
  options.config.tie_word_embeddings = tied;
  options.config.bos_token_id = 510;
  options.config.eos_token_ids = {511};
  options.seed = std::random_device{}();
  options.init_std = 0.08;
  options.dtype = DType::kBF16;
  EXPECT_TRUE(WriteRandomCheckpoint(dir, options).ok());
  absl::StatusOr<std::unique_ptr<LlamaCpu>> model = LlamaCpu::Load(dir);
  EXPECT_TRUE(model.ok()) << model.status();
  return std::move(model).value();
}

std::vector<int32_t> RandomTokens(int64_t n, int64_t vocab, std::mt19937* rng) {
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = static_cast<int32_t>((*rng)() % vocab);
  return t;
}

double MaxRelativeError(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, double(std::fabs(a[i] - b[i])));
    ref = std::max(ref, double(std::fabs(b[i])));
  }
  return err / ref;
}

TEST(LlamaCpuTest, DecodeStepsEqualFullRecompute) {
  auto model = TinyModel("decode_eq");
  std::mt19937 rng(std::random_device{}());
  const int64_t vocab = model->config().vocab_size;
  std::vector<int32_t> tokens = RandomTokens(40, vocab, &rng);

  ContiguousKvStore full_kv(model->kv_shape(), 64);
  std::vector<float> full;
  ASSERT_TRUE(model->Forward({SequenceChunk{tokens, 0, &full_kv, LogitsFor::kAll}}, &full).ok());
  ASSERT_EQ(full.size(), tokens.size() * vocab);

  // Prefill 30 tokens, then one token at a time on a paged cache with small blocks.
  KvBlockPool pool(model->kv_shape(), 8, 16);
  std::vector<float> stepped;
  {
    PagedKvStore kv(&pool);
    absl::Span<const int32_t> all(tokens);
    ASSERT_TRUE(
        model->Forward({SequenceChunk{all.subspan(0, 30), 0, &kv, LogitsFor::kAll}}, &stepped)
            .ok());
    for (int64_t p = 30; p < 40; ++p) {
      ASSERT_TRUE(
          model->Forward({SequenceChunk{all.subspan(p, 1), p, &kv, LogitsFor::kLast}}, &stepped)
              .ok());
    }
    EXPECT_EQ(pool.free_blocks(), 16 - 5);
  }
  EXPECT_EQ(pool.free_blocks(), 16);
  EXPECT_LT(MaxRelativeError(stepped, full), 1e-5);
}

TEST(LlamaCpuTest, BatchedSequencesEqualEachAlone) {
  auto model = TinyModel("batched", /*tied=*/true);
  std::mt19937 rng(std::random_device{}());
  const int64_t vocab = model->config().vocab_size;
  std::vector<std::vector<int32_t>> prompts = {
      RandomTokens(17, vocab, &rng), RandomTokens(5, vocab, &rng), RandomTokens(33, vocab, &rng)};
  std::vector<float> alone;
  for (const auto& p : prompts) {
    ContiguousKvStore kv(model->kv_shape(), 64);
    ASSERT_TRUE(model->Forward({SequenceChunk{p, 0, &kv, LogitsFor::kLast}}, &alone).ok());
  }
  std::vector<std::unique_ptr<ContiguousKvStore>> stores;
  std::vector<SequenceChunk> batch;
  for (const auto& p : prompts) {
    stores.push_back(std::make_unique<ContiguousKvStore>(model->kv_shape(), 64));
    batch.push_back(SequenceChunk{p, 0, stores.back().get(), LogitsFor::kLast});
  }
  std::vector<float> together;
  ASSERT_TRUE(model->Forward(batch, &together).ok());
  EXPECT_LT(MaxRelativeError(together, alone), 1e-5);
}

TEST(LlamaCpuTest, RejectsBadTokensAndPositions) {
  auto model = TinyModel("bad_input");
  ContiguousKvStore kv(model->kv_shape(), 8);
  std::vector<float> logits;
  std::vector<int32_t> bad = {1, 512};
  EXPECT_EQ(model->Forward({SequenceChunk{bad, 0, &kv}}, &logits).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> negative = {-1};
  EXPECT_EQ(model->Forward({SequenceChunk{negative, 0, &kv}}, &logits).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> ok = {1, 2};
  EXPECT_EQ(
      model->Forward({SequenceChunk{ok, model->config().max_position_embeddings - 1, &kv}}, &logits)
          .code(),
      absl::StatusCode::kInvalidArgument);
  // A full KV store is an error, not a crash.
  std::vector<int32_t> long_prompt(9, 3);
  EXPECT_EQ(model->Forward({SequenceChunk{long_prompt, 0, &kv}}, &logits).code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(LlamaCpuTest, LoadFailsCleanlyOnMissingWeights) {
  EXPECT_FALSE(LlamaCpu::Load("/nonexistent").ok());
}

TEST(KvBlockPoolTest, ExhaustionAllocatesNothing) {
  KvBlockPool pool(KvShape{2, 2, 4}, 4, 3);
  auto a = pool.Allocate(2);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(pool.Allocate(2).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool.free_blocks(), 1);
  pool.Free(*a);
  EXPECT_EQ(pool.free_blocks(), 3);
  // Blocks do not overlap: K and V of every block and layer are distinct regions.
  EXPECT_EQ(pool.V(0, 0) - pool.K(0, 0), 2 * 4 * 8);
  EXPECT_EQ(pool.K(1, 0) - pool.K(0, 0), 2 * 2 * 4 * 8);
}

}  // namespace
}  // namespace sparseaccel
