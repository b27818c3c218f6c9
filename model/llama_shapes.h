#ifndef SPARSEACCEL_MODEL_LLAMA_SHAPES_H_
#define SPARSEACCEL_MODEL_LLAMA_SHAPES_H_

// What both engines derive from a ModelConfig the same way: the RoPE inverse frequencies, and
// the slice of each layer one tensor-parallel shard holds.

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "model/checkpoint/config.h"

namespace sparseaccel {

// RopeInverseFrequencies for the config's head_dim, rope_theta and rope_scaling.
std::vector<float> RopeInverseFrequenciesOf(const ModelConfig& config);

// Shard `rank` of `count` (Megatron-style tensor parallelism): query heads [first_head,
// first_head + heads) with their KV heads, the same slice of the MLP's intermediate rows, and
// the matching columns of o_proj and down_proj, whose partial outputs the shards sum; and the
// vocabulary rows [first_vocab, first_vocab + vocab) of the embedding and the LM head (the
// CUDA engine's: ceil(vocab_size / count) rows a shard, fewer on the last).
struct TensorParallelShard {
  int64_t rank = 0;
  int64_t count = 1;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t intermediate = 0;
  int64_t first_vocab = 0;
  int64_t vocab = 0;

  int64_t first_head() const { return rank * heads; }
  int64_t first_kv_head() const { return rank * kv_heads; }
  int64_t first_intermediate() const { return rank * intermediate; }
};

// InvalidArgument unless count >= 1 divides the heads, the KV heads and intermediate_size and
// 0 <= rank < count.
absl::StatusOr<TensorParallelShard> ShardOfModel(const ModelConfig& config, int64_t rank,
                                                 int64_t count);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_LLAMA_SHAPES_H_
