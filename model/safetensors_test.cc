#include "model/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/checkpoint_maker.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace {

std::string TempDir(const std::string& name) {
  const char* base = getenv("TEST_TMPDIR");
  std::string dir = std::string(base ? base : "/tmp") + "/" + name;
  mkdir(dir.c_str(), 0755);
  return dir;
}

std::vector<uint8_t> ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
}

TensorToWrite F32Tensor(const std::string& name, std::vector<int64_t> shape, std::mt19937* rng) {
  TensorToWrite t{name, DType::kF32, shape, {}};
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  for (int64_t i = 0; i < n; ++i) {
    float v = dist(*rng);
    const uint8_t* p = reinterpret_cast<const uint8_t*>(&v);
    t.data.insert(t.data.end(), p, p + 4);
  }
  return t;
}

// A file from a header JSON and a data area, for hand-made malformed inputs.
std::vector<uint8_t> MakeFile(const std::string& header, size_t data_bytes) {
  std::vector<uint8_t> bytes(8);
  uint64_t len = header.size();
  std::memcpy(bytes.data(), &len, 8);
  bytes.insert(bytes.end(), header.begin(), header.end());
  bytes.resize(bytes.size() + data_bytes, 0x5a);
  return bytes;
}

absl::Status ParseStatus(const std::vector<uint8_t>& bytes) {
  return SafetensorsFile::Parse(bytes, "test").status();
}

TEST(SafetensorsTest, WriteThenReadRoundTrip) {
  std::mt19937 rng(std::random_device{}());
  std::vector<TensorToWrite> tensors = {F32Tensor("b", {3, 5}, &rng), F32Tensor("a", {7}, &rng),
                                        F32Tensor("scalar", {}, &rng),
                                        F32Tensor("empty", {0, 4}, &rng)};
  TensorToWrite half{"h", DType::kBF16, {2}, {0x80, 0x3f, 0x00, 0xc0}};  // 1.0, -2.0
  tensors.push_back(half);
  const std::string path = TempDir("roundtrip") + "/t.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());
  std::vector<uint8_t> bytes = ReadBytes(path);
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ(header_len % 8, 0u);

  absl::StatusOr<std::unique_ptr<TensorStore>> store = TensorStore::OpenFile(path);
  ASSERT_TRUE(store.ok()) << store.status();
  for (const TensorToWrite& t : tensors) {
    absl::StatusOr<const TensorView*> view = (*store)->FindWithShape(t.name, t.shape);
    ASSERT_TRUE(view.ok()) << view.status();
    ASSERT_EQ((*view)->num_bytes, t.data.size());
    EXPECT_EQ(std::memcmp((*view)->data, t.data.data(), t.data.size()), 0) << t.name;
  }
  std::vector<float> h(2);
  ASSERT_TRUE(ConvertToF32(*(*store)->Find("h").value(), absl::MakeSpan(h)).ok());
  EXPECT_EQ(h, (std::vector<float>{1.0f, -2.0f}));
  EXPECT_EQ((*store)->Find("scalar").value()->NumElements(), 1);
  EXPECT_EQ((*store)->Find("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*store)->FindWithShape("a", {8}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SafetensorsTest, RejectsMalformedHeaders) {
  const struct {
    std::string header;
    size_t data;
  } cases[] = {
      {R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})", 4},    // truncated
      {R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]})", 12},  // size mismatch
      {R"({"t": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]})", 8},    // bad dtype
      {R"({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]})", 4},   // negative dim
      {R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]})", 4},    // reversed
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
       12},                                             // overlap
      {R"({"t": {"dtype": "F32", "shape": [1]}})", 4},  // no offsets
      {R"({"t": {"dtype": "F32", "shape": [4294967296, 4294967296],
                "data_offsets": [0, 0]}})",
       0},                                   // overflow
      {R"({"__metadata__": {"k": 1}})", 0},  // bad metadata
      {R"([1, 2, 3])", 0},
      {R"({"t": )", 0},
  };
  for (const auto& c : cases) {
    absl::Status status = ParseStatus(MakeFile(c.header, c.data));
    EXPECT_FALSE(status.ok()) << c.header;
  }
  // Header length beyond the file.
  std::vector<uint8_t> bytes = MakeFile("{}", 0);
  bytes[0] = 0xff;
  EXPECT_FALSE(ParseStatus(bytes).ok());
  EXPECT_FALSE(ParseStatus({1, 2, 3}).ok());
  EXPECT_TRUE(ParseStatus(MakeFile("{}", 0)).ok());
}

// Seeded mutations of a valid file: Parse must return (OK or an error), never crash or read
// outside the buffer (the buffer is exactly sized, so ASan-free runs still catch wild reads
// through the checks on every offset).
TEST(SafetensorsTest, FuzzedFilesNeverCrash) {
  std::mt19937 rng(12345);
  std::vector<TensorToWrite> tensors = {F32Tensor("w", {4, 3}, &rng), F32Tensor("v", {5}, &rng)};
  const std::string path = TempDir("fuzz") + "/f.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok());
  const std::vector<uint8_t> valid = ReadBytes(path);
  uint64_t header_len;
  std::memcpy(&header_len, valid.data(), 8);
  for (size_t cut = 0; cut < valid.size(); ++cut) {
    std::vector<uint8_t> truncated(valid.begin(), valid.begin() + cut);
    EXPECT_FALSE(ParseStatus(truncated).ok()) << "accepted a file cut at " << cut;
  }
  int accepted = 0;
  for (int trial = 0; trial < 5000; ++trial) {
    std::vector<uint8_t> bytes = valid;
    int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) {
      size_t at = rng() % (8 + header_len);
      bytes[at] = static_cast<uint8_t>(rng());
    }
    absl::StatusOr<SafetensorsFile> parsed = SafetensorsFile::Parse(bytes, "fuzz");
    if (parsed.ok()) {
      ++accepted;
      for (const auto& [name, view] : parsed->tensors()) {
        ASSERT_GE(view.data, bytes.data());
        ASSERT_LE(view.data + view.num_bytes, bytes.data() + bytes.size());
      }
    }
  }
  // JSON-level mutations: valid JSON with wrong types and huge or negative values.
  nlohmann::json header =
      nlohmann::json::parse(std::string(valid.begin() + 8, valid.begin() + 8 + header_len));
  const nlohmann::json replacements[] = {nullptr,
                                         -1,
                                         1e300,
                                         "x",
                                         nlohmann::json::array(),
                                         nlohmann::json::object(),
                                         18446744073709551615ull,
                                         nlohmann::json::array({0}),
                                         nlohmann::json::array({-8, 0})};
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    for (const nlohmann::json& value : replacements) {
      nlohmann::json mutated = header;
      mutated["w"][key] = value;
      std::vector<uint8_t> bytes = MakeFile(mutated.dump(), valid.size() - 8 - header_len);
      EXPECT_FALSE(ParseStatus(bytes).ok()) << mutated.dump();
    }
    nlohmann::json missing = header;
    missing["w"].erase(key);
    EXPECT_FALSE(ParseStatus(MakeFile(missing.dump(), 100)).ok());
  }
  RecordProperty("accepted_mutations", accepted);
}

TEST(SafetensorsTest, HalfConversionsRoundToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(-2.0f), 0xc000);
  // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(FloatToBf16(1.00390625f), 0x3f80);
  EXPECT_EQ(FloatToBf16(1.01171875f), 0x3f82);  // 1 + 3*2^-8: halfway, to even 1 + 2^-6.
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(NAN))));
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(INFINITY)), INFINITY);
  EXPECT_EQ(FloatToF16(1.0f), 0x3c00);
  EXPECT_EQ(FloatToF16(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToF16(70000.0f), 0x7c00);
  EXPECT_EQ(FloatToF16(5.9604645e-08f), 0x0001);  // Smallest subnormal.
  EXPECT_EQ(FloatToF16(1.00048828125f), 0x3c00);  // 1 + 2^-11: tie to even.
  EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16(NAN))));
  std::mt19937 rng(std::random_device{}());
  std::uniform_real_distribution<float> dist(-1000.0f, 1000.0f);
  for (int i = 0; i < 10000; ++i) {
    float v = dist(rng);
    EXPECT_LE(std::fabs(Bf16ToFloat(FloatToBf16(v)) - v), std::fabs(v) * (1.0f / 256));
    EXPECT_LE(std::fabs(F16ToFloat(FloatToF16(v)) - v), std::fabs(v) * (1.0f / 2048));
  }
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

TEST(CheckpointMakerTest, DeterministicAndLoadable) {
  const std::string a = TempDir("ckpt_a"), b = TempDir("ckpt_b"), c = TempDir("ckpt_c");
  ASSERT_TRUE(WriteRandomCheckpoint(a, TinyOptions(7)).ok());
  ASSERT_TRUE(WriteRandomCheckpoint(b, TinyOptions(7)).ok());
  ASSERT_TRUE(WriteRandomCheckpoint(c, TinyOptions(8)).ok());
  EXPECT_EQ(ReadBytes(a + "/model.safetensors"), ReadBytes(b + "/model.safetensors"));
  EXPECT_NE(ReadBytes(a + "/model.safetensors"), ReadBytes(c + "/model.safetensors"));

  absl::StatusOr<ModelConfig> config = LoadModelConfig(a);
  ASSERT_TRUE(config.ok()) << config.status();
  absl::StatusOr<std::unique_ptr<TensorStore>> store = TensorStore::OpenDirectory(a);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->tensors().size(), 3u + 9u * config->num_hidden_layers);
  const TensorView* q =
      (*store)
          ->FindWithShape("model.layers.1.self_attn.q_proj.weight",
                          {config->num_attention_heads * config->head_dim, config->hidden_size})
          .value();
  std::vector<float> values(q->NumElements());
  ASSERT_TRUE(ConvertToF32(*q, absl::MakeSpan(values)).ok());
  double sum_sq = 0;
  for (float v : values) sum_sq += v * v;
  EXPECT_NEAR(std::sqrt(sum_sq / values.size()), 0.02, 0.002);
}

TEST(CheckpointMakerTest, ShardedCheckpointReadsBackIdentically) {
  const std::string single = TempDir("ckpt_single"), sharded = TempDir("ckpt_sharded");
  CheckpointOptions options = TinyOptions(3);
  ASSERT_TRUE(WriteRandomCheckpoint(single, options).ok());
  options.shard_max_bytes = 40000;
  ASSERT_TRUE(WriteRandomCheckpoint(sharded, options).ok());
  auto one = TensorStore::OpenDirectory(single).value();
  auto many = TensorStore::OpenDirectory(sharded).value();
  ASSERT_EQ(one->tensors().size(), many->tensors().size());
  for (const auto& [name, view] : one->tensors()) {
    const TensorView* other = many->Find(name).value();
    ASSERT_EQ(view.num_bytes, other->num_bytes);
    EXPECT_EQ(std::memcmp(view.data, other->data, view.num_bytes), 0) << name;
  }
  // A weight_map entry pointing at the wrong shard is an error, not a crash.
  std::ifstream in(sharded + "/model.safetensors.index.json");
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json index = nlohmann::json::parse(text.str());
  index["weight_map"]["model.norm.weight"] = "model-00002-of-00099.safetensors";
  std::ofstream(sharded + "/model.safetensors.index.json") << index.dump();
  EXPECT_FALSE(TensorStore::OpenDirectory(sharded).ok());
}

}  // namespace
}  // namespace sparseaccel
