#include "model/checkpoint/checkpoint_maker.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/counter_random.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace {

uint64_t HashName(const std::string& name) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a.
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Uniform in [-1, 1).
float UniformSigned(uint64_t key, uint64_t index) {
  uint64_t bits = SplitMix64(key ^ SplitMix64(index));
  return static_cast<float>(static_cast<double>(bits >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

void StoreElement(DType dtype, float value, uint8_t* dst) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, &value, 4);
      break;
    case DType::kBF16: {
      uint16_t bits = FloatToBf16(value);
      std::memcpy(dst, &bits, 2);
      break;
    }
    case DType::kF16: {
      uint16_t bits = FloatToF16(value);
      std::memcpy(dst, &bits, 2);
      break;
    }
  }
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

absl::Status CopyFile(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", from));
  std::ofstream out(to, std::ios::binary | std::ios::trunc);
  out << in.rdbuf();
  out.close();
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", to));
  return absl::OkStatus();
}

std::vector<TensorSpec> LlamaTensorSpecs(const ModelConfig& c, DType dtype) {
  const int64_t q_rows = c.num_attention_heads * c.head_dim;
  const int64_t kv_rows = c.num_key_value_heads * c.head_dim;
  std::vector<TensorSpec> specs = {
      {"model.embed_tokens.weight", dtype, {c.vocab_size, c.hidden_size}},
      {"model.norm.weight", dtype, {c.hidden_size}}};
  if (!c.tie_word_embeddings) {
    specs.push_back({"lm_head.weight", dtype, {c.vocab_size, c.hidden_size}});
  }
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    specs.push_back({p + "input_layernorm.weight", dtype, {c.hidden_size}});
    specs.push_back({p + "post_attention_layernorm.weight", dtype, {c.hidden_size}});
    specs.push_back({p + "self_attn.q_proj.weight", dtype, {q_rows, c.hidden_size}});
    specs.push_back({p + "self_attn.k_proj.weight", dtype, {kv_rows, c.hidden_size}});
    specs.push_back({p + "self_attn.v_proj.weight", dtype, {kv_rows, c.hidden_size}});
    specs.push_back({p + "self_attn.o_proj.weight", dtype, {c.hidden_size, q_rows}});
    specs.push_back({p + "mlp.gate_proj.weight", dtype, {c.intermediate_size, c.hidden_size}});
    specs.push_back({p + "mlp.up_proj.weight", dtype, {c.intermediate_size, c.hidden_size}});
    specs.push_back({p + "mlp.down_proj.weight", dtype, {c.hidden_size, c.intermediate_size}});
  }
  return specs;
}

bool IsNormWeight(const std::string& name) { return name.find("norm.weight") != std::string::npos; }

// Removes the weight files of an earlier checkpoint in `dir`: a stale index would otherwise
// win over a new single file, and stale shards would mix with new ones.
absl::Status RemoveStaleWeights(const std::string& dir) {
  DIR* listing = opendir(dir.c_str());
  if (listing == nullptr) return absl::NotFoundError(absl::StrCat("cannot list ", dir));
  std::vector<std::string> stale;
  while (const dirent* entry = readdir(listing)) {
    const std::string name = entry->d_name;
    int shard = 0, shards = 0, consumed = 0;
    const bool is_shard = std::sscanf(name.c_str(), "model-%5d-of-%5d.safetensors%n", &shard,
                                      &shards, &consumed) == 2 &&
                          consumed == static_cast<int>(name.size());
    if (is_shard || name == "model.safetensors" || name == "model.safetensors.index.json") {
      stale.push_back(dir + "/" + name);
    }
  }
  closedir(listing);
  for (const std::string& path : stale) {
    if (unlink(path.c_str()) != 0) {
      return absl::PermissionDeniedError(absl::StrCat("cannot remove ", path));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> PresetConfig(const std::string& preset) {
  ModelConfig c;
  c.max_position_embeddings = 131072;
  c.rope_theta = 500000.0;
  c.rms_norm_eps = 1e-5;
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = 8192;
  c.torch_dtype = "bfloat16";
  if (preset == "tiny") {
    c.num_hidden_layers = 2, c.hidden_size = 64, c.num_attention_heads = 4;
    c.num_key_value_heads = 2, c.intermediate_size = 192, c.vocab_size = 512;
    // Small models see short contexts: scale as if trained on 256 positions so that the
    // llama3 frequency bands (low, smoothed, high) all occur in tests.
    c.rope_scaling.original_max_position_embeddings = 256;
    c.max_position_embeddings = 8192;
  } else if (preset == "small") {
    c.num_hidden_layers = 4, c.hidden_size = 256, c.num_attention_heads = 8;
    c.num_key_value_heads = 2, c.intermediate_size = 512, c.vocab_size = 512;
    c.rope_scaling.original_max_position_embeddings = 1024;
    c.max_position_embeddings = 32768;
  } else if (preset == "llama-3.1-8b") {
    c.num_hidden_layers = 32, c.hidden_size = 4096, c.num_attention_heads = 32;
    c.num_key_value_heads = 8, c.intermediate_size = 14336, c.vocab_size = 128256;
  } else {
    return absl::NotFoundError(
        absl::StrCat("unknown preset '", preset, "' (tiny, small, llama-3.1-8b)"));
  }
  c.head_dim = c.hidden_size / c.num_attention_heads;
  return c;
}

absl::Status WriteRandomCheckpoint(const std::string& out_dir, const CheckpointOptions& options) {
  ModelConfig config = options.config;
  // Validate what we are about to write by parsing it back.
  ASSIGN_OR_RETURN(ModelConfig checked, ParseModelConfig(ModelConfigToJson(config)));
  (void)checked;
  if (!(options.init_std > 0)) return absl::InvalidArgumentError("init_std must be > 0");
  // mkdir -p: create each missing parent.
  for (size_t slash = out_dir.find('/', 1);; slash = out_dir.find('/', slash + 1)) {
    const std::string prefix = out_dir.substr(0, slash);
    if (mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
      return absl::PermissionDeniedError(absl::StrCat("cannot create ", prefix));
    }
    if (slash == std::string::npos) break;
  }
  RETURN_IF_ERROR(RemoveStaleWeights(out_dir));
  RETURN_IF_ERROR(WriteText(out_dir + "/config.json", ModelConfigToJson(config)));
  nlohmann::json generation = {{"_from_model_config", true}, {"do_sample", false}};
  if (config.bos_token_id >= 0) generation["bos_token_id"] = config.bos_token_id;
  if (!config.eos_token_ids.empty()) generation["eos_token_id"] = config.eos_token_ids;
  RETURN_IF_ERROR(WriteText(out_dir + "/generation_config.json", generation.dump(2) + "\n"));

  const DType dtype = options.dtype;
  const double bound = options.init_std * std::sqrt(3.0);  // Uniform with this std.
  TensorFiller fill = [&](const TensorSpec& spec, absl::Span<uint8_t> bytes) {
    const uint64_t key = SplitMix64(options.seed) ^ HashName(spec.name);
    const int64_t n = static_cast<int64_t>(bytes.size() / DTypeSize(dtype));
    const bool norm = IsNormWeight(spec.name);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      float u = UniformSigned(key, static_cast<uint64_t>(i));
      // Norm weights near one, yet not all equal, so that tests notice when one is skipped.
      float value = norm ? 1.0f + 0.1f * u : static_cast<float>(bound * u);
      StoreElement(dtype, value, bytes.data() + i * DTypeSize(dtype));
    }
    return absl::OkStatus();
  };

  std::vector<TensorSpec> specs = LlamaTensorSpecs(config, dtype);
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  if (options.shard_max_bytes == 0) {
    RETURN_IF_ERROR(
        WriteSafetensorsStreamed(out_dir + "/model.safetensors", specs, metadata, fill));
  } else {
    std::vector<std::vector<TensorSpec>> shards(1);
    uint64_t shard_bytes = 0;
    for (const TensorSpec& spec : specs) {
      if (!shards.back().empty() && shard_bytes + spec.NumBytes() > options.shard_max_bytes) {
        shards.emplace_back();
        shard_bytes = 0;
      }
      shards.back().push_back(spec);
      shard_bytes += spec.NumBytes();
    }
    nlohmann::json weight_map = nlohmann::json::object();
    uint64_t total_bytes = 0;
    for (size_t s = 0; s < shards.size(); ++s) {
      const std::string file =
          absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards.size());
      RETURN_IF_ERROR(WriteSafetensorsStreamed(out_dir + "/" + file, shards[s], metadata, fill));
      for (const TensorSpec& spec : shards[s]) {
        weight_map[spec.name] = file;
        total_bytes += spec.NumBytes();
      }
    }
    nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}},
                            {"weight_map", weight_map}};
    RETURN_IF_ERROR(WriteText(out_dir + "/model.safetensors.index.json", index.dump(2) + "\n"));
  }
  if (!options.tokenizer_json.empty()) {
    RETURN_IF_ERROR(CopyFile(options.tokenizer_json, out_dir + "/tokenizer.json"));
    std::string dir = options.tokenizer_json.substr(0, options.tokenizer_json.rfind('/') + 1);
    std::string tokenizer_config = dir + "tokenizer_config.json";
    std::ifstream probe(tokenizer_config);
    if (probe) RETURN_IF_ERROR(CopyFile(tokenizer_config, out_dir + "/tokenizer_config.json"));
  }
  return absl::OkStatus();
}

}  // namespace sparseaccel
