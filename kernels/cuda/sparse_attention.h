#ifndef SPARSEACCEL_KERNELS_CUDA_SPARSE_ATTENTION_H_
#define SPARSEACCEL_KERNELS_CUDA_SPARSE_ATTENTION_H_

// Dynamic sparse prefill attention on the GPU, the twin of kernels/sparse/sparse_index.h: for
// one layer, BuildSparseIndex estimates every head's pattern from the prompt's actual Q and K
// and writes each query block's key ranges and columns; SparseAttention then computes exactly
// those (query, key) pairs with the dense kernel's tensor-core inner loop (flash_tile.cuh).
// Every head of the layer runs in the same launches, with its own pattern (dense heads too);
// nothing waits on the host, so a layer's sequence can be captured in a CUDA graph.
//
// Same conventions as cuda_kernels.h: bf16 as uint16_t bits, streams as void*, strides in
// elements, asynchronous launches returning a status.
//
// The selection is the CPU reference's (same budgets, forced sinks and local diagonals,
// Algorithm-2 conversion, ties to the smaller index), computed in fp32 instead of double: when
// two candidates' scores differ by less than fp32 rounding, the two sides may keep different
// ones. See docs/sparse_attention.md.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/host_device.h"
#include "kernels/cuda/attention_operands.h"
#include "kernels/sparse/pattern_config.h"
#include "kernels/sparse/sparse_index.h"

namespace sparseaccel {
namespace cuda {

// A head's pattern as the kernels read it (a device array of these per layer).
struct DeviceHeadPattern {
  int32_t kind = 0;           // HeadPattern::Kind.
  int32_t sink_blocks = 0;    // A-shape: leading key blocks kept.
  int32_t window_blocks = 0;  // A-shape: key blocks up to the query's kept (>= 1).
  int32_t vertical = 0;       // Vertical-slash: columns kept (>= 4).
  int32_t slash = 0;          // Vertical-slash: diagonals kept (>= 64).
  int32_t last_q = 0;         // Vertical-slash: estimating queries (1 .. 64).
  int32_t top_k = 0;          // Block-sparse: key blocks per query block (>= 1).
};

// The device form of a head's pattern (budgets clamped as the CPU reference clamps them).
// InvalidArgument for a last_q above 64 or negative budgets.
absl::StatusOr<DeviceHeadPattern> ToDevicePattern(const HeadPattern& pattern);

// One layer's index on the device, for `num_heads` heads and `num_tokens` prompt tokens in
// query blocks of kBlockSize (64). Key ranges are 64 keys from range_start; block b of head h
// keeps its ranges at range_start[h * RangeSlotsPerHead() + b * (b + 1) / 2 + i] for i <
// range_count[h * num_query_blocks + b] (at most b + 1 ranges: they do not overlap and start
// before the block ends), ascending. Columns at column_index[(h * num_query_blocks + b) *
// max_columns + i], ascending, none inside a range. All pointers are device memory inside the
// workspace given to BuildSparseIndex.
struct DeviceSparseIndex {
  int64_t num_heads = 0;
  int64_t num_tokens = 0;
  int64_t num_query_blocks = 0;
  int64_t max_columns = 0;
  int32_t* range_count = nullptr;
  int32_t* range_start = nullptr;
  int32_t* column_count = nullptr;
  int32_t* column_index = nullptr;
  // The attention kernel runs query blocks 2c and 2c + 1 (a pair) in one thread block. Per
  // [num_heads][(num_query_blocks + 1) / 2] pair: how many distinct range starts the two have,
  // and the union of their columns (a column both keep is loaded once): pair_column_count
  // entries at pair_columns + (h * pairs + c) * PairColumnSlots(), ascending, each a key with
  // kFirstBlockColumn / kSecondBlockColumn set for the blocks that keep it. For every span of
  // kColumnFlagSpan entries, pair_column_flags (at (h * pairs + c) * PairColumnFlagSlots())
  // has bit i set if block i keeps every entry of the span, bit 2 + i if it keeps some.
  // The union of the two blocks' range starts, ascending, each with kFirstBlockColumn /
  // kSecondBlockColumn set for the blocks that select it: pair_range_count entries at
  // pair_ranges + h * PairRangeSlotsPerHead() + PairRangeOffset(c).
  int32_t* pair_range_count = nullptr;
  uint32_t* pair_ranges = nullptr;
  int32_t* pair_column_count = nullptr;
  uint32_t* pair_columns = nullptr;
  uint8_t* pair_column_flags = nullptr;
  static constexpr uint32_t kFirstBlockColumn = 1u << 30;
  static constexpr uint32_t kSecondBlockColumn = 1u << 31;
  static constexpr uint32_t kColumnKeyMask = kFirstBlockColumn - 1;
  static constexpr int kColumnFlagSpan = 32;

  SPARSEACCEL_HOST_DEVICE int64_t RangeSlotsPerHead() const {
    return num_query_blocks * (num_query_blocks + 1) / 2;
  }
  SPARSEACCEL_HOST_DEVICE int64_t NumPairs() const { return (num_query_blocks + 1) / 2; }
  // Pair c has at most (2c + 1) + (2c + 2) distinct starts; pairs 0 .. c - 1 take 2c^2 + c.
  SPARSEACCEL_HOST_DEVICE static int64_t PairRangeOffset(int64_t pair) {
    return 2 * pair * pair + pair;
  }
  SPARSEACCEL_HOST_DEVICE int64_t PairRangeSlotsPerHead() const {
    return PairRangeOffset(NumPairs());
  }
  SPARSEACCEL_HOST_DEVICE int64_t PairColumnSlots() const { return 2 * max_columns; }
  SPARSEACCEL_HOST_DEVICE int64_t PairColumnFlagSlots() const {
    return (PairColumnSlots() + kColumnFlagSpan - 1) / kColumnFlagSpan;
  }
};

struct SparseIndexArgs {
  const uint16_t* q = nullptr;  // [num_tokens] rows of [num_heads][head_dim] at q_stride.
  int64_t q_stride = 0;
  const uint16_t* k = nullptr;  // [num_tokens] rows of [num_kv_heads][head_dim] at k_stride.
  int64_t k_stride = 0;
  int64_t num_tokens = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // 64 or 128.
  // Device array [num_heads]; `host_patterns` is the same on the host (sizes the work).
  const DeviceHeadPattern* patterns = nullptr;
  const std::vector<DeviceHeadPattern>* host_patterns = nullptr;
};

// Device bytes BuildSparseIndex needs for these args (the index itself and the estimation's
// scratch); grows as num_heads x num_tokens^2 / 8192 for the ranges.
size_t SparseIndexWorkspaceBytes(const SparseIndexArgs& args);

// Builds every head's index into `workspace` (at least SparseIndexWorkspaceBytes) and
// describes it in `index` (pointers into the workspace, valid until the workspace is reused).
absl::Status BuildSparseIndex(const SparseIndexArgs& args, void* workspace, size_t workspace_bytes,
                              DeviceSparseIndex* index, void* stream);

// Attention over the pairs an index selects, for query blocks [first_query_block,
// first_query_block + num_query_blocks) of the prompt. Query head h reads KV head
// h / (num_heads / num_kv_heads) and its own index; the query at position p sees the selected
// keys <= p. Scale 1/sqrt(head_dim).
struct SparseAttentionArgs {
  // Q rows of the whole prompt (row p: position p), K/V rows 0..num_tokens-1 of the index;
  // output row r is position first_query_block * 64 + r.
  AttentionOperands operands;
  int64_t first_query_block = 0;
  int64_t num_query_blocks = 0;
  DeviceSparseIndex index;
};

absl::Status SparseAttention(const SparseAttentionArgs& args, void* stream);

// The device index as the CPU reference's per-head SparseIndex (for tests and reports).
absl::StatusOr<std::vector<SparseIndex>> CopyIndexToHost(const DeviceSparseIndex& index,
                                                         void* stream);

}  // namespace cuda
}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_CUDA_SPARSE_ATTENTION_H_
