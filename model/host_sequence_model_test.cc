#include "model/host_sequence_model.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/sampling.h"
#include "model/checkpoint/checkpoint_maker.h"
#include "model/llama_cpu.h"
#include "model/checkpoint/safetensors.h"

namespace sparseaccel {
namespace {

std::unique_ptr<LlamaCpu> TinyModel() {
  const char* tmp = getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/host_sequence_model";
  CheckpointOptions options;
  options.config = PresetConfig("tiny").value();
  options.seed = std::random_device{}();
  options.init_std = 0.08;
  EXPECT_TRUE(WriteRandomCheckpoint(dir, options).ok());
  return LlamaCpu::Load(dir).value();
}

// Greedy tokens by the engine alone over a contiguous cache: `prompt` prefilled (its K/V
// optionally rounded to bf16 then), `first` fed after it. The prompt's K/V (fp32) go to *k, *v
// ([layer][pos][row]).
std::vector<int32_t> Reference(LlamaCpu& model, const std::vector<int32_t>& prompt, int32_t first,
                               int steps, bool bf16, std::vector<float>* k,
                               std::vector<float>* v) {
  const KvShape shape = model.kv_shape();
  const int64_t n = static_cast<int64_t>(prompt.size());
  ContiguousKvStore kv(shape, n + steps);
  std::vector<float> logits;
  EXPECT_TRUE(model.Forward({SequenceChunk{prompt, 0, &kv, LogitsFor::kLast}}, &logits).ok());
  k->clear();
  v->clear();
  for (int64_t l = 0; l < shape.num_layers; ++l) {
    KvLayerView view = kv.Layer(l, n).value();
    for (int64_t p = 0; p < n; ++p) {
      for (int64_t i = 0; i < shape.RowSize(); ++i) {
        k->push_back(view.KRow(p)[i]);
        v->push_back(view.VRow(p)[i]);
        if (bf16) {
          view.KRow(p)[i] = Bf16ToFloat(FloatToBf16(view.KRow(p)[i]));
          view.VRow(p)[i] = Bf16ToFloat(FloatToBf16(view.VRow(p)[i]));
        }
      }
    }
  }
  std::vector<int32_t> out = {first};
  for (int s = 0; s < steps; ++s) {
    logits.clear();
    EXPECT_TRUE(model.Forward({SequenceChunk{{&out.back(), 1}, n + s, &kv, LogitsFor::kLast}},
                              &logits)
                    .ok());
    out.push_back(SampleTokenCpu(logits.data(), model.config().vocab_size, {}, s));
  }
  return {out.begin() + 1, out.end()};
}

// fp32 rows written as they are and bf16 rows widened give the engine's own decode, two
// sequences stepped in one batch.
TEST(HostSequenceModelTest, ImportedSequencesDecodeLikeTheEngine) {
  std::unique_ptr<LlamaCpu> llama = TinyModel();
  const KvShape shape = llama->kv_shape();
  const int64_t row = shape.RowSize();
  HostSequenceModel model(llama.get(), /*block_tokens=*/4, /*num_blocks=*/64);
  std::mt19937 rng(std::random_device{}());
  constexpr int kSteps = 6;
  std::vector<int64_t> ids;
  std::vector<std::vector<int32_t>> expected;
  std::vector<int32_t> tokens;
  for (KvDtype dtype : {KvDtype::kF32, KvDtype::kBf16}) {
    std::vector<int32_t> prompt(11);
    for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % 500);
    tokens.push_back(static_cast<int32_t>(rng() % 500));
    std::vector<float> k, v;
    expected.push_back(
        Reference(*llama, prompt, tokens.back(), kSteps, dtype == KvDtype::kBf16, &k, &v));
    const int64_t n = static_cast<int64_t>(prompt.size());
    absl::StatusOr<int64_t> id = model.ImportSequence(n);
    ASSERT_TRUE(id.ok()) << id.status();
    ids.push_back(*id);
    for (int64_t l = 0; l < shape.num_layers; ++l) {
      for (int64_t first = 0; first < n; first += 3) {  // Chunks across block boundaries.
        const int64_t count = std::min<int64_t>(3, n - first);
        const float* kf = &k[(l * n + first) * row];
        const float* vf = &v[(l * n + first) * row];
        std::vector<uint16_t> kb(count * row), vb(count * row);
        for (int64_t i = 0; i < count * row; ++i) {
          kb[i] = FloatToBf16(kf[i]);
          vb[i] = FloatToBf16(vf[i]);
        }
        const bool f32 = dtype == KvDtype::kF32;
        ASSERT_TRUE(model
                        .WriteKv(*id, l, first, count, dtype, f32 ? static_cast<const void*>(kf)
                                                                  : kb.data(),
                                 f32 ? static_cast<const void*>(vf) : vb.data())
                        .ok());
      }
    }
  }
  std::vector<std::vector<int32_t>> got(2);
  for (uint64_t s = 0; s < kSteps; ++s) {
    std::vector<int32_t> next;
    ASSERT_TRUE(model.DecodeAndSample(ids, tokens, {SamplingParams{}, SamplingParams{}}, {s, s},
                                      &next)
                    .ok());
    for (int i = 0; i < 2; ++i) got[i].push_back(tokens[i] = next[i]);
  }
  EXPECT_EQ(got[0], expected[0]);
  EXPECT_EQ(got[1], expected[1]);
  for (int64_t id : ids) EXPECT_TRUE(model.EndSequence(id).ok());
  EXPECT_EQ(model.free_blocks(), 64);
}

TEST(HostSequenceModelTest, BadCallsAreErrors) {
  std::unique_ptr<LlamaCpu> llama = TinyModel();
  HostSequenceModel model(llama.get(), /*block_tokens=*/4, /*num_blocks=*/2);
  EXPECT_EQ(model.ImportSequence(9).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(model.free_blocks(), 2);
  absl::StatusOr<int64_t> id = model.ImportSequence(5);
  ASSERT_TRUE(id.ok());
  std::vector<float> rows(2 * llama->kv_shape().RowSize());
  EXPECT_EQ(model.WriteKv(*id, 0, 4, 2, KvDtype::kF32, rows.data(), rows.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model.WriteKv(*id, llama->kv_shape().num_layers, 0, 1, KvDtype::kF32, rows.data(),
                          rows.data())
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model.WriteKv(*id + 1, 0, 0, 1, KvDtype::kF32, rows.data(), rows.data()).code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(model.EndSequence(*id).ok());
  EXPECT_EQ(model.EndSequence(*id).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(model.free_blocks(), 2);
}

}  // namespace
}  // namespace sparseaccel
