#include "model/llama_shapes.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/rope.h"

namespace sparseaccel {

std::vector<float> RopeInverseFrequenciesOf(const ModelConfig& config) {
  const RopeScaling& rope = config.rope_scaling;
  Llama3RopeScaling scaling;
  scaling.enabled = rope.type == RopeScaling::Type::kLlama3;
  scaling.factor = rope.factor;
  scaling.low_freq_factor = rope.low_freq_factor;
  scaling.high_freq_factor = rope.high_freq_factor;
  scaling.original_max_positions = static_cast<double>(rope.original_max_position_embeddings);
  return RopeInverseFrequencies(config.head_dim, config.rope_theta, scaling);
}

absl::StatusOr<TensorParallelShard> ShardOfModel(const ModelConfig& config, int64_t rank,
                                                 int64_t count) {
  const ModelConfig& c = config;
  if (count < 1 || c.num_attention_heads % count != 0 || c.num_key_value_heads % count != 0 ||
      c.intermediate_size % count != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor parallel ", count, " must divide the heads (", c.num_attention_heads,
                     "), KV heads (", c.num_key_value_heads, ") and intermediate_size (",
                     c.intermediate_size, ")"));
  }
  const int64_t vocab_rows = (c.vocab_size + count - 1) / count;
  if ((count - 1) * vocab_rows >= c.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor parallel ", count, " leaves a shard without vocabulary rows (", c.vocab_size, ")"));
  }
  if (rank < 0 || rank >= count) {
    return absl::InvalidArgumentError(absl::StrCat("shard ", rank, " of ", count));
  }
  TensorParallelShard shard;
  shard.rank = rank;
  shard.count = count;
  shard.heads = c.num_attention_heads / count;
  shard.kv_heads = c.num_key_value_heads / count;
  shard.intermediate = c.intermediate_size / count;
  shard.first_vocab = std::min(c.vocab_size, rank * vocab_rows);
  shard.vocab = std::min(c.vocab_size, shard.first_vocab + vocab_rows) - shard.first_vocab;
  return shard;
}

}  // namespace sparseaccel
