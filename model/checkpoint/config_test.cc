#include "model/checkpoint/config.h"

#include <string>

#include "gtest/gtest.h"
#include "model/checkpoint/llama31_config.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace {

// Llama-2-7B: no GQA field, no rope scaling, a single eos id.
const char kLlama2[] = R"({
  "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
  "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
  "num_hidden_layers": 32, "rms_norm_eps": 1e-05, "rope_scaling": null,
  "tie_word_embeddings": false, "torch_dtype": "float16", "vocab_size": 32000})";

// Llama-3.2-1B: tied embeddings, explicit head_dim.
const char kLlama32[] = R"({
  "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": 128001,
  "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
  "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32,
  "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "vocab_size": 128256})";

// make_checkpoint's tiny preset (bfloat16, then tied without rope scaling) as transformers 5.17
// saves it back with save_pretrained: rope settings in rope_parameters, "dtype", no torch_dtype.
const char kTinySavedByTransformers5[] = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 510, "dtype": "bfloat16", "eos_token_id": 511, "head_dim": 16,
  "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 192,
  "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
  "pad_token_id": null, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 256, "rope_theta": 500000.0,
                      "rope_type": "llama3"},
  "tie_word_embeddings": false, "transformers_version": "5.17.0", "use_cache": true,
  "vocab_size": 512})";
const char kTiedSavedByTransformers5[] = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 510, "dtype": "float32", "eos_token_id": 511, "head_dim": 16,
  "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 192,
  "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
  "pad_token_id": null, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
  "tie_word_embeddings": true, "transformers_version": "5.17.0", "use_cache": true,
  "vocab_size": 512})";

TEST(ConfigTest, ParsesConfigsSavedByTransformers5) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kTinySavedByTransformers5);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->torch_dtype, "bfloat16");
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 256);
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->eos_token_ids, std::vector<int64_t>{511});
  c = ParseModelConfig(kTiedSavedByTransformers5);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->torch_dtype, "float32");
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
}

TEST(ConfigTest, ParsesLlama31) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kLlama31ConfigJson);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_hidden_layers, 32);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->QueryHeadsPerKvHead(), 4);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_FALSE(c->tie_word_embeddings);
}

TEST(ConfigTest, ParsesLlama2Defaults) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kLlama2);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 32);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->eos_token_ids, std::vector<int64_t>{2});
  EXPECT_EQ(c->torch_dtype, "float16");
}

TEST(ConfigTest, ParsesLlama32Tied) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kLlama32);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 32.0);
}

TEST(ConfigTest, RoundTripsThroughJson) {
  for (const char* text : {kLlama31ConfigJson, kLlama2, kLlama32}) {
    absl::StatusOr<ModelConfig> a = ParseModelConfig(text);
    ASSERT_TRUE(a.ok());
    absl::StatusOr<ModelConfig> b = ParseModelConfig(ModelConfigToJson(*a));
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(ModelConfigToJson(*a), ModelConfigToJson(*b));
    EXPECT_EQ(a->num_key_value_heads, b->num_key_value_heads);
    EXPECT_EQ(a->rope_scaling.type, b->rope_scaling.type);
    EXPECT_EQ(a->eos_token_ids, b->eos_token_ids);
  }
}

// Replaces `"field": <old>` in `text` (kLlama31ConfigJson by default) with `"field": replacement`.
std::string WithField(const std::string& field, const std::string& replacement,
                      std::string text = kLlama31ConfigJson) {
  size_t key = text.find("\"" + field + "\"");
  EXPECT_NE(key, std::string::npos) << field;
  size_t value_begin = text.find(':', key) + 1;
  size_t value_end = value_begin;
  int depth = 0;
  while (value_end < text.size()) {
    char ch = text[value_end];
    if (ch == '{' || ch == '[') ++depth;
    if (ch == '}' || ch == ']') {
      if (depth == 0) break;
      --depth;
    }
    if (ch == ',' && depth == 0) break;
    ++value_end;
  }
  return text.substr(0, value_begin) + " " + replacement + text.substr(value_end);
}

struct BadCase {
  std::string field;
  std::string value;
  std::string message_part;
};

TEST(ConfigTest, RejectsUnsupportedWithFieldName) {
  const BadCase cases[] = {
      {"model_type", "\"mistral\"", "model_type"},
      {"hidden_size", "0", "hidden_size"},
      {"hidden_size", "\"4096\"", "hidden_size"},
      {"num_key_value_heads", "5", "num_key_value_heads"},
      {"num_attention_heads", "-1", "num_attention_heads"},
      {"hidden_act", "\"gelu\"", "hidden_act"},
      {"attention_bias", "true", "attention_bias"},
      {"mlp_bias", "true", "mlp_bias"},
      {"rope_scaling", R"({"rope_type": "yarn", "factor": 4.0})", "rope_scaling"},
      {"rope_scaling", R"({"rope_type": "llama3", "factor": 8.0})", "low_freq_factor"},
      {"rope_theta", "-5", "rope_theta"},
      {"eos_token_id", "\"x\"", "eos_token_id"},
      {"torch_dtype", "\"int8\"", "torch_dtype"},
      {"vocab_size", "null", "vocab_size"},
      {"vocab_size", "4096.5", "vocab_size"},
      {"hidden_size", "4294967296", "hidden_size"},
      {"num_hidden_layers", "0", "num_hidden_layers"},
      {"intermediate_size", "-14336", "intermediate_size"},
      {"max_position_embeddings", "0", "max_position_embeddings"},
      {"rms_norm_eps", "0", "rms_norm_eps"},
      {"rms_norm_eps", "\"1e-5\"", "rms_norm_eps"},
      {"tie_word_embeddings", "1", "tie_word_embeddings"},
      {"bos_token_id", "1.5", "bos_token_id"},
      {"eos_token_id", "[128001, \"x\"]", "eos_token_id"},
      {"architectures", "[\"MistralForCausalLM\"]", "architectures"},
      {"rope_scaling", "[8.0]", "rope_scaling"},
      {"rope_scaling", R"({"factor": 8.0})", "rope_scaling.rope_type"},
      {"rope_scaling",
       R"({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
           "original_max_position_embeddings": 8192})",
       "high_freq_factor"},
      {"rope_scaling",
       R"({"rope_type": "llama3", "factor": -8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192})",
       "rope_scaling.factor"},
      {"rope_scaling",
       R"({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192.5})",
       "original_max_position_embeddings"},
  };
  for (const BadCase& c : cases) {
    absl::StatusOr<ModelConfig> parsed = ParseModelConfig(WithField(c.field, c.value));
    ASSERT_FALSE(parsed.ok()) << c.field << "=" << c.value;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(parsed.status().message()).find(c.message_part), std::string::npos)
        << parsed.status();
  }
}

TEST(ConfigTest, ArchitectureFromEitherField) {
  // Without model_type, architectures decides; without both, the config is refused.
  std::string text = WithField("model_type", "null");
  EXPECT_TRUE(ParseModelConfig(text).ok());
  size_t at = text.find("\"model_type\"");
  text.erase(at, text.find(',', at) + 1 - at);
  EXPECT_TRUE(ParseModelConfig(text).ok()) << text;
  absl::StatusOr<ModelConfig> c = ParseModelConfig(
      WithField("architectures", "[\"MistralForCausalLM\", \"LlamaForCausalLM\"]"));
  EXPECT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(ParseModelConfig(WithField("architectures", "null")).ok());
  at = text.find("\"architectures\"");
  text.erase(at, text.find(']', at) + 2 - at);
  c = ParseModelConfig(text);
  ASSERT_FALSE(c.ok()) << text;
  EXPECT_NE(std::string(c.status().message()).find("architectures"), std::string::npos);
}

TEST(ConfigTest, AcceptsRopeScalingSpellings) {
  // Older configs name the type "type"; "default" and null mean no scaling.
  absl::StatusOr<ModelConfig> c = ParseModelConfig(
      WithField("rope_scaling", R"({"type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                          "high_freq_factor": 8.0, "original_max_position_embeddings": 4096})"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 4.0);
  EXPECT_DOUBLE_EQ(c->rope_scaling.low_freq_factor, 2.0);
  EXPECT_DOUBLE_EQ(c->rope_scaling.high_freq_factor, 8.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 4096);
  for (const char* none : {"null", R"({"rope_type": "default"})"}) {
    c = ParseModelConfig(WithField("rope_scaling", none));
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kNone);
  }
}

TEST(ConfigTest, ReadsTransformers5RopeParameters) {
  // transformers 5.x writes rope_theta inside rope_parameters, next to the scaling.
  std::string text = WithField("rope_theta", "null", WithField("rope_scaling", "null"));
  const std::string rope = R"("rope_parameters": {"rope_type": "llama3", "rope_theta": 250000.0,
      "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, )";
  text.insert(1, rope);
  absl::StatusOr<ModelConfig> c = ParseModelConfig(text);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->rope_theta, 250000.0);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 16.0);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  text = WithField("rope_scaling", "null");
  text.insert(1, R"("rope_parameters": {"rope_type": "yarn", "factor": 4.0}, )");
  c = ParseModelConfig(text);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(std::string(c.status().message()).find("rope_parameters.rope_type"), std::string::npos);
}

TEST(ConfigTest, WritesHuggingFaceFields) {
  ModelConfig c = ParseModelConfig(kLlama32).value();
  nlohmann::json json = nlohmann::json::parse(ModelConfigToJson(c));
  EXPECT_EQ(json["architectures"], nlohmann::json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(json["model_type"], "llama");
  EXPECT_EQ(json["hidden_act"], "silu");
  EXPECT_EQ(json["attention_bias"], false);
  EXPECT_EQ(json["mlp_bias"], false);
  EXPECT_DOUBLE_EQ(json["initializer_range"].get<double>(), 0.02);
  EXPECT_EQ(json["torch_dtype"], "bfloat16");
  EXPECT_EQ(json["dtype"], "bfloat16");
  EXPECT_EQ(json["tie_word_embeddings"], true);
  EXPECT_EQ(json["head_dim"], 64);
  EXPECT_EQ(json["rope_scaling"]["rope_type"], "llama3");
  EXPECT_DOUBLE_EQ(json["rope_scaling"]["factor"].get<double>(), 32.0);
  EXPECT_EQ(json["rope_scaling"]["original_max_position_embeddings"], 8192);
  EXPECT_EQ(json["eos_token_id"], 128001);
  json = nlohmann::json::parse(ModelConfigToJson(ParseModelConfig(kLlama2).value()));
  EXPECT_TRUE(json["rope_scaling"].is_null());
  EXPECT_EQ(json["num_key_value_heads"], 32);
}

TEST(ConfigTest, RejectsNonJson) {
  EXPECT_FALSE(ParseModelConfig("{not json").ok());
  EXPECT_FALSE(ParseModelConfig("[1, 2]").ok());
  EXPECT_FALSE(ParseModelConfig("").ok());
}

TEST(ConfigTest, LoadReportsMissingFile) {
  absl::StatusOr<ModelConfig> c = LoadModelConfig("/nonexistent/model");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace sparseaccel
