#ifndef SPARSEACCEL_MODEL_SPARSE_SPARSE_PREFILL_H_
#define SPARSEACCEL_MODEL_SPARSE_SPARSE_PREFILL_H_

// Dynamic sparse attention in the CPU engine's prefill: each head runs its configured pattern
// at the prompt's length (PatternAtLength), building its index from the head's actual Q and K;
// prompts shorter than the config's dense_below_tokens, decode steps and continued chunks run
// dense. Each sparse prompt logs its mean density (`sparse_prefill.prompt`).

#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/sparse/pattern_config.h"
#include "kernels/sparse/pattern_search.h"
#include "model/llama_cpu.h"

namespace sparseaccel {

class SparsePrefillAttention : public AttentionOverride {
 public:
  // InvalidArgument unless the config's layers and heads match the model.
  static absl::StatusOr<std::unique_ptr<SparsePrefillAttention>> Create(const ModelConfig& model,
                                                                        SparseConfig config);

  absl::StatusOr<bool> Attend(int64_t layer, const float* q, int64_t n, int64_t start_pos,
                              const AttentionShape& shape, const KvLayerView& kv,
                              float* out) override;

  // Mean density of the sparse heads run so far (for logs and reports).
  double MeanDensity() const;

 private:
  explicit SparsePrefillAttention(SparseConfig config) : config_(std::move(config)) {}
  SparseConfig config_;
  mutable absl::Mutex mu_;
  int64_t heads_run_ ABSL_GUARDED_BY(mu_) = 0;
  double density_sum_ ABSL_GUARDED_BY(mu_) = 0;
  double prompt_density_sum_ ABSL_GUARDED_BY(mu_) = 0;  // Of the prompt being prefilled.
};

// Captures every layer's prompt Q, K and V per head (for the pattern search) and lets the
// dense path run.
class AttentionRecorder : public AttentionOverride {
 public:
  absl::StatusOr<bool> Attend(int64_t layer, const float* q, int64_t n, int64_t start_pos,
                              const AttentionShape& shape, const KvLayerView& kv,
                              float* out) override;
  // samples()[layer][head]: Q of that head, K and V of its KV head, [n][head_dim] each.
  std::vector<std::vector<HeadSample>> TakeSamples() { return std::move(samples_); }

 private:
  std::vector<std::vector<HeadSample>> samples_;
};

// The pattern search over a whole model (Algorithm 1 for every layer and head): each
// calibration prompt's prefill runs dense with an AttentionRecorder installed, then every head
// is searched on its samples with candidates sized for the longest prompt (the config's
// budget_tokens; shorter prompts run them at PatternAtLength). Holds all layers' Q/K/V of all
// prompts in memory (3 x prompts x tokens x heads x head_dim floats per layer).
struct ModelSearch {
  SparseConfig config;                           // calibration_seed left to the caller.
  std::vector<std::vector<HeadChoice>> choices;  // [layer][head]
  std::vector<HeadPattern> candidates;           // What each choice's `measured` is of.
  Fidelity mean;                                 // Over all heads.
};

absl::StatusOr<ModelSearch> SearchModelPatterns(LlamaCpu* model,
                                                const std::vector<std::vector<int32_t>>& prompts,
                                                const SearchRule& rule, int64_t dense_below_tokens);

// Shared by the model searches of both engines. The length of the longest prompt, or
// InvalidArgument for a target outside (0, 1], a recall floor outside [0, 1], a negative
// dense_below_tokens, or no or empty prompts.
absl::StatusOr<int64_t> CheckSearchInputs(const std::vector<std::vector<int32_t>>& prompts,
                                          const SearchRule& rule, int64_t dense_below_tokens);
// The search result of a layers x heads model from each head's choice: choose(layer, head) is
// called once per head, layer by layer. The config's budgets are for calibration_tokens.
ModelSearch CollectModelSearch(int64_t layers, int64_t heads, double target_density,
                               int64_t dense_below_tokens, int64_t num_prompts,
                               int64_t calibration_tokens,
                               const std::function<HeadChoice(int64_t, int64_t)>& choose);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_SPARSE_SPARSE_PREFILL_H_
