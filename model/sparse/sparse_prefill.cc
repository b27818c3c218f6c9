#include "model/sparse/sparse_prefill.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status_macros.h"

namespace sparseaccel {
namespace {

// One KV head's rows of a paged layer view, gathered contiguous: [n][head_dim].
void GatherHead(const KvLayerView& kv, bool values, int64_t kv_head, int64_t head_dim, int64_t n,
                std::vector<float>* out) {
  out->resize(n * head_dim);
  for (int64_t p = 0; p < n; ++p) {
    const float* row = (values ? kv.VRow(p) : kv.KRow(p)) + kv_head * head_dim;
    std::copy(row, row + head_dim, out->data() + p * head_dim);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<SparsePrefillAttention>> SparsePrefillAttention::Create(
    const ModelConfig& model, SparseConfig config) {
  if (config.num_layers != model.num_hidden_layers ||
      config.num_heads != model.num_attention_heads) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sparse config is for ", config.num_layers, " layers x ", config.num_heads,
        " heads; the model has ", model.num_hidden_layers, " x ", model.num_attention_heads));
  }
  return std::unique_ptr<SparsePrefillAttention>(new SparsePrefillAttention(std::move(config)));
}

absl::StatusOr<bool> SparsePrefillAttention::Attend(int64_t layer, const float* q, int64_t n,
                                                    int64_t start_pos, const AttentionShape& shape,
                                                    const KvLayerView& kv, float* out) {
  if (start_pos != 0 || n < config_.dense_below_tokens) return false;
  const int64_t d = shape.head_dim, group = shape.num_heads / shape.num_kv_heads;
  const int64_t q_stride = shape.num_heads * d;
  std::vector<float> k_head, v_head;
  for (int64_t kv_head = 0; kv_head < shape.num_kv_heads; ++kv_head) {
    // K/V gathered once per KV head, shared by its query heads.
    GatherHead(kv, false, kv_head, d, n, &k_head);
    GatherHead(kv, true, kv_head, d, n, &v_head);
    for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
      const HeadPattern pattern =
          PatternAtLength(config_.heads[layer][h], n, config_.budget_tokens);
      SparseIndex index = BuildIndex(pattern, q + h * d, q_stride, k_head.data(), d, n, d);
      SparseAttentionCpu(q + h * d, q_stride, k_head.data(), v_head.data(), d, d, index,
                         out + h * d, q_stride);
      const double density = IndexDensity(index);
      absl::MutexLock lock(&mu_);
      density_sum_ += density;
      ++heads_run_;
      prompt_density_sum_ += density;
    }
  }
  if (layer + 1 == config_.num_layers) {
    // The prompt's mean over its layers and heads (prefills of this engine run one at a time).
    absl::MutexLock lock(&mu_);
    LogInfo(
        "sparse_prefill.prompt",
        {{"tokens", n}, {"density", prompt_density_sum_ / (config_.num_layers * shape.num_heads)}});
    prompt_density_sum_ = 0;
  }
  return true;
}

double SparsePrefillAttention::MeanDensity() const {
  absl::MutexLock lock(&mu_);
  return heads_run_ == 0 ? 1.0 : density_sum_ / heads_run_;
}

absl::StatusOr<bool> AttentionRecorder::Attend(int64_t layer, const float* q, int64_t n,
                                               int64_t start_pos, const AttentionShape& shape,
                                               const KvLayerView& kv, float* out) {
  (void)out;
  if (start_pos != 0) return false;
  const int64_t d = shape.head_dim, group = shape.num_heads / shape.num_kv_heads;
  if (static_cast<int64_t>(samples_.size()) <= layer) samples_.resize(layer + 1);
  samples_[layer].clear();
  for (int64_t h = 0; h < shape.num_heads; ++h) {
    HeadSample sample;
    sample.num_tokens = n;
    sample.q.resize(n * d);
    for (int64_t p = 0; p < n; ++p) {
      std::copy(q + (p * shape.num_heads + h) * d, q + (p * shape.num_heads + h + 1) * d,
                sample.q.data() + p * d);
    }
    GatherHead(kv, false, h / group, d, n, &sample.k);
    GatherHead(kv, true, h / group, d, n, &sample.v);
    samples_[layer].push_back(std::move(sample));
  }
  return false;
}

absl::StatusOr<int64_t> CheckSearchInputs(const std::vector<std::vector<int32_t>>& prompts,
                                          const SearchRule& rule, int64_t dense_below_tokens) {
  if (!(rule.target_density > 0 && rule.target_density <= 1)) {
    return absl::InvalidArgumentError("target density must be in (0, 1]");
  }
  if (!(rule.recall_floor >= 0 && rule.recall_floor <= 1)) {
    return absl::InvalidArgumentError("recall floor must be in [0, 1]");
  }
  if (dense_below_tokens < 0) return absl::InvalidArgumentError("dense_below_tokens < 0");
  if (prompts.empty()) return absl::InvalidArgumentError("no calibration prompts");
  int64_t n = 0;
  for (const std::vector<int32_t>& prompt : prompts) {
    if (prompt.empty()) return absl::InvalidArgumentError("empty calibration prompt");
    n = std::max<int64_t>(n, prompt.size());
  }
  return n;
}

ModelSearch CollectModelSearch(int64_t layers, int64_t heads, double target_density,
                               int64_t dense_below_tokens, int64_t num_prompts,
                               int64_t calibration_tokens,
                               const std::function<HeadChoice(int64_t, int64_t)>& choose) {
  ModelSearch search;
  search.config.num_layers = layers;
  search.config.num_heads = heads;
  search.config.dense_below_tokens = dense_below_tokens;
  search.config.target_density = target_density;
  search.config.calibration_prompts = num_prompts;
  search.config.calibration_tokens = calibration_tokens;
  search.config.budget_tokens = calibration_tokens;
  const double per_head = 1.0 / (layers * heads);
  for (int64_t l = 0; l < layers; ++l) {
    search.config.heads.emplace_back();
    search.choices.emplace_back();
    for (int64_t h = 0; h < heads; ++h) {
      HeadChoice choice = choose(l, h);
      search.config.heads.back().push_back(choice.pattern);
      search.mean.density += choice.fidelity.density * per_head;
      search.mean.tile_cost += choice.fidelity.tile_cost * per_head;
      search.mean.recall += choice.fidelity.recall * per_head;
      search.mean.relative_error += choice.fidelity.relative_error * per_head;
      search.mean.tail_recall += choice.fidelity.tail_recall * per_head;
      search.choices.back().push_back(std::move(choice));
    }
  }
  return search;
}

absl::StatusOr<ModelSearch> SearchModelPatterns(LlamaCpu* model,
                                                const std::vector<std::vector<int32_t>>& prompts,
                                                const SearchRule& rule,
                                                int64_t dense_below_tokens) {
  ASSIGN_OR_RETURN(const int64_t n, CheckSearchInputs(prompts, rule, dense_below_tokens));
  const ModelConfig& config = model->config();
  const int64_t layers = config.num_hidden_layers, heads = config.num_attention_heads;
  std::vector<std::vector<std::vector<HeadSample>>> samples(
      layers, std::vector<std::vector<HeadSample>>(heads));
  for (const std::vector<int32_t>& prompt : prompts) {
    AttentionRecorder recorder;
    model->SetAttentionOverride(&recorder);
    ContiguousKvStore kv(model->kv_shape(), prompt.size());
    std::vector<float> logits;
    absl::Status status =
        model->Forward({SequenceChunk{prompt, 0, &kv, LogitsFor::kNone}}, &logits);
    model->SetAttentionOverride(nullptr);
    if (!status.ok()) return status;
    std::vector<std::vector<HeadSample>> captured = recorder.TakeSamples();
    for (int64_t l = 0; l < layers; ++l) {
      for (int64_t h = 0; h < heads; ++h) samples[l][h].push_back(std::move(captured[l][h]));
    }
  }
  const std::vector<HeadPattern> candidates = CandidatePatterns(n);
  ModelSearch search = CollectModelSearch(
      layers, heads, rule.target_density, dense_below_tokens, static_cast<int64_t>(prompts.size()),
      n, [&](int64_t l, int64_t h) {
        HeadChoice choice = SearchHead(samples[l][h], config.head_dim, rule, candidates, n);
        samples[l][h].clear();  // Done with this head: free its Q/K/V.
        return choice;
      });
  search.candidates = candidates;
  return search;
}

}  // namespace sparseaccel
