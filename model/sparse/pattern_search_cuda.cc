#include "model/sparse/pattern_search_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/sparse_attention.h"
#include "kernels/sparse/pattern_search.h"
#include "model/checkpoint/safetensors.h"

namespace sparseaccel {
namespace {

using cuda::DeviceBuffer;

// Grows `buffer` to at least `bytes` (contents not kept).
absl::Status Ensure(DeviceBuffer* buffer, size_t bytes) {
  if (buffer->bytes() >= bytes) return absl::OkStatus();
  *buffer = DeviceBuffer();
  ASSIGN_OR_RETURN(*buffer, DeviceBuffer::Allocate(bytes));
  return absl::OkStatus();
}

std::vector<float> Bf16RowsToFloat(const std::vector<uint16_t>& bits) {
  std::vector<float> out(bits.size());
  std::transform(bits.begin(), bits.end(), out.begin(), Bf16ToFloat);
  return out;
}

// The rows whose dense attention the recall is measured on: kRecallRows positions spread
// evenly over [0, n) (the last row included), which `recall` averages, and the last
// kTailQueries rows, which `tail_recall` averages. Ascending, no repeats.
struct RecallRowSet {
  std::vector<int64_t> rows;
  std::vector<bool> spread;  // Whether rows[r] is one of the evenly spread ones.
};

RecallRowSet RecallRows(int64_t n) {
  std::vector<int64_t> spread, all;
  for (int64_t i = 1; i <= kRecallRows; ++i) {
    const int64_t row = i * n / kRecallRows - 1;
    if (row >= 0 && (spread.empty() || row > spread.back())) spread.push_back(row);
  }
  for (int64_t row = std::max<int64_t>(0, n - kTailQueries); row < n; ++row) all.push_back(row);
  all.insert(all.end(), spread.begin(), spread.end());
  std::sort(all.begin(), all.end());
  all.erase(std::unique(all.begin(), all.end()), all.end());
  RecallRowSet set{all, std::vector<bool>(all.size())};
  for (size_t r = 0; r < all.size(); ++r) {
    set.spread[r] = std::binary_search(spread.begin(), spread.end(), all[r]);
  }
  return set;
}

// Measures every candidate on every head of one layer of one prompt and folds the fidelity
// into worst[head][candidate] (WorstOf).
class LayerMeasurer {
 public:
  LayerMeasurer(const ModelConfig& config, const std::vector<HeadPattern>& candidates,
                int64_t budget_tokens)
      : config_(config), candidates_(candidates), budget_tokens_(budget_tokens) {}

  absl::Status Measure(const LlamaCuda::DeviceLayerQkv& x,
                       std::vector<std::vector<Fidelity>>* worst) {
    const int64_t n = x.num_tokens, heads = config_.num_attention_heads;
    const int64_t kv_heads = config_.num_key_value_heads, d = config_.head_dim;
    const int64_t width = heads * d;
    const size_t out_bytes = static_cast<size_t>(n * width) * 2;
    RETURN_IF_ERROR(Ensure(&dense_out_, out_bytes));
    RETURN_IF_ERROR(Ensure(&sparse_out_, out_bytes));

    // The layer's Q, K, V, written to dense_out_ for the reference and to sparse_out_ for each
    // candidate.
    cuda::AttentionOperands operands;
    operands.q = x.q;
    operands.q_stride = x.q_stride;
    operands.k = x.k;
    operands.v = x.v;
    operands.kv_stride = x.kv_stride;
    operands.out = dense_out_.As<uint16_t>();
    operands.out_stride = width;
    operands.num_heads = heads;
    operands.num_kv_heads = kv_heads;
    operands.head_dim = d;
    cuda::PrefillAttentionArgs dense{operands, n, n};
    RETURN_IF_ERROR(cuda::PrefillAttention(dense, x.stream));
    RETURN_IF_ERROR(cuda::DeviceSynchronize());
    std::vector<uint16_t> bits(n * width);
    RETURN_IF_ERROR(dense_out_.CopyTo(bits.data(), out_bytes));
    const std::vector<float> reference = Bf16RowsToFloat(bits);
    RETURN_IF_ERROR(ComputeRecallProbs(x));

    for (size_t c = 0; c < candidates_.size(); ++c) {
      ASSIGN_OR_RETURN(const cuda::DeviceHeadPattern pattern,
                       cuda::ToDevicePattern(PatternAtLength(candidates_[c], n, budget_tokens_)));
      const std::vector<cuda::DeviceHeadPattern> host_patterns(heads, pattern);
      ASSIGN_OR_RETURN(DeviceBuffer device_patterns, cuda::ToDevice(host_patterns));
      cuda::SparseIndexArgs index_args;
      index_args.q = x.q;
      index_args.q_stride = x.q_stride;
      index_args.k = x.k;
      index_args.k_stride = x.kv_stride;
      index_args.num_tokens = n;
      index_args.num_heads = heads;
      index_args.num_kv_heads = kv_heads;
      index_args.head_dim = d;
      index_args.patterns = device_patterns.As<cuda::DeviceHeadPattern>();
      index_args.host_patterns = &host_patterns;
      const size_t workspace_bytes = cuda::SparseIndexWorkspaceBytes(index_args);
      RETURN_IF_ERROR(Ensure(&workspace_, workspace_bytes));
      cuda::DeviceSparseIndex index;
      RETURN_IF_ERROR(cuda::BuildSparseIndex(index_args, workspace_.As<void>(), workspace_.bytes(),
                                             &index, x.stream));
      cuda::SparseAttentionArgs attend{operands, 0, index.num_query_blocks, index};
      attend.operands.out = sparse_out_.As<uint16_t>();
      RETURN_IF_ERROR(cuda::SparseAttention(attend, x.stream));
      ASSIGN_OR_RETURN(const std::vector<SparseIndex> host_index,
                       cuda::CopyIndexToHost(index, x.stream));
      RETURN_IF_ERROR(cuda::DeviceSynchronize());
      RETURN_IF_ERROR(sparse_out_.CopyTo(bits.data(), out_bytes));
      // Per head: ||sparse - dense||^2 and ||dense||^2 over every row and over the last
      // kTailQueries.
      std::vector<double> error(heads, 0), norm(heads, 0), tail_error(heads, 0),
          tail_norm(heads, 0);
      for (int64_t p = 0; p < n; ++p) {
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t at = p * width + h * d;
          double row_error = 0, row_norm = 0;
          for (int64_t j = 0; j < d; ++j) {
            const double ref = reference[at + j];
            const double diff = Bf16ToFloat(bits[at + j]) - ref;
            row_error += diff * diff;
            row_norm += ref * ref;
          }
          error[h] += row_error;
          norm[h] += row_norm;
          if (p >= n - kTailQueries) {
            tail_error[h] += row_error;
            tail_norm[h] += row_norm;
          }
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        const auto [recall, tail_recall] = Recall(h, host_index[h], n);
        const Fidelity f{IndexDensity(host_index[h]),
                         IndexTileCost(host_index[h]),
                         recall,
                         std::sqrt(error[h] / std::max(norm[h], 1e-30)),
                         tail_recall,
                         std::sqrt(tail_error[h] / std::max(tail_norm[h], 1e-30))};
        (*worst)[h][c] = WorstOf((*worst)[h][c], AtBudgetLength(f, n, budget_tokens_));
      }
    }
    return absl::OkStatus();
  }

 private:
  // Dense attention probabilities of the recall rows, per head, in double on the host.
  absl::Status ComputeRecallProbs(const LlamaCuda::DeviceLayerQkv& x) {
    const int64_t n = x.num_tokens, heads = config_.num_attention_heads;
    const int64_t kv_heads = config_.num_key_value_heads, d = config_.head_dim;
    const RecallRowSet set = RecallRows(n);
    rows_ = set.rows;
    spread_ = set.spread;
    std::vector<uint16_t> k_bits(n * x.kv_stride);
    RETURN_IF_ERROR(cuda::CopyDeviceToHost(x.k, k_bits.data(), k_bits.size() * 2));
    const std::vector<float> k = Bf16RowsToFloat(k_bits);
    std::vector<uint16_t> q_bits(heads * d);
    probs_.assign(heads, std::vector<std::vector<double>>(rows_.size()));
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    for (size_t r = 0; r < rows_.size(); ++r) {
      const int64_t p = rows_[r];
      RETURN_IF_ERROR(
          cuda::CopyDeviceToHost(x.q + p * x.q_stride, q_bits.data(), q_bits.size() * 2));
      const std::vector<float> q = Bf16RowsToFloat(q_bits);
      for (int64_t h = 0; h < heads; ++h) {
        const float* qh = &q[h * d];
        const int64_t kv_head = h / (heads / kv_heads);
        std::vector<double>& row = probs_[h][r];
        row.resize(p + 1);
        double max_score = -INFINITY;
        for (int64_t j = 0; j <= p; ++j) {
          const float* kj = &k[j * x.kv_stride + kv_head * d];
          double dot = 0;
          for (int64_t i = 0; i < d; ++i) dot += static_cast<double>(qh[i]) * kj[i];
          row[j] = dot * scale;
          max_score = std::max(max_score, row[j]);
        }
        double total = 0;
        for (double& s : row) total += (s = std::exp(s - max_score));
        for (double& s : row) s /= total;
      }
    }
    return absl::OkStatus();
  }

  // The dense attention mass on the keys `index` selects: mean over the recall rows, and over
  // those among the last kTailQueries.
  std::pair<double, double> Recall(int64_t head, const SparseIndex& index, int64_t n) const {
    double total = 0, tail = 0;
    int64_t spread_rows = 0, tail_rows = 0;
    for (size_t r = 0; r < rows_.size(); ++r) {
      const int64_t p = rows_[r];
      double mass = 0;
      for (int64_t key : index.KeysOfBlock(p / kBlockSize)) {
        if (key <= p) mass += probs_[head][r][key];
      }
      if (spread_[r]) {
        total += mass;
        ++spread_rows;
      }
      if (p >= n - kTailQueries) {
        tail += mass;
        ++tail_rows;
      }
    }
    return {spread_rows == 0 ? 0 : total / spread_rows, tail_rows == 0 ? 0 : tail / tail_rows};
  }

  const ModelConfig& config_;
  const std::vector<HeadPattern>& candidates_;
  const int64_t budget_tokens_;
  DeviceBuffer dense_out_, sparse_out_, workspace_;
  std::vector<int64_t> rows_;
  std::vector<bool> spread_;
  std::vector<std::vector<std::vector<double>>> probs_;  // [head][recall row][key]
};

}  // namespace

absl::StatusOr<ModelSearch> SearchModelPatternsCuda(
    LlamaCuda* model, const std::vector<std::vector<int32_t>>& prompts, const SearchRule& rule,
    int64_t dense_below_tokens) {
  ASSIGN_OR_RETURN(const int64_t n, CheckSearchInputs(prompts, rule, dense_below_tokens));
  const ModelConfig& config = model->config();
  const int64_t layers = config.num_hidden_layers, heads = config.num_attention_heads;
  const std::vector<HeadPattern> candidates = CandidatePatterns(n);
  // worst[layer][head][candidate]: the worst fidelity over the prompts.
  std::vector<std::vector<std::vector<Fidelity>>> worst(
      layers, std::vector<std::vector<Fidelity>>(
                  heads, std::vector<Fidelity>(candidates.size(), kNoSamples)));
  LayerMeasurer measurer(config, candidates, n);
  // Below a target of 1 every head is measured; at 1 the choice is dense whatever they measure.
  for (const std::vector<int32_t>& prompt :
       rule.target_density < 1 ? prompts : decltype(prompts){}) {
    RETURN_IF_ERROR(
        model->ObservePrefill(prompt, [&](const LlamaCuda::DeviceLayerQkv& x) -> absl::Status {
          return measurer.Measure(x, &worst[x.layer]);
        }));
  }
  ModelSearch search =
      CollectModelSearch(layers, heads, rule.target_density, dense_below_tokens,
                         static_cast<int64_t>(prompts.size()), n, [&](int64_t l, int64_t h) {
                           HeadChoice choice = ChooseCandidate(candidates, worst[l][h], rule);
                           choice.measured = std::move(worst[l][h]);
                           return choice;
                         });
  search.candidates = candidates;
  return search;
}

}  // namespace sparseaccel
