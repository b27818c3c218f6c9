// Seeded mutations of a valid safetensors file and of a valid config.json: the parsers must
// return OK or an error status, never crash, and never hand out a tensor that reaches outside
// the buffer. Every mutated input lives in a heap buffer of exactly its size, so that the
// AddressSanitizer build of this test (safetensors_fuzz_asan_test) catches any read past it.

#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/checkpoint/config.h"
#include "model/checkpoint/llama31_config.h"
#include "model/checkpoint/safetensors.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace {

using Json = nlohmann::json;

std::vector<uint8_t> RandomBytes(size_t n, std::mt19937* rng) {
  std::vector<uint8_t> bytes(n);
  for (uint8_t& b : bytes) b = static_cast<uint8_t>((*rng)() | 1);  // Never all zero.
  return bytes;
}

// A valid file with every supported dtype, a 0-d scalar, an empty tensor and metadata.
std::vector<uint8_t> ValidFile(std::mt19937* rng) {
  std::vector<TensorToWrite> tensors = {
      {"w", DType::kF32, {4, 3}, RandomBytes(48, rng)},
      {"v", DType::kBF16, {5}, RandomBytes(10, rng)},
      {"h", DType::kF16, {2, 2}, RandomBytes(8, rng)},
      {"scalar", DType::kF32, {}, RandomBytes(4, rng)},
      {"empty", DType::kF32, {0, 7}, {}},
  };
  const char* base = getenv("TEST_TMPDIR");
  const std::string path = std::string(base ? base : "/tmp") + "/fuzz_seed.safetensors";
  absl::Status status = WriteSafetensors(path, tensors, {{"format", "pt"}});
  EXPECT_TRUE(status.ok()) << status;
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
}

uint64_t HeaderLength(const std::vector<uint8_t>& file) {
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | file[i];
  return len;
}

std::vector<uint8_t> WithHeader(const std::string& header, const uint8_t* data, size_t data_bytes) {
  std::vector<uint8_t> bytes(8);
  const uint64_t len = header.size();
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(len >> (8 * i));
  bytes.insert(bytes.end(), header.begin(), header.end());
  bytes.insert(bytes.end(), data, data + data_bytes);
  return bytes;
}

// Parses a private copy of `bytes` (exactly sized, so sanitizers see any overrun) and checks
// what an accepted file promises: every tensor lies inside the buffer with a consistent size.
absl::Status ParseAndCheck(const std::vector<uint8_t>& bytes) {
  std::unique_ptr<uint8_t[]> copy(new uint8_t[bytes.size() + 1]);
  if (!bytes.empty()) std::memcpy(copy.get(), bytes.data(), bytes.size());
  absl::Span<const uint8_t> span(copy.get(), bytes.size());
  absl::StatusOr<SafetensorsFile> parsed = SafetensorsFile::Parse(span, "fuzz");
  if (!parsed.ok()) {
    EXPECT_FALSE(parsed.status().message().empty());
    return parsed.status();
  }
  for (const auto& [name, view] : parsed->tensors()) {
    EXPECT_GE(view.data, span.data()) << name;
    EXPECT_LE(view.data + view.num_bytes, span.data() + span.size()) << name;
    EXPECT_EQ(view.num_bytes, static_cast<size_t>(view.NumElements()) * DTypeSize(view.dtype))
        << name;
    uint64_t checksum = 0;  // Touch every byte: ASan reports a read outside the buffer.
    for (size_t i = 0; i < view.num_bytes; ++i) checksum += view.data[i];
    (void)checksum;
  }
  return absl::OkStatus();
}

class SafetensorsFuzzTest : public ::testing::Test {
 protected:
  void SetUp() override {
    valid_ = ValidFile(&rng_);
    header_len_ = HeaderLength(valid_);
    header_ = Json::parse(std::string(valid_.begin() + 8, valid_.begin() + 8 + header_len_));
    ASSERT_TRUE(ParseAndCheck(valid_).ok());
  }
  // `header` (any JSON) in front of the valid file's data area.
  std::vector<uint8_t> FileWithHeader(const Json& header) const {
    return WithHeader(header.dump(), valid_.data() + 8 + header_len_,
                      valid_.size() - 8 - header_len_);
  }

  std::mt19937 rng_{20261122};
  std::vector<uint8_t> valid_;
  uint64_t header_len_ = 0;
  Json header_;
};

TEST_F(SafetensorsFuzzTest, EveryTruncationIsRejected) {
  for (size_t cut = 0; cut < valid_.size(); ++cut) {
    std::vector<uint8_t> truncated(valid_.begin(), valid_.begin() + cut);
    EXPECT_FALSE(ParseAndCheck(truncated).ok()) << "accepted a file cut at " << cut;
  }
}

TEST_F(SafetensorsFuzzTest, HeaderLengthMutations) {
  const uint64_t lengths[] = {0,
                              1,
                              header_len_ - 1,
                              header_len_ + 1,
                              valid_.size() - 8,
                              valid_.size() - 7,
                              valid_.size(),
                              1ull << 32,
                              (100ull << 20) + 1,
                              ~0ull,
                              ~0ull - 7};
  for (uint64_t len : lengths) {
    std::vector<uint8_t> bytes = valid_;
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(len >> (8 * i));
    EXPECT_FALSE(ParseAndCheck(bytes).ok()) << "header length " << len;
  }
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<uint8_t> bytes = valid_;
    bytes[rng_() % 8] = static_cast<uint8_t>(rng_());
    ParseAndCheck(bytes).IgnoreError();
  }
}

TEST_F(SafetensorsFuzzTest, RandomByteFlipsInHeader) {
  int accepted = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    std::vector<uint8_t> bytes = valid_;
    const int flips = 1 + static_cast<int>(rng_() % 4);
    for (int f = 0; f < flips; ++f) {
      bytes[8 + rng_() % header_len_] = static_cast<uint8_t>(rng_());
    }
    if (ParseAndCheck(bytes).ok()) ++accepted;
  }
  RecordProperty("accepted_flips", accepted);
}

// Inserts or deletes header characters and fixes the length field, so the parser sees shifted
// structure (cut strings, merged numbers, stray brackets) rather than only a bad length.
TEST_F(SafetensorsFuzzTest, HeaderTextSplices) {
  const std::string text(valid_.begin() + 8, valid_.begin() + 8 + header_len_);
  const std::string alphabet = "{}[]\",:-0123456789eE.+ \\ntrufalsFBI";
  for (int trial = 0; trial < 10000; ++trial) {
    std::string mutated = text;
    const int edits = 1 + static_cast<int>(rng_() % 3);
    for (int e = 0; e < edits && !mutated.empty(); ++e) {
      const size_t at = rng_() % mutated.size();
      if (rng_() % 2) {
        mutated.erase(at, 1 + rng_() % 4);
      } else {
        mutated.insert(at, 1, alphabet[rng_() % alphabet.size()]);
      }
    }
    ParseAndCheck(
        WithHeader(mutated, valid_.data() + 8 + header_len_, valid_.size() - 8 - header_len_))
        .IgnoreError();
  }
}

TEST_F(SafetensorsFuzzTest, WrongTypesAndValuesAreRejected) {
  const Json replacements[] = {nullptr,
                               -1,
                               1e300,
                               -1e300,
                               0.5,
                               "x",
                               true,
                               Json::array(),
                               Json::object(),
                               18446744073709551615ull,
                               Json::array({0}),
                               Json::array({-8, 0}),
                               Json::array({0, -8}),
                               Json::array({0.0, 48.0}),
                               Json::array({"0", "48"}),
                               Json::array({0, 48, 96}),
                               Json::array({nullptr, nullptr}),
                               Json::array({1ull << 63, (1ull << 63) + 48})};
  for (const std::string tensor : {"w", "scalar"}) {
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      for (const Json& value : replacements) {
        Json mutated = header_;
        mutated[tensor][key] = value;
        if (mutated == header_) continue;  // The scalar's shape is [] already.
        EXPECT_FALSE(ParseAndCheck(FileWithHeader(mutated)).ok()) << mutated.dump();
      }
      Json missing = header_;
      missing[tensor].erase(key);
      EXPECT_FALSE(ParseAndCheck(FileWithHeader(missing)).ok()) << missing.dump();
    }
  }
  // Shapes whose element count overflows, or disagrees with the byte range.
  for (const Json& shape :
       {Json::array({1ull << 32, 1ull << 32}), Json::array({1ull << 62, 4}),
        Json::array({18446744073709551615ull}), Json::array({3, 4, 0x100000001ull}),
        Json::array({12, 1, 1, 2}), Json::array({11}), Json::array({-4, -3})}) {
    Json mutated = header_;
    mutated["w"]["shape"] = shape;
    EXPECT_FALSE(ParseAndCheck(FileWithHeader(mutated)).ok()) << shape.dump();
  }
  for (const Json& metadata : {Json(1), Json("x"), Json::array({"a"}), Json::object({{"k", 1}}),
                               Json::object({{"k", nullptr}})}) {
    Json mutated = header_;
    mutated["__metadata__"] = metadata;
    EXPECT_FALSE(ParseAndCheck(FileWithHeader(mutated)).ok()) << mutated.dump();
  }
  for (const Json& entry : {Json(1), Json("w"), Json::array(), Json(nullptr)}) {
    Json mutated = header_;
    mutated["w"] = entry;
    EXPECT_FALSE(ParseAndCheck(FileWithHeader(mutated)).ok()) << mutated.dump();
  }
}

TEST_F(SafetensorsFuzzTest, OverlappingRangesAreRejected) {
  // Move each non-empty tensor onto every other tensor's start: same size, overlapping range.
  std::vector<std::string> names;
  for (auto it = header_.begin(); it != header_.end(); ++it) {
    if (it.key() != "__metadata__" &&
        it.value()["data_offsets"][0] != it.value()["data_offsets"][1]) {
      names.push_back(it.key());
    }
  }
  ASSERT_GE(names.size(), 3u);
  for (const std::string& moved : names) {
    const uint64_t size = header_[moved]["data_offsets"][1].get<uint64_t>() -
                          header_[moved]["data_offsets"][0].get<uint64_t>();
    for (const std::string& target : names) {
      if (target == moved) continue;
      for (uint64_t shift : {0, 1, 2}) {
        const uint64_t begin = header_[target]["data_offsets"][0].get<uint64_t>() + shift;
        Json mutated = header_;
        mutated[moved]["data_offsets"] = {begin, begin + size};
        EXPECT_FALSE(ParseAndCheck(FileWithHeader(mutated)).ok()) << mutated.dump();
      }
    }
  }
}

TEST_F(SafetensorsFuzzTest, DuplicateAndDeeplyNestedHeadersAreRejected) {
  // The same tensor name twice: JSON parsers keep one silently, the file must be refused.
  std::string text = header_.dump();
  const std::string w_entry = "\"w\":" + header_["w"].dump();
  text.insert(1, w_entry + ",");
  EXPECT_FALSE(ParseAndCheck(WithHeader(text, valid_.data() + 8 + header_len_,
                                        valid_.size() - 8 - header_len_))
                   .ok());
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  EXPECT_FALSE(ParseAndCheck(WithHeader(deep, nullptr, 0)).ok());
  const std::string deep_entry =
      "{\"w\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  EXPECT_FALSE(ParseAndCheck(WithHeader(deep_entry, nullptr, 0)).ok());
}

// What any accepted config promises the engines.
void ExpectUsable(const ModelConfig& c) {
  EXPECT_GT(c.vocab_size, 0);
  EXPECT_GT(c.hidden_size, 0);
  EXPECT_GT(c.intermediate_size, 0);
  EXPECT_GT(c.num_hidden_layers, 0);
  EXPECT_GT(c.num_key_value_heads, 0);
  EXPECT_EQ(c.num_attention_heads % c.num_key_value_heads, 0);
  EXPECT_GT(c.head_dim, 0);
  EXPECT_EQ(c.head_dim % 2, 0);
  EXPECT_GT(c.rope_theta, 0);
  EXPECT_GT(c.rms_norm_eps, 0);
}

TEST(ConfigFuzzTest, MutatedConfigsNeverCrash) {
  std::mt19937 rng(7);
  const std::string text = kLlama31ConfigJson;
  int accepted = 0;
  for (int trial = 0; trial < 5000; ++trial) {
    std::string mutated = text;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) mutated[rng() % mutated.size()] = static_cast<char>(rng());
    absl::StatusOr<ModelConfig> c = ParseModelConfig(mutated);
    if (c.ok()) {
      ++accepted;
      ExpectUsable(*c);
    }
  }
  RecordProperty("accepted_configs", accepted);
}

TEST(ConfigFuzzTest, EveryFieldWithWrongValuesNeverCrashes) {
  const Json base = Json::parse(kLlama31ConfigJson);
  const Json replacements[] = {nullptr,
                               -1,
                               0,
                               1,
                               3,
                               1e300,
                               -1e300,
                               0.5,
                               "x",
                               true,
                               Json::array(),
                               Json::object(),
                               18446744073709551615ull,
                               9223372036854775807ll,
                               -9223372036854775807ll - 1,
                               Json::array({1, "x"})};
  for (auto field = base.begin(); field != base.end(); ++field) {
    for (const Json& value : replacements) {
      Json mutated = base;
      mutated[field.key()] = value;
      absl::StatusOr<ModelConfig> c = ParseModelConfig(mutated.dump());
      if (c.ok()) ExpectUsable(*c);
    }
    Json missing = base;
    missing.erase(field.key());
    absl::StatusOr<ModelConfig> c = ParseModelConfig(missing.dump());
    if (c.ok()) ExpectUsable(*c);
  }
  for (const char* key :
       {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}) {
    for (const Json& value : replacements) {
      Json mutated = base;
      mutated["rope_scaling"][key] = value;
      absl::StatusOr<ModelConfig> c = ParseModelConfig(mutated.dump());
      if (c.ok()) ExpectUsable(*c);
    }
  }
}

}  // namespace
}  // namespace sparseaccel
