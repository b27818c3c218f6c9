#include "model/llama_shapes.h"

#include <cmath>

#include "gtest/gtest.h"

namespace sparseaccel {
namespace {

ModelConfig EightBShape() {
  ModelConfig c;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.rope_theta = 500000.0;
  c.vocab_size = 128257;  // Not a multiple of any count: the last shard takes fewer rows.
  return c;
}

TEST(LlamaShapesTest, ShardsPartitionHeadsKvHeadsAndIntermediateRows) {
  const ModelConfig c = EightBShape();
  for (int64_t count : {1, 2, 4, 8}) {
    int64_t next_head = 0, next_kv_head = 0, next_row = 0, next_vocab = 0;
    for (int64_t rank = 0; rank < count; ++rank) {
      absl::StatusOr<TensorParallelShard> shard = ShardOfModel(c, rank, count);
      ASSERT_TRUE(shard.ok()) << shard.status();
      EXPECT_EQ(shard->first_head(), next_head);
      EXPECT_EQ(shard->first_kv_head(), next_kv_head);
      EXPECT_EQ(shard->first_intermediate(), next_row);
      EXPECT_EQ(shard->first_vocab, next_vocab);
      EXPECT_GT(shard->vocab, 0);
      // Each shard keeps whole GQA groups: its query heads read only its own KV heads.
      EXPECT_EQ(shard->heads / shard->kv_heads, c.QueryHeadsPerKvHead());
      next_head += shard->heads;
      next_kv_head += shard->kv_heads;
      next_row += shard->intermediate;
      next_vocab += shard->vocab;
    }
    EXPECT_EQ(next_head, c.num_attention_heads) << count;
    EXPECT_EQ(next_kv_head, c.num_key_value_heads) << count;
    EXPECT_EQ(next_row, c.intermediate_size) << count;
    EXPECT_EQ(next_vocab, c.vocab_size) << count;
  }
}

TEST(LlamaShapesTest, CountsThatDoNotDivideTheModelAreRefused) {
  const ModelConfig c = EightBShape();
  for (int64_t count : {0, -1, 3, 16}) {
    EXPECT_EQ(ShardOfModel(c, 0, count).status().code(), absl::StatusCode::kInvalidArgument)
        << count;
  }
  EXPECT_EQ(ShardOfModel(c, 2, 2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ShardOfModel(c, -1, 2).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LlamaShapesTest, RopeFrequenciesFollowTheConfigScaling) {
  ModelConfig c = EightBShape();
  const std::vector<float> plain = RopeInverseFrequenciesOf(c);
  ASSERT_EQ(plain.size(), 64u);
  EXPECT_FLOAT_EQ(plain[0], 1.0f);
  EXPECT_NEAR(plain[1], std::pow(500000.0, -2.0 / 128), 1e-7);
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8.0;
  const std::vector<float> scaled = RopeInverseFrequenciesOf(c);
  // High frequencies are kept, the lowest are divided by the factor.
  EXPECT_FLOAT_EQ(scaled[0], plain[0]);
  EXPECT_NEAR(scaled.back(), plain.back() / 8.0f, 1e-12);
}

}  // namespace
}  // namespace sparseaccel
