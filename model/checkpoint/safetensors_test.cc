#include "model/checkpoint/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/test_util.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace {

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
  std::vector<uint8_t> bytes(8 + header.size() + data_bytes, 0x5a);
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(header.size() >> (8 * i));
  std::copy(header.begin(), header.end(), bytes.begin() + 8);
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
  const std::string path = TestTempDir("roundtrip") + "/t.safetensors";
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
    absl::StatusCode code;
    std::string message_part;
  } cases[] = {
      {R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 4,
       absl::StatusCode::kInvalidArgument, "outside the data area"},  // truncated data
      {R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}})", 12,
       absl::StatusCode::kInvalidArgument, "shape x dtype needs 8"},
      {R"({"t": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})", 8,
       absl::StatusCode::kUnimplemented, "tensor 't': dtype I64"},
      {R"({"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 8]}})", 8,
       absl::StatusCode::kInvalidArgument, "tensor 't': unknown dtype \"Q4\""},
      {R"({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4,
       absl::StatusCode::kInvalidArgument, "non-negative"},
      {R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", 4,
       absl::StatusCode::kInvalidArgument, "data_offsets [4, 0)"},
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
       12, absl::StatusCode::kInvalidArgument, "overlap at byte 4"},
      {R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
       12, absl::StatusCode::kInvalidArgument, "bytes [4, 8)"},  // hole
      {R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 5,
       absl::StatusCode::kInvalidArgument, "1 trailing bytes"},
      {R"({"t": {"dtype": "F32", "shape": [1]}})", 4, absl::StatusCode::kInvalidArgument,
       "data_offsets"},
      {R"({"t": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})", 0,
       absl::StatusCode::kInvalidArgument, "too large"},
      {R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
       4, absl::StatusCode::kInvalidArgument, "repeats the key 't'"},
      {R"({"__metadata__": {"k": 1}})", 0, absl::StatusCode::kInvalidArgument, "__metadata__.k"},
      {R"([1, 2, 3])", 0, absl::StatusCode::kInvalidArgument, "not a JSON object"},
      {R"({"t": )", 0, absl::StatusCode::kInvalidArgument, "not a JSON object"},
      {"", 0, absl::StatusCode::kInvalidArgument, "not a JSON object"},
  };
  for (const auto& c : cases) {
    absl::Status status = ParseStatus(MakeFile(c.header, c.data));
    EXPECT_EQ(status.code(), c.code) << c.header << " -> " << status;
    EXPECT_NE(status.message().find(c.message_part), absl::string_view::npos)
        << c.header << " -> " << status;
  }
  EXPECT_TRUE(ParseStatus(MakeFile("{}", 0)).ok());
  EXPECT_TRUE(ParseStatus(MakeFile(R"({"__metadata__": {"format": "pt"}}    )", 0)).ok());
  EXPECT_FALSE(ParseStatus({1, 2, 3}).ok());
}

TEST(SafetensorsTest, RejectsHeaderLengths) {
  // Beyond the file.
  std::vector<uint8_t> bytes = MakeFile("{}", 0);
  bytes[0] = 0xff;
  EXPECT_NE(ParseStatus(bytes).message().find("exceeds the file"), absl::string_view::npos);
  // Within the file but absurd for a header (the data area of a real file is what is large).
  const uint64_t huge = (100ull << 20) + 8;
  bytes.assign(8 + huge + 16, ' ');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(huge >> (8 * i));
  bytes[8] = '{';
  bytes[8 + huge - 1] = '}';
  EXPECT_NE(ParseStatus(bytes).message().find("exceeds the limit"), absl::string_view::npos);
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

// The value of a non-negative, non-NaN half code, with the Inf code read as the next power of
// two after the largest finite value (2^16 for fp16, 2^128 for bf16), as IEEE rounding treats it.
double F16Value(uint16_t code) { return code == 0x7c00 ? 65536.0 : F16ToFloat(code); }
double Bf16Value(uint16_t code) {
  return code == 0x7f80 ? std::ldexp(1.0, 128) : Bf16ToFloat(code);
}

// Reference rounding: of the two codes around |value| (`below` and below + 1), the nearer, or the
// even one on a tie; computed in double, where these values and their midpoints are exact.
uint16_t NearestCode(double magnitude, uint16_t below, double (*value_of)(uint16_t)) {
  const double low = value_of(below), high = value_of(below + 1);
  if (magnitude - low < high - magnitude) return below;
  if (magnitude - low > high - magnitude) return below + 1;
  return (below & 1) ? below + 1 : below;
}

TEST(SafetensorsTest, HalfConversionsMatchNearestEvenReference) {
  // Every half value converts to float and back unchanged; NaNs stay NaN.
  for (uint32_t code = 0; code <= 0xffff; ++code) {
    const uint16_t h = static_cast<uint16_t>(code);
    const float f16 = F16ToFloat(h), bf16 = Bf16ToFloat(h);
    if (std::isnan(f16)) {
      EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16(f16)))) << code;
    } else {
      EXPECT_EQ(FloatToF16(f16), h) << code;
    }
    if (std::isnan(bf16)) {
      EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(bf16)))) << code;
    } else {
      EXPECT_EQ(FloatToBf16(bf16), h) << code;
    }
  }
  // Random float bit patterns (every exponent alike) and exact midpoints against the reference.
  std::mt19937 rng(std::random_device{}());
  std::vector<float> inputs;
  for (int i = 0; i < 200000; ++i) {
    uint32_t bits = static_cast<uint32_t>(rng());
    float v;
    std::memcpy(&v, &bits, 4);
    if (!std::isnan(v)) inputs.push_back(v);
  }
  for (uint32_t code = 0; code < 0x7c00; code += 1 + rng() % 7) {
    inputs.push_back(static_cast<float>((F16Value(code) + F16Value(code + 1)) / 2));
  }
  for (float v : inputs) {
    const double magnitude = std::fabs(static_cast<double>(v));
    const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
    // fp16: the largest code at or below |v| by binary search over the ordered finite codes.
    uint16_t lo = 0, hi = 0x7c00;
    while (hi - lo > 1) {
      const uint16_t mid = static_cast<uint16_t>((lo + hi) / 2);
      (F16Value(mid) <= magnitude ? lo : hi) = mid;
    }
    const uint16_t f16 = magnitude >= 65536.0 ? 0x7c00 : NearestCode(magnitude, lo, F16Value);
    EXPECT_EQ(FloatToF16(v), sign | f16) << v;
    // bf16: truncating the float's bits gives the code at or below |v|.
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    const uint16_t truncated = static_cast<uint16_t>((bits & 0x7fffffff) >> 16);
    const uint16_t bf16 = std::isinf(v) ? 0x7f80 : NearestCode(magnitude, truncated, Bf16Value);
    EXPECT_EQ(FloatToBf16(v), sign | bf16) << v;
  }
}

TEST(SafetensorsTest, ReadsMetadataAndRejectsBadWrites) {
  std::mt19937 rng(41);
  const std::string dir = TestTempDir("writes");
  std::vector<TensorToWrite> tensors = {F32Tensor("x", {2}, &rng)};
  ASSERT_TRUE(
      WriteSafetensors(dir + "/m.safetensors", tensors, {{"format", "pt"}, {"origin", "test"}})
          .ok());
  auto store = TensorStore::OpenFile(dir + "/m.safetensors");
  ASSERT_TRUE(store.ok()) << store.status();
  std::vector<uint8_t> bytes = ReadBytes(dir + "/m.safetensors");
  auto file = SafetensorsFile::Parse(bytes, "m");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata().at("origin"), "test");

  std::vector<TensorToWrite> duplicate = {F32Tensor("x", {2}, &rng), F32Tensor("x", {2}, &rng)};
  EXPECT_FALSE(WriteSafetensors(dir + "/d.safetensors", duplicate).ok());
  TensorToWrite wrong_size = F32Tensor("x", {2}, &rng);
  wrong_size.data.pop_back();
  EXPECT_FALSE(WriteSafetensors(dir + "/w.safetensors", {wrong_size}).ok());
  EXPECT_FALSE(
      WriteSafetensors(dir + "/n.safetensors", {F32Tensor("__metadata__", {1}, &rng)}).ok());
  EXPECT_FALSE(WriteSafetensors(dir + "/u.safetensors", {F32Tensor("bad\xff", {1}, &rng)}).ok());
  EXPECT_FALSE(WriteSafetensors("/nonexistent/dir/x.safetensors", tensors).ok());
  EXPECT_EQ(TensorStore::OpenFile(dir).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TensorStore::OpenFile(dir + "/absent").status().code(), absl::StatusCode::kNotFound);
}

class ShardedStoreTest : public ::testing::Test {
 protected:
  // Two shards written with WriteSafetensors, and the index that maps each tensor to its shard.
  void SetUp() override {
    dir_ = TestTempDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::mt19937 rng(5);
    first_ = {F32Tensor("a.weight", {4, 3}, &rng), F32Tensor("b.weight", {6}, &rng)};
    second_ = {F32Tensor("c.weight", {2, 2, 2}, &rng), F32Tensor("d.scalar", {}, &rng)};
    ASSERT_TRUE(WriteSafetensors(dir_ + "/model-00001-of-00002.safetensors", first_).ok());
    ASSERT_TRUE(WriteSafetensors(dir_ + "/model-00002-of-00002.safetensors", second_).ok());
    index_ = {{"metadata", {{"total_size", 48 + 24 + 32 + 4}}}, {"weight_map", {}}};
    for (const auto& t : first_) index_["weight_map"][t.name] = "model-00001-of-00002.safetensors";
    for (const auto& t : second_) index_["weight_map"][t.name] = "model-00002-of-00002.safetensors";
    WriteIndex(index_);
  }
  void WriteIndex(const nlohmann::json& index) const {
    std::ofstream(dir_ + "/model.safetensors.index.json") << index.dump(2);
  }
  absl::Status OpenWithIndex(const nlohmann::json& index) const {
    WriteIndex(index);
    return TensorStore::OpenDirectory(dir_).status();
  }

  std::string dir_;
  std::vector<TensorToWrite> first_, second_;
  nlohmann::json index_;
};

TEST_F(ShardedStoreTest, ReadsEveryTensorFromItsShard) {
  auto store = TensorStore::OpenDirectory(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->tensors().size(), 4u);
  for (const auto* shard : {&first_, &second_}) {
    for (const TensorToWrite& t : *shard) {
      auto view = (*store)->FindWithShape(t.name, t.shape);
      ASSERT_TRUE(view.ok()) << view.status();
      ASSERT_EQ((*view)->num_bytes, t.data.size());
      EXPECT_EQ(std::memcmp((*view)->data, t.data.data(), t.data.size()), 0) << t.name;
    }
  }
}

TEST_F(ShardedStoreTest, RejectsInconsistentIndexes) {
  nlohmann::json index = index_;
  index["weight_map"]["a.weight"] = "model-00002-of-00002.safetensors";  // Wrong shard.
  absl::Status status = OpenWithIndex(index);
  EXPECT_NE(status.message().find("a.weight is not in its shard"), absl::string_view::npos)
      << status;

  index = index_;
  index["weight_map"]["e.weight"] = "model-00002-of-00002.safetensors";  // Listed, absent.
  EXPECT_FALSE(OpenWithIndex(index).ok());

  index = index_;
  index["weight_map"]["a.weight"] = "model-00009-of-00009.safetensors";  // Missing file.
  EXPECT_EQ(OpenWithIndex(index).code(), absl::StatusCode::kNotFound);

  for (const nlohmann::json& shard :
       {nlohmann::json("../model-00001-of-00002.safetensors"), nlohmann::json(""),
        nlohmann::json(7), nlohmann::json(nullptr)}) {
    index = index_;
    index["weight_map"]["a.weight"] = shard;
    EXPECT_EQ(OpenWithIndex(index).code(), absl::StatusCode::kInvalidArgument) << shard;
  }
  index = index_;
  index["weight_map"]["a.weight"] = ".";  // A directory, not a file.
  EXPECT_FALSE(OpenWithIndex(index).ok());
  EXPECT_FALSE(OpenWithIndex(nlohmann::json::array()).ok());
  EXPECT_FALSE(OpenWithIndex({{"weight_map", 3}}).ok());
  EXPECT_FALSE(OpenWithIndex({{"metadata", {}}}).ok());
  std::ofstream(dir_ + "/model.safetensors.index.json") << "{\"weight_map\": {";
  EXPECT_FALSE(TensorStore::OpenDirectory(dir_).ok());
}

TEST_F(ShardedStoreTest, RejectsTensorsInTwoShards) {
  // A third shard that holds a copy of c.weight: listed or not, the name is ambiguous.
  ASSERT_TRUE(WriteSafetensors(dir_ + "/extra.safetensors", {second_[0], first_[1]}).ok());
  nlohmann::json index = index_;
  index["weight_map"]["b.weight"] = "extra.safetensors";
  absl::Status status = OpenWithIndex(index);
  EXPECT_NE(status.message().find("more than one shard"), absl::string_view::npos) << status;
}

TEST(SafetensorsTest, OpenDirectoryWithoutCheckpointIsNotFound) {
  EXPECT_EQ(TensorStore::OpenDirectory(TestTempDir("no_checkpoint")).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace sparseaccel
