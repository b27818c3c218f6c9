#ifndef SPARSEACCEL_MODEL_CHECKPOINT_CONFIG_H_
#define SPARSEACCEL_MODEL_CHECKPOINT_CONFIG_H_

// The Llama family's Hugging Face `config.json` (Llama 2, 3, 3.1, 3.2): what the engines need to
// build and run a model, parsed and validated. Unsupported architectures or settings are errors.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace sparseaccel {

// `rope_scaling` of config.json. Only "llama3" (Llama 3.1/3.2) is supported besides none.
struct RopeScaling {
  enum class Type { kNone, kLlama3 };
  Type type = Type::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // == num_attention_heads when config.json omits it.
  int64_t head_dim = 0;             // hidden_size / num_attention_heads when omitted.
  int64_t max_position_embeddings = 0;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1;            // -1 when absent.
  std::vector<int64_t> eos_token_ids;   // config.json allows an int or a list.
  std::string torch_dtype = "float32";  // "float32", "float16" or "bfloat16".

  // Query heads that share one key/value head.
  int64_t QueryHeadsPerKvHead() const { return num_attention_heads / num_key_value_heads; }
};

// Parses config.json text. Errors (InvalidArgument) name the offending field: unknown
// architecture / model_type, missing, non-positive or absurd (>= 2^31) sizes, heads not
// dividing, unsupported rope_scaling type, unsupported options (hidden_act other than silu,
// attention_bias or mlp_bias set to true). Rope settings are read from `rope_scaling` +
// `rope_theta` (transformers 4.x) or from `rope_parameters` (transformers 5.x) alike.
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text);

// InvalidArgument naming the first id outside the vocabulary [0, vocab_size).
absl::Status CheckTokenIds(absl::Span<const int32_t> ids, int64_t vocab_size);

// Reads and parses `<model_dir>/config.json` (NotFound when absent).
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

// config.json text in Hugging Face's layout (architectures LlamaForCausalLM, model_type llama,
// rope_scaling with rope_type "llama3" or null, both torch_dtype and dtype), which
// ParseModelConfig and transformers (4.x and 5.x) both read back to the same model.
std::string ModelConfigToJson(const ModelConfig& config);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_CHECKPOINT_CONFIG_H_
