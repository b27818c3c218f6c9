#include "model/pattern_search_cuda.h"

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
#include "model/safetensors.h"

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

// kRecallRows positions spread evenly over [0, n), the last row included.
std::vector<int64_t> RecallRows(int64_t n) {
  std::vector<int64_t> rows;
  for (int64_t i = 1; i <= kRecallRows; ++i) {
    const int64_t row = i * n / kRecallRows - 1;
    if (row >= 0 && (rows.empty() || row > rows.back())) rows.push_back(row);
  }
  return rows;
}

// Measures every candidate on every head of one layer of one prompt and adds fidelity / weight
// to sums[head][candidate].
class LayerMeasurer {
 public:
  LayerMeasurer(const ModelConfig& config, const std::vector<HeadPattern>& candidates)
      : config_(config), candidates_(candidates) {}

  absl::Status Measure(const LlamaCuda::DeviceLayerQkv& x, double weight,
                       std::vector<std::vector<Fidelity>>* sums) {
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
                       cuda::ToDevicePattern(candidates_[c]));
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
      // Per head: ||sparse - dense||^2 and ||dense||^2 over every row.
      std::vector<double> error(heads, 0), norm(heads, 0);
      for (int64_t p = 0; p < n; ++p) {
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t at = p * width + h * d;
          for (int64_t j = 0; j < d; ++j) {
            const double ref = reference[at + j];
            const double diff = Bf16ToFloat(bits[at + j]) - ref;
            error[h] += diff * diff;
            norm[h] += ref * ref;
          }
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        Fidelity& sum = (*sums)[h][c];
        sum.density += IndexDensity(host_index[h]) * weight;
        sum.tile_cost += IndexTileCost(host_index[h]) * weight;
        sum.recall += Recall(h, host_index[h]) * weight;
        sum.relative_error += std::sqrt(error[h] / std::max(norm[h], 1e-30)) * weight;
      }
    }
    return absl::OkStatus();
  }

 private:
  // Dense attention probabilities of the recall rows, per head, in double on the host.
  absl::Status ComputeRecallProbs(const LlamaCuda::DeviceLayerQkv& x) {
    const int64_t n = x.num_tokens, heads = config_.num_attention_heads;
    const int64_t kv_heads = config_.num_key_value_heads, d = config_.head_dim;
    rows_ = RecallRows(n);
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

  // Mean over the recall rows of the dense attention mass on the keys `index` selects.
  double Recall(int64_t head, const SparseIndex& index) const {
    double total = 0;
    for (size_t r = 0; r < rows_.size(); ++r) {
      const int64_t p = rows_[r];
      for (int64_t key : index.KeysOfBlock(p / kBlockSize)) {
        if (key <= p) total += probs_[head][r][key];
      }
    }
    return rows_.empty() ? 0 : total / rows_.size();
  }

  const ModelConfig& config_;
  const std::vector<HeadPattern>& candidates_;
  DeviceBuffer dense_out_, sparse_out_, workspace_;
  std::vector<int64_t> rows_;
  std::vector<std::vector<std::vector<double>>> probs_;  // [head][recall row][key]
};

}  // namespace

absl::StatusOr<ModelSearch> SearchModelPatternsCuda(
    LlamaCuda* model, const std::vector<std::vector<int32_t>>& prompts, double target_density,
    int64_t dense_below_tokens) {
  ASSIGN_OR_RETURN(const int64_t n, CheckSearchInputs(prompts, target_density, dense_below_tokens));
  const ModelConfig& config = model->config();
  const int64_t layers = config.num_hidden_layers, heads = config.num_attention_heads;
  const std::vector<HeadPattern> candidates = CandidatePatterns(n);
  // sums[layer][head][candidate]: fidelity averaged over the prompts.
  std::vector<std::vector<std::vector<Fidelity>>> sums(
      layers, std::vector<std::vector<Fidelity>>(heads, std::vector<Fidelity>(candidates.size())));
  LayerMeasurer measurer(config, candidates);
  const double weight = 1.0 / prompts.size();
  // Below a target of 1 every head is measured; at 1 the choice is dense whatever they measure.
  for (const std::vector<int32_t>& prompt : target_density < 1 ? prompts : decltype(prompts){}) {
    RETURN_IF_ERROR(
        model->ObservePrefill(prompt, [&](const LlamaCuda::DeviceLayerQkv& x) -> absl::Status {
          return measurer.Measure(x, weight, &sums[x.layer]);
        }));
  }
  return CollectModelSearch(layers, heads, target_density, dense_below_tokens,
                            static_cast<int64_t>(prompts.size()), n, [&](int64_t l, int64_t h) {
                              return ChooseCandidate(candidates, sums[l][h], target_density);
                            });
}

}  // namespace sparseaccel
