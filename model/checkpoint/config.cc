#include "model/checkpoint/config.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace {

// The config's sizes by their config.json names: each must be in [1, kMaxSize].
std::vector<std::pair<const char*, int64_t>> SizeFields(const ModelConfig& c) {
  return {{"vocab_size", c.vocab_size},
          {"hidden_size", c.hidden_size},
          {"intermediate_size", c.intermediate_size},
          {"num_hidden_layers", c.num_hidden_layers},
          {"num_attention_heads", c.num_attention_heads},
          {"num_key_value_heads", c.num_key_value_heads},
          {"max_position_embeddings", c.max_position_embeddings}};
}

using Json = nlohmann::json;

// Bound on every size field, so that products of two sizes (a weight's element count) cannot
// overflow int64 in the engines; real models are many orders of magnitude below it.
constexpr int64_t kMaxSize = (int64_t{1} << 31) - 1;

absl::Status FieldError(const std::string& field, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: field '", field, "' ", problem));
}

// Reads an integer field; `required` fields must exist, all must be integers in range.
absl::Status ReadInt(const Json& json, const std::string& field, bool required, int64_t* out) {
  auto it = json.find(field);
  if (it == json.end() || it->is_null()) {
    return required ? FieldError(field, "is missing") : absl::OkStatus();
  }
  if (!it->is_number_integer()) return FieldError(field, "must be an integer");
  *out = it->get<int64_t>();
  return absl::OkStatus();
}

absl::Status ReadDouble(const Json& json, const std::string& field, double* out) {
  auto it = json.find(field);
  if (it == json.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) return FieldError(field, "must be a number");
  *out = it->get<double>();
  return absl::OkStatus();
}

absl::Status ReadBool(const Json& json, const std::string& field, bool* out) {
  auto it = json.find(field);
  if (it == json.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) return FieldError(field, "must be true or false");
  *out = it->get<bool>();
  return absl::OkStatus();
}

// Either field may be absent, not both; a present one must name Llama (a config that says
// "llama" in one field and another architecture in the other is refused, not guessed at).
absl::Status CheckArchitecture(const Json& json) {
  auto model_type = json.find("model_type");
  const bool has_model_type = model_type != json.end() && !model_type->is_null();
  if (has_model_type && (!model_type->is_string() || model_type->get<std::string>() != "llama")) {
    return FieldError("model_type", "must be \"llama\" (only the Llama family is supported)");
  }
  auto archs = json.find("architectures");
  if (archs == json.end() || archs->is_null()) {
    if (has_model_type) return absl::OkStatus();
  } else if (archs->is_array()) {
    for (const Json& arch : *archs) {
      if (arch.is_string() && arch.get<std::string>() == "LlamaForCausalLM") {
        return absl::OkStatus();
      }
    }
  }
  return FieldError("architectures", "must contain LlamaForCausalLM (or model_type \"llama\")");
}

// Reads `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x, which also carries
// rope_theta) into `c`.
absl::Status ParseRope(const Json& json, ModelConfig* c) {
  RETURN_IF_ERROR(ReadDouble(json, "rope_theta", &c->rope_theta));
  std::string field = "rope_parameters";
  auto it = json.find(field);
  if (it == json.end() || it->is_null()) {
    field = "rope_scaling";
    it = json.find(field);
  }
  if (it == json.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_object()) return FieldError(field, "must be an object or null");
  const Json& rope = *it;
  if (rope.contains("rope_theta")) {
    absl::Status status = ReadDouble(rope, "rope_theta", &c->rope_theta);
    if (!status.ok()) return FieldError(field + ".rope_theta", "must be a number");
  }
  RopeScaling* scaling = &c->rope_scaling;
  std::string type;
  for (const char* key : {"rope_type", "type"}) {
    auto t = rope.find(key);
    if (t != rope.end() && t->is_string()) {
      type = t->get<std::string>();
      break;
    }
  }
  if (type == "default") return absl::OkStatus();
  if (type != "llama3") {
    return FieldError(field + ".rope_type",
                      absl::StrCat("\"", type, "\" is not supported (only \"llama3\")"));
  }
  scaling->type = RopeScaling::Type::kLlama3;
  for (auto& [key, target] : std::vector<std::pair<const char*, double*>>{
           {"factor", &scaling->factor},
           {"low_freq_factor", &scaling->low_freq_factor},
           {"high_freq_factor", &scaling->high_freq_factor}}) {
    const std::string name = absl::StrCat(field, ".", key);
    if (!rope.contains(key)) return FieldError(name, "is missing");
    absl::Status status = ReadDouble(rope, key, target);
    if (!status.ok()) return FieldError(name, "must be a number");
    if (!(*target > 0)) return FieldError(name, "must be > 0");
  }
  if (!(scaling->high_freq_factor > scaling->low_freq_factor)) {
    return FieldError(field + ".high_freq_factor", "must exceed low_freq_factor");
  }
  int64_t original = 0;
  absl::Status status = ReadInt(rope, "original_max_position_embeddings", true, &original);
  if (!status.ok()) {
    return FieldError(field + ".original_max_position_embeddings", "must be an integer");
  }
  if (original <= 0 || original > kMaxSize) {
    return FieldError(field + ".original_max_position_embeddings",
                      absl::StrCat("must be in [1, ", kMaxSize, "]"));
  }
  scaling->original_max_position_embeddings = original;
  return absl::OkStatus();
}

absl::Status ParseEos(const Json& json, std::vector<int64_t>* eos) {
  auto it = json.find("eos_token_id");
  if (it == json.end() || it->is_null()) return absl::OkStatus();
  if (it->is_number_integer()) {
    eos->push_back(it->get<int64_t>());
    return absl::OkStatus();
  }
  if (!it->is_array()) return FieldError("eos_token_id", "must be an integer or a list");
  for (const Json& id : *it) {
    if (!id.is_number_integer()) return FieldError("eos_token_id", "must hold integers");
    eos->push_back(id.get<int64_t>());
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text) {
  Json json = Json::parse(json_text.begin(), json_text.end(), nullptr,
                          /*allow_exceptions=*/false);
  if (json.is_discarded()) return absl::InvalidArgumentError("config.json: not valid JSON");
  if (!json.is_object()) return absl::InvalidArgumentError("config.json: not a JSON object");
  RETURN_IF_ERROR(CheckArchitecture(json));

  ModelConfig c;
  RETURN_IF_ERROR(ReadInt(json, "vocab_size", true, &c.vocab_size));
  RETURN_IF_ERROR(ReadInt(json, "hidden_size", true, &c.hidden_size));
  RETURN_IF_ERROR(ReadInt(json, "intermediate_size", true, &c.intermediate_size));
  RETURN_IF_ERROR(ReadInt(json, "num_hidden_layers", true, &c.num_hidden_layers));
  RETURN_IF_ERROR(ReadInt(json, "num_attention_heads", true, &c.num_attention_heads));
  c.num_key_value_heads = c.num_attention_heads;
  RETURN_IF_ERROR(ReadInt(json, "num_key_value_heads", false, &c.num_key_value_heads));
  RETURN_IF_ERROR(ReadInt(json, "max_position_embeddings", true, &c.max_position_embeddings));
  for (const auto& [field, value] : SizeFields(c)) {
    if (value <= 0 || value > kMaxSize) {
      return FieldError(field, absl::StrCat("must be in [1, ", kMaxSize, "]"));
    }
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return FieldError("num_key_value_heads", "must divide num_attention_heads");
  }
  c.head_dim = c.hidden_size / c.num_attention_heads;
  RETURN_IF_ERROR(ReadInt(json, "head_dim", false, &c.head_dim));
  if (c.head_dim <= 0 || c.head_dim > kMaxSize || c.head_dim % 2 != 0) {
    return FieldError("head_dim", "must be a positive even number");
  }
  if (!json.contains("head_dim") && c.hidden_size % c.num_attention_heads != 0) {
    return FieldError("num_attention_heads", "must divide hidden_size");
  }
  RETURN_IF_ERROR(ParseRope(json, &c));
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta)) {
    return FieldError("rope_theta", "must be > 0");
  }
  RETURN_IF_ERROR(ReadDouble(json, "rms_norm_eps", &c.rms_norm_eps));
  if (!(c.rms_norm_eps > 0)) return FieldError("rms_norm_eps", "must be > 0");
  RETURN_IF_ERROR(ReadBool(json, "tie_word_embeddings", &c.tie_word_embeddings));
  RETURN_IF_ERROR(ReadInt(json, "bos_token_id", false, &c.bos_token_id));
  RETURN_IF_ERROR(ParseEos(json, &c.eos_token_ids));

  for (const char* field : {"attention_bias", "mlp_bias"}) {
    bool set = false;
    RETURN_IF_ERROR(ReadBool(json, field, &set));
    if (set) return FieldError(field, "true is not supported");
  }
  auto act = json.find("hidden_act");
  if (act != json.end() && (!act->is_string() || act->get<std::string>() != "silu")) {
    return FieldError("hidden_act", "must be \"silu\"");
  }
  for (const char* field : {"torch_dtype", "dtype"}) {
    auto dtype = json.find(field);
    if (dtype == json.end() || dtype->is_null()) continue;
    if (!dtype->is_string()) return FieldError(field, "must be a string");
    std::string name = dtype->get<std::string>();
    if (name != "float32" && name != "float16" && name != "bfloat16") {
      return FieldError(field, absl::StrCat("\"", name, "\" is not supported"));
    }
    c.torch_dtype = name;
  }
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  std::string path = model_dir + "/config.json";
  ASSIGN_OR_RETURN(const std::string text, ReadFile(path));
  absl::StatusOr<ModelConfig> config = ParseModelConfig(text);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", std::string(config.status().message())));
  }
  return config;
}

std::string ModelConfigToJson(const ModelConfig& c) {
  Json json = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"attention_dropout", 0.0},
      {"mlp_bias", false},
      {"initializer_range", 0.02},
      {"pretraining_tp", 1},
      {"use_cache", true},
      {"head_dim", c.head_dim},
      {"rope_theta", c.rope_theta},
      {"rms_norm_eps", c.rms_norm_eps},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"torch_dtype", c.torch_dtype},  // transformers 4.x reads this name, 5.x "dtype".
      {"dtype", c.torch_dtype},
  };
  for (const auto& [field, value] : SizeFields(c)) json[field] = value;
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3) {
    json["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", c.rope_scaling.factor},
        {"low_freq_factor", c.rope_scaling.low_freq_factor},
        {"high_freq_factor", c.rope_scaling.high_freq_factor},
        {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings}};
  } else {
    json["rope_scaling"] = nullptr;
  }
  if (c.bos_token_id >= 0) json["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) {
    json["eos_token_id"] = c.eos_token_ids[0];
  } else if (!c.eos_token_ids.empty()) {
    json["eos_token_id"] = c.eos_token_ids;
  }
  return json.dump(2) + "\n";
}

absl::Status CheckTokenIds(absl::Span<const int32_t> ids, int64_t vocab_size) {
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " outside the vocabulary [0, ", vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace sparseaccel
