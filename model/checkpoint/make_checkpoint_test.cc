// The random checkpoint maker, as a library (WriteRandomCheckpoint) and as the make_checkpoint
// binary: Hugging Face's layout and names, shapes, determinism, sharding and flag handling.

#include <sys/stat.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/checkpoint/checkpoint_maker.h"
#include "model/checkpoint/config.h"
#include "model/checkpoint/safetensors.h"
#include "model/test_util.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace {

std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

// Hugging Face's shard file name: model-00002-of-00005.safetensors.
std::string ShardName(int shard, int shards) {
  char name[64];
  std::snprintf(name, sizeof(name), "model-%05d-of-%05d.safetensors", shard, shards);
  return name;
}

// The shard file names that the index of `dir` refers to, each checked to exist.
std::set<std::string> IndexedShards(const std::string& dir) {
  nlohmann::json index = nlohmann::json::parse(ReadText(dir + "/model.safetensors.index.json"));
  std::set<std::string> shards;
  for (const auto& [name, file] : index["weight_map"].items()) {
    shards.insert(file.get<std::string>());
    EXPECT_TRUE(Exists(dir + "/" + file.get<std::string>())) << file;
  }
  return shards;
}

CheckpointOptions TinyOptions(uint64_t seed) {
  CheckpointOptions options;
  options.config = PresetConfig("tiny").value();
  options.config.bos_token_id = 510;
  options.config.eos_token_ids = {511};
  options.seed = seed;
  options.dtype = DType::kBF16;
  return options;
}

std::vector<float> ToF32(const TensorView& view) {
  std::vector<float> values(view.NumElements());
  EXPECT_TRUE(ConvertToF32(view, absl::MakeSpan(values)).ok());
  return values;
}

double Rms(const std::vector<float>& values) {
  double sum_sq = 0;
  for (float v : values) sum_sq += static_cast<double>(v) * v;
  return std::sqrt(sum_sq / values.size());
}

// Every tensor of a Llama checkpoint by Hugging Face's name, with its [out, in] shape.
std::map<std::string, std::vector<int64_t>> ExpectedShapes(const ModelConfig& c) {
  const int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  const int64_t h = c.hidden_size, ff = c.intermediate_size;
  std::map<std::string, std::vector<int64_t>> shapes = {
      {"model.embed_tokens.weight", {c.vocab_size, h}}, {"model.norm.weight", {h}}};
  if (!c.tie_word_embeddings) shapes["lm_head.weight"] = {c.vocab_size, h};
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    shapes[p + "input_layernorm.weight"] = {h};
    shapes[p + "post_attention_layernorm.weight"] = {h};
    shapes[p + "self_attn.q_proj.weight"] = {q, h};
    shapes[p + "self_attn.k_proj.weight"] = {kv, h};
    shapes[p + "self_attn.v_proj.weight"] = {kv, h};
    shapes[p + "self_attn.o_proj.weight"] = {h, q};
    shapes[p + "mlp.gate_proj.weight"] = {ff, h};
    shapes[p + "mlp.up_proj.weight"] = {ff, h};
    shapes[p + "mlp.down_proj.weight"] = {h, ff};
  }
  return shapes;
}

// Checks names, shapes and dtypes of the store against the config, and the weights' statistics:
// projections with RMS `init_std`, norms near (not exactly) one.
void ExpectLlamaCheckpoint(const std::string& dir, DType dtype, double init_std) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  absl::StatusOr<std::unique_ptr<TensorStore>> store = TensorStore::OpenDirectory(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  const auto expected = ExpectedShapes(*config);
  ASSERT_EQ((*store)->tensors().size(), expected.size());
  for (const auto& [name, shape] : expected) {
    absl::StatusOr<const TensorView*> view = (*store)->FindWithShape(name, shape);
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ((*view)->dtype, dtype) << name;
    std::vector<float> values = ToF32(**view);
    if (name.find("norm.weight") != std::string::npos) {
      float lo = values[0], hi = values[0];
      for (float v : values) lo = std::min(lo, v), hi = std::max(hi, v);
      EXPECT_GE(lo, 0.89f) << name;
      EXPECT_LE(hi, 1.11f) << name;
      EXPECT_GT(hi - lo, 0.05f) << name << " is (nearly) constant";
    } else {
      EXPECT_NEAR(Rms(values), init_std, 0.1 * init_std) << name;
    }
  }
}

TEST(CheckpointMakerTest, DeterministicAndLoadable) {
  const std::string a = TestTempDir("ckpt_a"), b = TestTempDir("ckpt_b"), c = TestTempDir("ckpt_c");
  ASSERT_TRUE(WriteRandomCheckpoint(a, TinyOptions(7)).ok());
  ASSERT_TRUE(WriteRandomCheckpoint(b, TinyOptions(7)).ok());
  ASSERT_TRUE(WriteRandomCheckpoint(c, TinyOptions(8)).ok());
  EXPECT_EQ(ReadText(a + "/model.safetensors"), ReadText(b + "/model.safetensors"));
  EXPECT_NE(ReadText(a + "/model.safetensors"), ReadText(c + "/model.safetensors"));
  ExpectLlamaCheckpoint(a, DType::kBF16, 0.02);
  nlohmann::json generation = nlohmann::json::parse(ReadText(a + "/generation_config.json"));
  EXPECT_EQ(generation["bos_token_id"], 510);
  EXPECT_EQ(generation["eos_token_id"], nlohmann::json::array({511}));
}

TEST(CheckpointMakerTest, ShardedCheckpointReadsBackIdentically) {
  const std::string single = TestTempDir("ckpt_single"), sharded = TestTempDir("ckpt_sharded");
  CheckpointOptions options = TinyOptions(3);
  ASSERT_TRUE(WriteRandomCheckpoint(single, options).ok());
  options.shard_max_bytes = 40000;
  ASSERT_TRUE(WriteRandomCheckpoint(sharded, options).ok());
  EXPECT_FALSE(Exists(sharded + "/model.safetensors"));
  nlohmann::json index = nlohmann::json::parse(ReadText(sharded + "/model.safetensors.index.json"));
  auto one = TensorStore::OpenDirectory(single).value();
  auto many = TensorStore::OpenDirectory(sharded).value();
  ASSERT_EQ(one->tensors().size(), many->tensors().size());
  ASSERT_EQ(index["weight_map"].size(), one->tensors().size());
  uint64_t total = 0;
  std::map<std::string, int> tensors_per_shard;
  for (const auto& [name, view] : one->tensors()) {
    const TensorView* other = many->Find(name).value();
    ASSERT_EQ(view.num_bytes, other->num_bytes);
    EXPECT_EQ(std::memcmp(view.data, other->data, view.num_bytes), 0) << name;
    total += view.num_bytes;
    ++tensors_per_shard[index["weight_map"][name].get<std::string>()];
  }
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total);
  const int shards = static_cast<int>(tensors_per_shard.size());
  EXPECT_GE(shards, 3);
  for (int s = 1; s <= shards; ++s) {
    EXPECT_GT(tensors_per_shard[ShardName(s, shards)], 0) << ShardName(s, shards);
  }
  EXPECT_EQ(IndexedShards(sharded).size(), static_cast<size_t>(shards));
}

TEST(CheckpointMakerTest, RewritingADirectoryReplacesItsWeights) {
  const std::string dir = TestTempDir("ckpt_rewrite"), reference = TestTempDir("ckpt_rewrite_ref");
  CheckpointOptions sharded = TinyOptions(21);
  sharded.shard_max_bytes = 40000;
  ASSERT_TRUE(WriteRandomCheckpoint(dir, sharded).ok());
  const std::set<std::string> old_shards = IndexedShards(dir);
  ASSERT_GE(old_shards.size(), 2u);
  std::ofstream(dir + "/notes.txt") << "kept";
  // One file over the shards: the stale index and shards must not shadow it.
  ASSERT_TRUE(WriteRandomCheckpoint(dir, TinyOptions(22)).ok());
  ASSERT_TRUE(WriteRandomCheckpoint(reference, TinyOptions(22)).ok());
  EXPECT_FALSE(Exists(dir + "/model.safetensors.index.json"));
  for (const std::string& shard : old_shards) EXPECT_FALSE(Exists(dir + "/" + shard)) << shard;
  EXPECT_EQ(ReadText(dir + "/notes.txt"), "kept");
  auto store = TensorStore::OpenDirectory(dir).value();
  auto expected = TensorStore::OpenDirectory(reference).value();
  const TensorView* got = store->Find("model.embed_tokens.weight").value();
  const TensorView* want = expected->Find("model.embed_tokens.weight").value();
  ASSERT_EQ(got->num_bytes, want->num_bytes);
  EXPECT_EQ(std::memcmp(got->data, want->data, got->num_bytes), 0);
  // Shards over one file: the old model.safetensors goes.
  ASSERT_TRUE(WriteRandomCheckpoint(dir, sharded).ok());
  EXPECT_FALSE(Exists(dir + "/model.safetensors"));
  EXPECT_TRUE(TensorStore::OpenDirectory(dir).ok());
}

TEST(CheckpointMakerTest, PresetsHaveTheRealShapes) {
  ModelConfig llama = PresetConfig("llama-3.1-8b").value();
  EXPECT_EQ(llama.num_hidden_layers, 32);
  EXPECT_EQ(llama.hidden_size, 4096);
  EXPECT_EQ(llama.num_attention_heads, 32);
  EXPECT_EQ(llama.num_key_value_heads, 8);
  EXPECT_EQ(llama.head_dim, 128);
  EXPECT_EQ(llama.intermediate_size, 14336);
  EXPECT_EQ(llama.vocab_size, 128256);
  EXPECT_EQ(llama.max_position_embeddings, 131072);
  EXPECT_DOUBLE_EQ(llama.rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(llama.rms_norm_eps, 1e-5);
  EXPECT_EQ(llama.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(llama.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(llama.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(llama.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(llama.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_FALSE(llama.tie_word_embeddings);
  ModelConfig tiny = PresetConfig("tiny").value();
  EXPECT_EQ(tiny.num_hidden_layers, 2);
  EXPECT_EQ(tiny.hidden_size, 64);
  EXPECT_EQ(tiny.num_attention_heads, 4);
  EXPECT_EQ(tiny.num_key_value_heads, 2);
  EXPECT_EQ(tiny.intermediate_size, 192);
  EXPECT_EQ(tiny.rope_scaling.type, RopeScaling::Type::kLlama3);
  ModelConfig small = PresetConfig("small").value();
  EXPECT_EQ(small.num_hidden_layers, 4);
  EXPECT_EQ(small.hidden_size, 256);
  EXPECT_EQ(small.num_attention_heads, 8);
  EXPECT_EQ(small.num_key_value_heads, 2);
  EXPECT_EQ(small.intermediate_size, 512);
  EXPECT_EQ(PresetConfig("llama-4").status().code(), absl::StatusCode::kNotFound);
}

TEST(CheckpointMakerTest, RejectsInvalidOptions) {
  CheckpointOptions options = TinyOptions(1);
  options.config.num_key_value_heads = 3;
  EXPECT_FALSE(WriteRandomCheckpoint(TestTempDir("bad_kv"), options).ok());
  options = TinyOptions(1);
  options.init_std = 0;
  EXPECT_FALSE(WriteRandomCheckpoint(TestTempDir("bad_std"), options).ok());
}

// Runs the make_checkpoint binary with `args` (after `env`, variable assignments); returns its
// exit status.
int RunMaker(const std::string& args, const std::string& env = "") {
  const std::string log = TestTempDir("logs") + "/make_checkpoint.log";
  const std::string command = env + " model/tools/make_checkpoint " + args + " >" + log + " 2>&1";
  const int status = std::system(command.c_str());
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (code != 0) std::cerr << command << " exited " << code << ":\n" << ReadText(log);
  return code;
}

TEST(MakeCheckpointBinaryTest, SameFlagsSameBytesOtherSeedOtherBytes) {
  const std::string a = TestTempDir("bin_a"), b = TestTempDir("bin_b"), c = TestTempDir("bin_c");
  const std::string flags = " --preset=tiny --dtype=bfloat16 --seed=";
  ASSERT_EQ(RunMaker("--out=" + a + flags + "11"), 0);
  // Elements are a function of (seed, tensor, index) alone: the thread count changes nothing.
  ASSERT_EQ(RunMaker("--out=" + b + flags + "11", "OMP_NUM_THREADS=1"), 0);
  ASSERT_EQ(RunMaker("--out=" + c + flags + "12"), 0);
  for (const char* file : {"config.json", "generation_config.json", "model.safetensors"}) {
    EXPECT_EQ(ReadText(a + "/" + file), ReadText(b + "/" + file)) << file;
  }
  EXPECT_NE(ReadText(a + "/model.safetensors"), ReadText(c + "/model.safetensors"));
  EXPECT_EQ(ReadText(a + "/config.json"), ReadText(c + "/config.json"));
  ExpectLlamaCheckpoint(a, DType::kBF16, 0.02);

  ModelConfig config = LoadModelConfig(a).value();
  EXPECT_EQ(config.vocab_size, 512);
  EXPECT_EQ(config.num_hidden_layers, 2);
  EXPECT_EQ(config.torch_dtype, "bfloat16");
  EXPECT_EQ(config.rope_scaling.type, RopeScaling::Type::kLlama3);
  nlohmann::json json = nlohmann::json::parse(ReadText(a + "/config.json"));
  EXPECT_EQ(json["architectures"], nlohmann::json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(json["model_type"], "llama");
  EXPECT_EQ(json["hidden_act"], "silu");
  EXPECT_EQ(json["rope_scaling"]["rope_type"], "llama3");
  EXPECT_EQ(json["dtype"], "bfloat16");
  EXPECT_EQ(json["attention_bias"], false);
  EXPECT_EQ(json["mlp_bias"], false);
}

TEST(MakeCheckpointBinaryTest, OverridesEveryShapeField) {
  const std::string dir = TestTempDir("bin_overrides");
  ASSERT_EQ(RunMaker("--out=" + dir +
                     " --preset=small --layers=3 --hidden=96 --heads=6 --kv_heads=3"
                     " --intermediate=160 --vocab=300 --max_position=4096 --rope_theta=10000"
                     " --norope_scaling --tie_embeddings --dtype=float16 --init_std=0.05"
                     " --rms_norm_eps=1e-6"),
            0);
  ModelConfig c = LoadModelConfig(dir).value();
  EXPECT_EQ(c.num_hidden_layers, 3);
  EXPECT_EQ(c.hidden_size, 96);
  EXPECT_EQ(c.num_attention_heads, 6);
  EXPECT_EQ(c.num_key_value_heads, 3);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.intermediate_size, 160);
  EXPECT_EQ(c.vocab_size, 300);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.torch_dtype, "float16");
  ExpectLlamaCheckpoint(dir, DType::kF16, 0.05);
  auto store = TensorStore::OpenDirectory(dir).value();
  EXPECT_EQ(store->Find("lm_head.weight").status().code(), absl::StatusCode::kNotFound);
}

TEST(MakeCheckpointBinaryTest, OverridesRopeScaling) {
  const std::string dir = TestTempDir("bin_rope");
  ASSERT_EQ(RunMaker("--out=" + dir +
                     " --preset=tiny --layers=1 --rope_factor=32 --rope_low_freq_factor=2"
                     " --rope_high_freq_factor=6 --rope_original_max_position=512"),
            0);
  ModelConfig c = LoadModelConfig(dir).value();
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 32.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 2.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 6.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 512);
}

TEST(MakeCheckpointBinaryTest, ShardsWithIndex) {
  const std::string single = TestTempDir("bin_single"), sharded = TestTempDir("bin_sharded");
  ASSERT_EQ(RunMaker("--out=" + single + " --preset=tiny --seed=4"), 0);
  ASSERT_EQ(RunMaker("--out=" + sharded + " --preset=tiny --seed=4 --shard_max_bytes=100000"), 0);
  ASSERT_TRUE(Exists(sharded + "/model.safetensors.index.json"));
  const std::set<std::string> shards = IndexedShards(sharded);
  EXPECT_GE(shards.size(), 2u);
  EXPECT_TRUE(shards.count(ShardName(1, shards.size()))) << ShardName(1, shards.size());
  ExpectLlamaCheckpoint(sharded, DType::kF32, 0.02);
  auto one = TensorStore::OpenDirectory(single).value();
  auto many = TensorStore::OpenDirectory(sharded).value();
  for (const auto& [name, view] : one->tensors()) {
    const TensorView* other = many->Find(name).value();
    ASSERT_EQ(view.num_bytes, other->num_bytes);
    EXPECT_EQ(std::memcmp(view.data, other->data, view.num_bytes), 0) << name;
  }
}

TEST(MakeCheckpointBinaryTest, CopiesTokenizerAndUsesItsVocabulary) {
  const std::string tokenizer = TestTempDir("tokenizer"), dir = TestTempDir("bin_tokenizer");
  const std::string tokenizer_json = R"({"version": "1.0", "model": {"type": "BPE"}})";
  const std::string tokenizer_config = R"({"bos_token": "<|begin_of_text|>"})";
  std::ofstream(tokenizer + "/tokenizer.json") << tokenizer_json;
  std::ofstream(tokenizer + "/tokenizer_config.json") << tokenizer_config;
  ASSERT_EQ(RunMaker("--out=" + dir + " --preset=tiny --layers=1 --dtype=bfloat16 " +
                     "--tokenizer_json=" + tokenizer + "/tokenizer.json"),
            0);
  EXPECT_EQ(ReadText(dir + "/tokenizer.json"), tokenizer_json);
  EXPECT_EQ(ReadText(dir + "/tokenizer_config.json"), tokenizer_config);
  ModelConfig c = LoadModelConfig(dir).value();
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  ExpectLlamaCheckpoint(dir, DType::kBF16, 0.02);
}

TEST(MakeCheckpointBinaryTest, RejectsBadFlags) {
  const std::string dir = TestTempDir("bin_bad");
  EXPECT_NE(RunMaker("--preset=tiny"), 0);  // No --out.
  for (const std::string flags :
       {"--preset=huge", "--dtype=int8", "--heads=5", "--layers=-1", "--kv_heads=3", "--init_std=0",
        "--vocab=-4", "--rms_norm_eps=-1", "--rope_low_freq_factor=5",
        "--tokenizer_json=/nonexistent/tokenizer.json"}) {
    EXPECT_NE(RunMaker("--out=" + dir + " --preset=tiny " + flags), 0) << flags;
  }
}

}  // namespace
}  // namespace sparseaccel
