#include "kernels/sparse/pattern_config.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace {

using Json = nlohmann::json;

absl::Status Bad(const std::string& where, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("sparse config: ", where, ": ", what));
}

// A positive integer field (or >= 0 when `allow_zero`).
absl::Status ReadCount(const Json& json, const std::string& key, const std::string& where,
                       bool allow_zero, int64_t* out) {
  auto it = json.find(key);
  if (it == json.end()) return Bad(where, absl::StrCat("missing '", key, "'"));
  if (!it->is_number_integer() || it->get<int64_t>() < (allow_zero ? 0 : 1)) {
    return Bad(where, absl::StrCat("'", key, "' must be an integer ", allow_zero ? ">= 0" : "> 0"));
  }
  *out = it->get<int64_t>();
  return absl::OkStatus();
}

// Rejects keys outside `allowed`: a misspelt budget must not silently fall back to a default.
absl::Status OnlyKeys(const Json& json, std::initializer_list<const char*> allowed,
                      const std::string& where) {
  for (auto it = json.begin(); it != json.end(); ++it) {
    if (std::find_if(allowed.begin(), allowed.end(),
                     [&](const char* key) { return it.key() == key; }) == allowed.end()) {
      return Bad(where, absl::StrCat("unknown key '", it.key(), "'"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<HeadPattern> ParseHead(const Json& json, const std::string& where) {
  if (!json.is_object()) return Bad(where, "must be an object");
  auto name = json.find("pattern");
  if (name == json.end() || !name->is_string()) return Bad(where, "missing 'pattern'");
  HeadPattern head;
  const std::string kind = name->get<std::string>();
  if (kind == "dense") {
    head.kind = HeadPattern::Kind::kDense;
    RETURN_IF_ERROR(OnlyKeys(json, {"pattern"}, where));
  } else if (kind == "a_shape") {
    head.kind = HeadPattern::Kind::kAShape;
    RETURN_IF_ERROR(OnlyKeys(json, {"pattern", "sink", "window"}, where));
    RETURN_IF_ERROR(ReadCount(json, "sink", where, true, &head.sink));
    RETURN_IF_ERROR(ReadCount(json, "window", where, false, &head.window));
  } else if (kind == "vertical_slash") {
    head.kind = HeadPattern::Kind::kVerticalSlash;
    RETURN_IF_ERROR(OnlyKeys(json, {"pattern", "vertical", "slash", "last_q"}, where));
    RETURN_IF_ERROR(ReadCount(json, "vertical", where, false, &head.vertical_slash.vertical));
    RETURN_IF_ERROR(ReadCount(json, "slash", where, false, &head.vertical_slash.slash));
    RETURN_IF_ERROR(ReadCount(json, "last_q", where, false, &head.vertical_slash.last_q));
  } else if (kind == "block_sparse") {
    head.kind = HeadPattern::Kind::kBlockSparse;
    RETURN_IF_ERROR(OnlyKeys(json, {"pattern", "top_k"}, where));
    RETURN_IF_ERROR(ReadCount(json, "top_k", where, false, &head.top_k));
  } else {
    return Bad(where, absl::StrCat("unknown pattern '", kind,
                                   "' (dense, a_shape, vertical_slash, block_sparse)"));
  }
  return head;
}

Json HeadJson(const HeadPattern& head) {
  Json entry = {{"pattern", std::string(PatternName(head.kind))}};
  switch (head.kind) {
    case HeadPattern::Kind::kDense:
      break;
    case HeadPattern::Kind::kAShape:
      entry["sink"] = head.sink;
      entry["window"] = head.window;
      break;
    case HeadPattern::Kind::kVerticalSlash:
      entry["vertical"] = head.vertical_slash.vertical;
      entry["slash"] = head.vertical_slash.slash;
      entry["last_q"] = head.vertical_slash.last_q;
      break;
    case HeadPattern::Kind::kBlockSparse:
      entry["top_k"] = head.top_k;
      break;
  }
  return entry;
}

}  // namespace

HeadPattern AShapePattern(int64_t sink, int64_t window) {
  HeadPattern p;
  p.kind = HeadPattern::Kind::kAShape;
  p.sink = sink;
  p.window = window;
  return p;
}

HeadPattern VerticalSlashPattern(int64_t vertical, int64_t slash, int64_t last_q) {
  HeadPattern p;
  p.kind = HeadPattern::Kind::kVerticalSlash;
  p.vertical_slash = {vertical, slash, last_q};
  return p;
}

HeadPattern BlockSparsePattern(int64_t top_k) {
  HeadPattern p;
  p.kind = HeadPattern::Kind::kBlockSparse;
  p.top_k = top_k;
  return p;
}

absl::string_view PatternName(HeadPattern::Kind kind) {
  switch (kind) {
    case HeadPattern::Kind::kDense:
      return "dense";
    case HeadPattern::Kind::kAShape:
      return "a_shape";
    case HeadPattern::Kind::kVerticalSlash:
      return "vertical_slash";
    case HeadPattern::Kind::kBlockSparse:
      return "block_sparse";
  }
  return "?";
}

absl::StatusOr<SparseConfig> ParseSparseConfig(absl::string_view text) {
  Json json = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) return Bad("top level", "not a JSON object");
  SparseConfig config;
  RETURN_IF_ERROR(ReadCount(json, "version", "top level", false, &config.version));
  if (config.version != 1) {
    return Bad("top level", absl::StrCat("version ", config.version, " is not supported (1)"));
  }
  RETURN_IF_ERROR(OnlyKeys(json,
                           {"version", "model", "dense_below_tokens", "budget_tokens",
                            "target_density", "calibration", "layers"},
                           "top level"));
  auto model = json.find("model");
  if (model == json.end() || !model->is_object()) return Bad("top level", "missing 'model'");
  RETURN_IF_ERROR(OnlyKeys(*model, {"num_layers", "num_heads"}, "model"));
  RETURN_IF_ERROR(ReadCount(*model, "num_layers", "model", false, &config.num_layers));
  RETURN_IF_ERROR(ReadCount(*model, "num_heads", "model", false, &config.num_heads));
  RETURN_IF_ERROR(
      ReadCount(json, "dense_below_tokens", "top level", true, &config.dense_below_tokens));
  if (json.contains("budget_tokens")) {
    RETURN_IF_ERROR(ReadCount(json, "budget_tokens", "top level", true, &config.budget_tokens));
  }
  auto target = json.find("target_density");
  if (target == json.end() || !target->is_number() || !(target->get<double>() > 0) ||
      target->get<double>() > 1) {
    return Bad("top level", "'target_density' must be a number in (0, 1]");
  }
  config.target_density = target->get<double>();
  auto calibration = json.find("calibration");
  if (calibration != json.end()) {
    if (!calibration->is_object()) return Bad("calibration", "must be an object");
    RETURN_IF_ERROR(OnlyKeys(*calibration, {"prompts", "tokens", "seed"}, "calibration"));
    RETURN_IF_ERROR(
        ReadCount(*calibration, "prompts", "calibration", true, &config.calibration_prompts));
    RETURN_IF_ERROR(
        ReadCount(*calibration, "tokens", "calibration", true, &config.calibration_tokens));
    auto seed = calibration->find("seed");
    if (seed == calibration->end() || !seed->is_number_unsigned()) {
      return Bad("calibration", "'seed' must be an integer >= 0");
    }
    config.calibration_seed = seed->get<uint64_t>();
  }
  auto layers = json.find("layers");
  if (layers == json.end() || !layers->is_array()) return Bad("top level", "missing 'layers'");
  if (static_cast<int64_t>(layers->size()) != config.num_layers) {
    return Bad("layers", absl::StrCat("has ", layers->size(), " entries, model.num_layers is ",
                                      config.num_layers));
  }
  for (size_t l = 0; l < layers->size(); ++l) {
    const Json& heads = (*layers)[l];
    const std::string where = absl::StrCat("layers[", l, "]");
    if (!heads.is_array() || static_cast<int64_t>(heads.size()) != config.num_heads) {
      return Bad(where, absl::StrCat("must list ", config.num_heads, " heads"));
    }
    config.heads.emplace_back();
    for (size_t h = 0; h < heads.size(); ++h) {
      ASSIGN_OR_RETURN(const HeadPattern head,
                       ParseHead(heads[h], absl::StrCat(where, "[", h, "]")));
      config.heads.back().push_back(head);
    }
  }
  return config;
}

absl::StatusOr<SparseConfig> LoadSparseConfig(const std::string& path) {
  ASSIGN_OR_RETURN(const std::string text, ReadFile(path));
  absl::StatusOr<SparseConfig> config = ParseSparseConfig(text);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", std::string(config.status().message())));
  }
  return config;
}

std::string HeadPatternToJson(const HeadPattern& head) { return HeadJson(head).dump(); }

std::string SparseConfigToJson(const SparseConfig& config) {
  Json layers = Json::array();
  for (const auto& heads : config.heads) {
    Json row = Json::array();
    for (const HeadPattern& head : heads) row.push_back(HeadJson(head));
    layers.push_back(row);
  }
  Json json = {{"version", config.version},
               {"model", {{"num_layers", config.num_layers}, {"num_heads", config.num_heads}}},
               {"dense_below_tokens", config.dense_below_tokens},
               {"budget_tokens", config.budget_tokens},
               {"target_density", config.target_density},
               {"calibration",
                {{"prompts", config.calibration_prompts},
                 {"tokens", config.calibration_tokens},
                 {"seed", config.calibration_seed}}},
               {"layers", layers}};
  return json.dump(1) + "\n";
}

HeadPattern PatternAtLength(const HeadPattern& pattern, int64_t n, int64_t budget_tokens) {
  if (budget_tokens <= 0 || n == budget_tokens) return pattern;
  HeadPattern scaled = pattern;
  // Rounded to nearest; never below what an index of each pattern keeps anyway.
  const auto scale = [&](int64_t budget) {
    return (budget * n + budget_tokens / 2) / budget_tokens;
  };
  if (pattern.kind == HeadPattern::Kind::kAShape) {
    scaled.window = std::max<int64_t>(kBlockSize, scale(pattern.window));
  } else if (pattern.kind == HeadPattern::Kind::kBlockSparse) {
    scaled.top_k = std::max<int64_t>(1, scale(pattern.top_k));
  } else if (pattern.kind == HeadPattern::Kind::kVerticalSlash) {
    // The index always keeps 4 columns and 64 diagonals; smaller budgets would only read so.
    scaled.vertical_slash.vertical = std::max<int64_t>(4, scale(pattern.vertical_slash.vertical));
    scaled.vertical_slash.slash =
        std::max<int64_t>(kBlockSize, scale(pattern.vertical_slash.slash));
  }
  return scaled;
}

SparseIndex BuildIndex(const HeadPattern& pattern, const float* q, int64_t q_stride, const float* k,
                       int64_t k_stride, int64_t n, int64_t d) {
  switch (pattern.kind) {
    case HeadPattern::Kind::kAShape:
      return FillNearlyFullBlocks(AShapeIndex(n, pattern.sink, pattern.window));
    case HeadPattern::Kind::kVerticalSlash:
      return FillNearlyFullBlocks(
          VerticalSlashIndex(q, q_stride, k, k_stride, n, d, pattern.vertical_slash));
    case HeadPattern::Kind::kBlockSparse:
      return FillNearlyFullBlocks(BlockSparseIndex(q, q_stride, k, k_stride, n, d, pattern.top_k));
    case HeadPattern::Kind::kDense:
      break;
  }
  return DenseIndex(n);
}

}  // namespace sparseaccel
