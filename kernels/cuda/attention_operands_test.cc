#include "kernels/cuda/attention_operands.h"

#include <functional>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace sparseaccel {
namespace cuda {
namespace {

// Host buffers stand in for device memory: the checks only look at shapes and addresses.
alignas(16) uint16_t buffer[4][64];

AttentionOperands Valid() {
  AttentionOperands x;
  x.q = buffer[0];
  x.k = buffer[1];
  x.v = buffer[2];
  x.out = buffer[3];
  x.num_heads = 32;
  x.num_kv_heads = 8;
  x.head_dim = 128;
  x.q_stride = 32 * 128 + 3 * 8 * 128;  // Q inside fused QKV rows.
  x.kv_stride = 8 * 128;
  x.out_stride = 32 * 128;
  return x;
}

TEST(AttentionOperandsTest, AcceptsValidOperands) {
  EXPECT_TRUE(CheckAttentionOperands(Valid(), "Kernel").ok());
  AttentionOperands x = Valid();
  x.head_dim = 64;
  EXPECT_TRUE(CheckAttentionOperands(x, "Kernel").ok());
}

TEST(AttentionOperandsTest, RejectsEachBadField) {
  const std::vector<std::pair<std::string, std::function<void(AttentionOperands&)>>> breaks = {
      {"head_dim 96", [](AttentionOperands& x) { x.head_dim = 96; }},
      {"no heads", [](AttentionOperands& x) { x.num_heads = 0; }},
      {"no kv heads", [](AttentionOperands& x) { x.num_kv_heads = 0; }},
      {"heads not a multiple", [](AttentionOperands& x) { x.num_kv_heads = 5; }},
      {"too many heads",
       [](AttentionOperands& x) {
         x.num_heads = 65536;
         x.num_kv_heads = 1;
         x.q_stride = x.out_stride = 65536 * 128;
       }},
      {"q_stride short", [](AttentionOperands& x) { x.q_stride = 32 * 128 - 8; }},
      {"kv_stride short", [](AttentionOperands& x) { x.kv_stride = 8 * 128 - 8; }},
      {"out_stride short", [](AttentionOperands& x) { x.out_stride = 32 * 128 - 8; }},
      {"q_stride odd", [](AttentionOperands& x) { x.q_stride += 4; }},
      {"kv_stride odd", [](AttentionOperands& x) { x.kv_stride += 4; }},
      {"out_stride odd", [](AttentionOperands& x) { x.out_stride += 4; }},
      {"q misaligned", [](AttentionOperands& x) { x.q = buffer[0] + 1; }},
      {"k misaligned", [](AttentionOperands& x) { x.k = buffer[1] + 4; }},
      {"v misaligned", [](AttentionOperands& x) { x.v = buffer[2] + 2; }},
      {"out misaligned", [](AttentionOperands& x) { x.out = buffer[3] + 1; }},
  };
  for (const auto& [what, apply] : breaks) {
    AttentionOperands x = Valid();
    apply(x);
    const absl::Status status = CheckAttentionOperands(x, "SomeKernel");
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_EQ(status.message().substr(0, 11), "SomeKernel:") << what << ": " << status;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace sparseaccel
