// DecodeEngine over LlamaCuda's device pool (needs a GPU): prompts whose K/V are imported as
// fp32 or bf16 rows decode to exactly LlamaCuda's own greedy tokens (StartSequence +
// DecodeStep). Exact, not within a bound: the imported rows are the engine's own bf16 K/V
// (its fp32 rows are exact bf16 values), and one sequence at a time runs the same kernels on
// the same shapes as the reference.

#include <chrono>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "decode_service/decode_engine.h"
#include "gtest/gtest.h"
#include "kernels/sampling.h"
#include "model/checkpoint/checkpoint_maker.h"
#include "model/cuda/llama_cuda.h"
#include "model/checkpoint/safetensors.h"

namespace sparseaccel {
namespace {

constexpr int64_t kBlockTokens = 16;
constexpr int64_t kPoolBlocks = 64;

std::unique_ptr<LlamaCuda> LoadModel() {
  const char* tmp = getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/decode_engine_cuda";
  CheckpointOptions checkpoint;
  checkpoint.config = PresetConfig("small").value();
  checkpoint.config.num_attention_heads = 4;  // head_dim 64, GQA 2:1.
  checkpoint.config.head_dim = checkpoint.config.hidden_size / 4;
  checkpoint.seed = std::random_device{}();
  checkpoint.init_std = 0.08;
  checkpoint.dtype = DType::kBF16;
  EXPECT_TRUE(WriteRandomCheckpoint(dir, checkpoint).ok());
  LlamaCudaOptions options;
  options.kv_pool_tokens = kPoolBlocks * kBlockTokens;
  options.kv_block_tokens = kBlockTokens;
  options.max_decode_batch = 8;
  absl::StatusOr<std::unique_ptr<LlamaCuda>> model = LlamaCuda::Load(dir, options);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::move(model).value() : nullptr;
}

// Greedy tokens of the device sequence API alone.
std::vector<int32_t> Reference(LlamaCuda& model, const std::vector<int32_t>& prompt, int count) {
  const int64_t vocab = model.config().vocab_size;
  std::vector<float> logits;
  absl::StatusOr<int64_t> id = model.StartSequence(prompt, &logits);
  EXPECT_TRUE(id.ok()) << id.status();
  std::vector<int32_t> out = {SampleTokenCpu(logits.data(), vocab, {}, 0)};
  while (static_cast<int>(out.size()) < count) {
    EXPECT_TRUE(model.DecodeStep({*id}, {out.back()}, &logits).ok());
    out.push_back(SampleTokenCpu(logits.data(), vocab, {}, out.size()));
  }
  EXPECT_TRUE(model.EndSequence(*id).ok());
  return out;
}

// What the decode service does: the prompt's K/V computed by a prefill (here the same engine's
// Forward), imported row by row as `dtype`, then decoded in the engine's batch.
std::vector<int32_t> ThroughEngine(LlamaCuda& model, DecodeEngine& engine,
                                   const std::vector<int32_t>& prompt, int count, KvDtype dtype) {
  const KvShape shape = model.kv_shape();
  const int64_t n = static_cast<int64_t>(prompt.size());
  ContiguousKvStore kv(shape, n);
  std::vector<float> logits;
  EXPECT_TRUE(model.Forward({SequenceChunk{prompt, 0, &kv, LogitsFor::kLast}}, &logits).ok());
  const int32_t first = SampleTokenCpu(logits.data(), model.config().vocab_size, {}, 0);
  auto sequence = engine.Admit(n, count, absl::InfiniteFuture(), [] { return false; });
  EXPECT_TRUE(sequence.ok()) << sequence.status();
  if (!sequence.ok()) return {};
  for (int64_t l = 0; l < shape.num_layers; ++l) {
    const KvLayerView view = kv.Layer(l, n).value();
    const int64_t values = n * shape.RowSize();
    std::vector<uint16_t> k(values), v(values);
    for (int64_t i = 0; i < values; ++i) {
      k[i] = FloatToBf16(view.KRow(0)[i]);
      v[i] = FloatToBf16(view.VRow(0)[i]);
    }
    const bool f32 = dtype == KvDtype::kF32;
    EXPECT_TRUE(engine
                    .WriteKv(sequence->get(), l, 0, n, dtype,
                             f32 ? static_cast<const void*>(view.KRow(0)) : k.data(),
                             f32 ? static_cast<const void*>(view.VRow(0)) : v.data())
                    .ok());
  }
  EXPECT_TRUE(engine.FinishImport(sequence->get()).ok());
  std::vector<int32_t> out = {first};
  engine.Start(*sequence, first, SamplingParams{}, count - 1);
  while (true) {
    DecodeSequence::Event event = (*sequence)->WaitNext(absl::Seconds(30));
    if (event.kind != DecodeSequence::Event::Kind::kToken) {
      EXPECT_EQ(event.kind, DecodeSequence::Event::Kind::kFinished);
      EXPECT_TRUE(event.status.ok()) << event.status;
      break;
    }
    out.push_back(event.token);
  }
  return out;
}

// True once every reservation is back (the scheduler drops a finished sequence's last
// reference just after its last token); waits up to 5 s.
bool Drained(const DecodeEngine& engine) {
  for (int i = 0; i < 500 && engine.free_blocks() != kPoolBlocks; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return engine.free_blocks() == kPoolBlocks;
}

TEST(DecodeEngineCudaTest, DeviceDecodeEqualsDeviceSequences) {
  std::unique_ptr<LlamaCuda> model = LoadModel();
  ASSERT_NE(model, nullptr);
  DecodeEngine engine(model.get(), DecodeEngineOptions{});
  ASSERT_EQ(engine.num_blocks(), kPoolBlocks);
  std::mt19937 rng(std::random_device{}());
  for (int64_t length : {1, 7, 40, 130}) {
    std::vector<int32_t> prompt(length);
    for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % model->config().vocab_size);
    const std::vector<int32_t> expected = Reference(*model, prompt, 20);
    for (KvDtype dtype : {KvDtype::kF32, KvDtype::kBf16}) {
      EXPECT_EQ(ThroughEngine(*model, engine, prompt, 20, dtype), expected)
          << "prompt of " << length << (dtype == KvDtype::kF32 ? ", fp32" : ", bf16") << " rows";
    }
  }
  EXPECT_TRUE(Drained(engine));
}

// Several sequences at once share device batches (round robin, 4 per step); each gets all its
// tokens and the device pool is whole again afterwards. Admission counts the device pool.
TEST(DecodeEngineCudaTest, ConcurrentSequencesShareTheDevicePool) {
  std::unique_ptr<LlamaCuda> model = LoadModel();
  ASSERT_NE(model, nullptr);
  DecodeEngineOptions options;
  options.max_batch = 4;
  DecodeEngine engine(model.get(), options);
  EXPECT_EQ(
      engine.Admit(kPoolBlocks * kBlockTokens, 1, absl::InfiniteFuture(), [] { return false; })
          .status()
          .code(),
      absl::StatusCode::kResourceExhausted);
  std::mt19937 rng(std::random_device{}());
  std::vector<std::vector<int32_t>> prompts(6);
  for (auto& prompt : prompts) {
    prompt.resize(5 + rng() % 80);
    for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % model->config().vocab_size);
  }
  std::vector<std::vector<int32_t>> outputs(prompts.size());
  std::vector<std::thread> clients;
  for (size_t i = 0; i < prompts.size(); ++i) {
    clients.emplace_back([&, i] {
      outputs[i] =
          ThroughEngine(*model, engine, prompts[i], 24, i % 2 ? KvDtype::kBf16 : KvDtype::kF32);
    });
  }
  for (std::thread& client : clients) client.join();
  for (const auto& output : outputs) EXPECT_EQ(output.size(), 24u);
  EXPECT_TRUE(Drained(engine));
  // Every device block is back: a sequence filling the whole pool is admitted.
  auto whole =
      engine.Admit(kPoolBlocks * kBlockTokens - 1, 1, absl::InfiniteFuture(), [] { return false; });
  EXPECT_TRUE(whole.ok()) << whole.status();
}

}  // namespace
}  // namespace sparseaccel
