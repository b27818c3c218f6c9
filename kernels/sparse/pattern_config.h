#ifndef SPARSEACCEL_KERNELS_SPARSE_PATTERN_CONFIG_H_
#define SPARSEACCEL_KERNELS_SPARSE_PATTERN_CONFIG_H_

// The per-model sparse attention config: one pattern with its budget per layer and head, chosen
// offline by the pattern search, loaded by the engines. JSON, schema-checked on load; see
// docs/sparse_attention.md for the format.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/sparse/sparse_index.h"

namespace sparseaccel {

struct HeadPattern {
  enum class Kind { kDense, kAShape, kVerticalSlash, kBlockSparse };
  Kind kind = Kind::kDense;
  int64_t sink = 64;      // A-shape.
  int64_t window = 1024;  // A-shape.
  VerticalSlashBudget vertical_slash;
  int64_t top_k = 16;  // Block-sparse: key blocks per query block.
};

struct SparseConfig {
  int64_t version = 1;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  // Prompts shorter than this run dense attention in every head.
  int64_t dense_below_tokens = 4096;
  // The prompt length the budgets were chosen at (PatternAtLength); 0: budgets are absolute.
  int64_t budget_tokens = 0;
  // What the search aimed at and ran on (for the record).
  double target_density = 0.1;
  int64_t calibration_prompts = 0;
  int64_t calibration_tokens = 0;
  uint64_t calibration_seed = 0;
  std::vector<std::vector<HeadPattern>> heads;  // [layer][head]
};

// A head's pattern of each kind with its budgets.
HeadPattern AShapePattern(int64_t sink, int64_t window);
HeadPattern VerticalSlashPattern(int64_t vertical, int64_t slash, int64_t last_q = 64);
HeadPattern BlockSparsePattern(int64_t top_k);

absl::string_view PatternName(HeadPattern::Kind kind);

absl::StatusOr<SparseConfig> ParseSparseConfig(absl::string_view json_text);
absl::StatusOr<SparseConfig> LoadSparseConfig(const std::string& path);
std::string SparseConfigToJson(const SparseConfig& config);
// One head's entry of SparseConfigToJson on one line, e.g.
// {"pattern":"a_shape","sink":64,"window":1024}.
std::string HeadPatternToJson(const HeadPattern& head);

// A head's pattern for a prompt of `num_tokens` whose budgets were chosen at `budget_tokens`
// (0: as they are): A-shape windows, block-sparse top-k and vertical-slash column and diagonal
// counts keep their fraction of the prompt (rounded, never below what the index always keeps),
// so the density the search measured holds at every length. Sinks and last_q stay.
HeadPattern PatternAtLength(const HeadPattern& pattern, int64_t num_tokens, int64_t budget_tokens);

// The index a head's pattern selects for this head's Q and K ([n][head_dim] rows with strides),
// with the blocks that keep nearly every tile keeping all (FillNearlyFullBlocks).
SparseIndex BuildIndex(const HeadPattern& pattern, const float* q, int64_t q_stride, const float* k,
                       int64_t k_stride, int64_t num_tokens, int64_t head_dim);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_SPARSE_PATTERN_CONFIG_H_
