#include "model/sparse_prefill.h"

#include "absl/strings/str_cat.h"

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
      const HeadPattern& pattern = config_.heads[layer][h];
      SparseIndex index = BuildIndex(pattern, q + h * d, q_stride, k_head.data(), d, n, d);
      SparseAttentionCpu(q + h * d, q_stride, k_head.data(), d, v_head.data(), d, d, index,
                         out + h * d, q_stride);
      const double density = IndexDensity(index);
      absl::MutexLock lock(&mu_);
      density_sum_ += density;
      ++heads_run_;
    }
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

}  // namespace sparseaccel
