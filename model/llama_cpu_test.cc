#include "model/llama_cpu.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/sampling.h"
#include "model/checkpoint/checkpoint_maker.h"
#include "model/test_util.h"

namespace sparseaccel {
namespace {

// A tiny GQA model with llama3 rope scaling; each test draws its weights from its own seed.
std::unique_ptr<LlamaCpu> TinyModel(const std::string& name, uint64_t seed, bool tied = false) {
  const char* base = getenv("TEST_TMPDIR");
  const std::string dir = std::string(base ? base : "/tmp") + "/" + name;
  CheckpointOptions options;
  options.config = PresetConfig("tiny").value();
  options.config.tie_word_embeddings = tied;
  options.config.bos_token_id = 510;
  options.config.eos_token_ids = {511};
  options.seed = seed;
  options.init_std = 0.08;
  options.dtype = DType::kBF16;
  EXPECT_TRUE(WriteRandomCheckpoint(dir, options).ok());
  absl::StatusOr<std::unique_ptr<LlamaCpu>> model = LlamaCpu::Load(dir);
  EXPECT_TRUE(model.ok()) << model.status();
  return std::move(model).value();
}

TEST(LlamaCpuTest, DecodeStepsEqualFullRecompute) {
  auto model = TinyModel("decode_eq", 1001);
  std::mt19937 rng(1);
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

// Tensor-parallel shards (heads, KV heads and MLP columns split, partial o_proj and down_proj
// outputs summed) compute the unsharded model: the same logits up to fp32 summation order,
// the same greedy tokens and the same KV cache, for a prefill on a paged cache and decode steps.
TEST(LlamaCpuTest, TensorParallelShardsComputeTheUnshardedModel) {
  const char* base = getenv("TEST_TMPDIR");
  const std::string dir = std::string(base ? base : "/tmp") + "/tensor_parallel";
  CheckpointOptions options;
  options.config = PresetConfig("tiny").value();
  options.config.num_attention_heads = 8;
  options.config.num_key_value_heads = 4;
  options.config.head_dim = 16;
  options.seed = 1017;
  options.init_std = 0.08;
  options.dtype = DType::kBF16;
  ASSERT_TRUE(WriteRandomCheckpoint(dir, options).ok());
  std::random_device seed;
  std::mt19937 rng(seed());
  const std::vector<int32_t> tokens = RandomTokens(37, options.config.vocab_size, &rng);
  // Logits of a 33-token prefill and 4 decode steps, and the cache rows they wrote.
  const auto run = [&](int64_t shards, std::vector<float>* k_rows) {
    absl::StatusOr<std::unique_ptr<LlamaCpu>> model = LlamaCpu::Load(dir, {shards});
    EXPECT_TRUE(model.ok()) << model.status();
    KvBlockPool pool((*model)->kv_shape(), 8, 8);
    PagedKvStore kv(&pool);
    std::vector<float> logits;
    absl::Span<const int32_t> all(tokens);
    EXPECT_TRUE((*model)
                    ->Forward({SequenceChunk{all.subspan(0, 33), 0, &kv, LogitsFor::kAll}}, &logits)
                    .ok());
    for (int64_t p = 33; p < 37; ++p) {
      EXPECT_TRUE(
          (*model)
              ->Forward({SequenceChunk{all.subspan(p, 1), p, &kv, LogitsFor::kLast}}, &logits)
              .ok());
    }
    const KvLayerView view = kv.Layer(1, 37).value();
    for (int64_t p = 0; p < 37; ++p) {
      k_rows->insert(k_rows->end(), view.KRow(p), view.KRow(p) + view.row_size);
    }
    return logits;
  };
  std::vector<float> k_one;
  const std::vector<float> one = run(1, &k_one);
  const int64_t vocab = options.config.vocab_size;
  for (int64_t shards : {2, 4}) {
    std::vector<float> k_sharded;
    const std::vector<float> sharded = run(shards, &k_sharded);
    ASSERT_EQ(sharded.size(), one.size());
    EXPECT_LT(MaxRelativeError(sharded, one), 1e-5) << shards << " shards";
    EXPECT_LT(MaxRelativeError(k_sharded, k_one), 1e-5) << shards << " shards";
    for (size_t r = 0; r < one.size() / vocab; ++r) {
      EXPECT_EQ(SampleTokenCpu(&sharded[r * vocab], vocab, {}, 0),
                SampleTokenCpu(&one[r * vocab], vocab, {}, 0))
          << shards << " shards, row " << r;
    }
  }
  EXPECT_EQ(LlamaCpu::Load(dir, {3}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LlamaCpu::Load(dir, {0}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LlamaCpuTest, BatchedSequencesEqualEachAlone) {
  auto model = TinyModel("batched", 1002, /*tied=*/true);
  std::mt19937 rng(2);
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
  auto model = TinyModel("bad_input", 1003);
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

// Weights that do not match config.json are refused with the tensor's name, not read out of
// bounds.
TEST(LlamaCpuTest, LoadChecksWeightShapesAgainstTheConfig) {
  const std::string dir = std::string(getenv("TEST_TMPDIR")) + "/mismatch";
  CheckpointOptions options;
  options.config = PresetConfig("tiny").value();
  options.seed = 1008;
  ASSERT_TRUE(WriteRandomCheckpoint(dir, options).ok());
  std::ifstream in(dir + "/config.json");
  std::string json((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string field =
      "\"intermediate_size\": " + std::to_string(options.config.intermediate_size);
  const size_t at = json.find(field);
  ASSERT_NE(at, std::string::npos) << json;
  json.replace(at, field.size(), "\"intermediate_size\": 256");
  std::ofstream(dir + "/config.json") << json;
  absl::StatusOr<std::unique_ptr<LlamaCpu>> model = LlamaCpu::Load(dir);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument) << model.status();
  EXPECT_NE(model.status().message().find("mlp.gate_proj.weight"), absl::string_view::npos)
      << model.status();
}

// Prefill in chunks of random sizes on a paged store with blocks that chunks straddle equals
// one prefill on a contiguous store, at every position.
TEST(LlamaCpuTest, ChunkedPagedPrefillEqualsContiguous) {
  auto model = TinyModel("paged_eq", 1004);
  std::mt19937 rng(4);
  const int64_t vocab = model->config().vocab_size;
  const std::vector<int32_t> tokens = RandomTokens(57, vocab, &rng);
  ContiguousKvStore contiguous(model->kv_shape(), 57);
  std::vector<float> expected;
  ASSERT_TRUE(
      model->Forward({SequenceChunk{tokens, 0, &contiguous, LogitsFor::kAll}}, &expected).ok());

  KvBlockPool pool(model->kv_shape(), 5, 12);
  PagedKvStore paged(&pool);
  absl::Span<const int32_t> all(tokens);
  std::vector<float> chunked;
  for (int64_t pos = 0; pos < 57;) {
    const int64_t n = std::min<int64_t>(1 + rng() % 13, 57 - pos);
    ASSERT_TRUE(
        model->Forward({SequenceChunk{all.subspan(pos, n), pos, &paged, LogitsFor::kAll}}, &chunked)
            .ok());
    pos += n;
  }
  ASSERT_EQ(chunked.size(), expected.size());
  EXPECT_LT(MaxRelativeError(chunked, expected), 1e-5);
}

// Continuous batching: sequences at different lengths decode together, and a new prompt's
// prefill joins a decode batch; every row equals the same sequence run alone.
TEST(LlamaCpuTest, BatchedDecodeEqualsEachAlone) {
  auto model = TinyModel("batched_decode", 1005);
  std::mt19937 rng(5);
  const int64_t vocab = model->config().vocab_size;
  const int64_t steps = 4;
  // Sequence s: a prompt, then `steps` forced decode tokens.
  std::vector<std::vector<int32_t>> prompts = {
      RandomTokens(9, vocab, &rng), RandomTokens(1, vocab, &rng), RandomTokens(26, vocab, &rng)};
  std::vector<std::vector<int32_t>> decoded = {RandomTokens(steps, vocab, &rng),
                                               RandomTokens(steps, vocab, &rng),
                                               RandomTokens(steps, vocab, &rng)};
  const std::vector<int32_t> late_prompt = RandomTokens(11, vocab, &rng);

  // Alone: per sequence, the last prompt row then one row per decode step.
  std::vector<std::vector<float>> alone(3);
  for (int s = 0; s < 3; ++s) {
    ContiguousKvStore kv(model->kv_shape(), 64);
    ASSERT_TRUE(model->Forward({SequenceChunk{prompts[s], 0, &kv}}, &alone[s]).ok());
    for (int64_t t = 0; t < steps; ++t) {
      absl::Span<const int32_t> one(&decoded[s][t], 1);
      const int64_t pos = static_cast<int64_t>(prompts[s].size()) + t;
      ASSERT_TRUE(model->Forward({SequenceChunk{one, pos, &kv}}, &alone[s]).ok());
    }
  }
  std::vector<float> late_alone;
  {
    ContiguousKvStore kv(model->kv_shape(), 64);
    ASSERT_TRUE(model->Forward({SequenceChunk{late_prompt, 0, &kv}}, &late_alone).ok());
  }

  // Together on one paged pool: all prompts in one batch, then batched decode steps; the late
  // prompt's prefill rides along with decode step 2.
  KvBlockPool pool(model->kv_shape(), 4, 64);
  std::vector<std::unique_ptr<PagedKvStore>> kv;
  for (int s = 0; s < 4; ++s) kv.push_back(std::make_unique<PagedKvStore>(&pool));
  std::vector<std::vector<float>> together(3);
  std::vector<float> rows;
  std::vector<SequenceChunk> batch;
  for (int s = 0; s < 3; ++s) batch.push_back(SequenceChunk{prompts[s], 0, kv[s].get()});
  ASSERT_TRUE(model->Forward(batch, &rows).ok());
  for (int64_t t = 0; t < steps; ++t) {
    batch.clear();
    for (int s = 0; s < 3; ++s) {
      absl::Span<const int32_t> one(&decoded[s][t], 1);
      batch.push_back(SequenceChunk{one, static_cast<int64_t>(prompts[s].size()) + t, kv[s].get()});
    }
    if (t == 2) batch.push_back(SequenceChunk{late_prompt, 0, kv[3].get()});
    ASSERT_TRUE(model->Forward(batch, &rows).ok());
  }
  // rows: [prefill s0, s1, s2] then per step [s0, s1, s2] (+ late after step 2's rows).
  ASSERT_EQ(rows.size(), static_cast<size_t>((3 + 3 * steps + 1) * vocab));
  auto row = [&](int64_t r) {
    return std::vector<float>(rows.begin() + r * vocab, rows.begin() + (r + 1) * vocab);
  };
  for (int s = 0; s < 3; ++s) {
    std::vector<float> mine = row(s);
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t r = 3 + 3 * t + (t > 2 ? 1 : 0) + s;
      std::vector<float> step_row = row(r);
      mine.insert(mine.end(), step_row.begin(), step_row.end());
    }
    EXPECT_LT(MaxRelativeError(mine, alone[s]), 1e-5) << "sequence " << s;
  }
  EXPECT_LT(MaxRelativeError(row(3 + 3 * 3), late_alone), 1e-5);
}

// LogitsFor::kNone still fills the KV store: a prefill without logits followed by a step equals
// the step after a prefill with logits.
TEST(LlamaCpuTest, PrefillWithoutLogitsStillFillsTheCache) {
  auto model = TinyModel("no_logits", 1006);
  std::mt19937 rng(6);
  const std::vector<int32_t> tokens = RandomTokens(20, model->config().vocab_size, &rng);
  absl::Span<const int32_t> all(tokens);
  std::vector<float> with_logits, without_logits;
  ContiguousKvStore a(model->kv_shape(), 32), b(model->kv_shape(), 32);
  ASSERT_TRUE(
      model->Forward({SequenceChunk{all.subspan(0, 19), 0, &a, LogitsFor::kLast}}, &with_logits)
          .ok());
  ASSERT_TRUE(
      model->Forward({SequenceChunk{all.subspan(0, 19), 0, &b, LogitsFor::kNone}}, &without_logits)
          .ok());
  EXPECT_TRUE(without_logits.empty());
  with_logits.clear();
  ASSERT_TRUE(model->Forward({SequenceChunk{all.subspan(19, 1), 19, &a}}, &with_logits).ok());
  ASSERT_TRUE(model->Forward({SequenceChunk{all.subspan(19, 1), 19, &b}}, &without_logits).ok());
  EXPECT_LT(MaxRelativeError(without_logits, with_logits), 1e-6);
}

// Forward is thread-safe: requests from several threads at once get what each gets alone.
TEST(LlamaCpuTest, ConcurrentForwardCallsAgreeWithSerial) {
  auto model = TinyModel("concurrent", 1007);
  std::mt19937 rng(7);
  const int64_t vocab = model->config().vocab_size;
  const int kThreads = 4;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::vector<float>> serial(kThreads), parallel(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    prompts.push_back(RandomTokens(10 + 7 * t, vocab, &rng));
    ContiguousKvStore kv(model->kv_shape(), 64);
    ASSERT_TRUE(model->Forward({SequenceChunk{prompts[t], 0, &kv}}, &serial[t]).ok());
  }
  std::vector<absl::Status> statuses(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ContiguousKvStore kv(model->kv_shape(), 64);
      for (int repeat = 0; repeat < 5 && statuses[t].ok(); ++repeat) {
        parallel[t].clear();
        statuses[t] = model->Forward({SequenceChunk{prompts[t], 0, &kv}}, &parallel[t]);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_TRUE(statuses[t].ok()) << statuses[t];
    EXPECT_LT(MaxRelativeError(parallel[t], serial[t]), 1e-6) << "thread " << t;
  }
}

}  // namespace
}  // namespace sparseaccel
