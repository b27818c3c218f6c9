#ifndef SPARSEACCEL_KERNELS_SPARSE_SPARSE_INDEX_H_
#define SPARSEACCEL_KERNELS_SPARSE_SPARSE_INDEX_H_

// Dynamic sparse attention for one head of a prompt, on the CPU: the three patterns of
// SparseAccelerate / MInference build a SparseIndex from the head's actual Q and K, and
// SparseAttentionCpu computes exactly the (query, key) pairs the index selects. This is the
// reference for the GPU kernels: they must select the same indices and match the outputs within
// rounding.
//
// Index format (flat int32 arrays with a fixed stride per query block, as a kernel reads them):
// queries are split into blocks of kBlockSize rows; query block b covers positions
// [b * 64, min((b + 1) * 64, n)). For each query block:
//   - ranges: range_count[b] key ranges, range_start[b * max_ranges + i], each covering keys
//     [start, start + 64) (clipped to the causal limit). Starts ascend; ranges do not overlap.
//   - columns: column_count[b] single keys, column_index[b * max_columns + i], ascending, none
//     inside a range.
// Unused slots of range_start / column_index are -1. See docs/sparse_attention.md.
// A query at position p attends to every selected key <= p (causal). Every query attends at
// least to itself: each pattern keeps the diagonal.

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "common/host_device.h"

namespace sparseaccel {

constexpr int64_t kBlockSize = 64;

// Whether a query block whose selection costs `tiles` key tiles (its ranges plus its started
// groups of 64 columns) of its `causal_tiles` (b + 1 for block b) keeps nearly every tile: at
// least 9 in 10. Such a block takes all of them instead (FillNearlyFullBlocks, and the GPU index
// likewise): the sparse kernel's per-tile overhead leaves nothing to save on the few it would
// skip, and the extra keys only bring the output closer to dense. Integer arithmetic, so that
// the CPU and the GPU decide alike.
inline constexpr int64_t kNearlyEveryTileTenths = 9;
SPARSEACCEL_HOST_DEVICE constexpr bool KeepsNearlyEveryTile(int64_t tiles, int64_t causal_tiles) {
  return 10 * tiles >= kNearlyEveryTileTenths * causal_tiles;
}

struct SparseIndex {
  int64_t num_tokens = 0;
  int64_t num_query_blocks = 0;
  int64_t max_ranges = 0;
  int64_t max_columns = 0;
  std::vector<int32_t> range_count;   // [num_query_blocks]
  std::vector<int32_t> range_start;   // [num_query_blocks][max_ranges]
  std::vector<int32_t> column_count;  // [num_query_blocks]
  std::vector<int32_t> column_index;  // [num_query_blocks][max_columns]

  // The selected keys of query block b, ascending (before the per-query causal cut).
  std::vector<int64_t> KeysOfBlock(int64_t block) const;
};

// All heads of one layer in one set of arrays, for a kernel launched over (head, query block):
// the per-head arrays of SparseIndex with a head dimension in front and common strides
// (max_ranges / max_columns over all heads), padded with -1. Head h, query block b:
//   range_count[h * num_query_blocks + b],
//   range_start[(h * num_query_blocks + b) * max_ranges + i], likewise for columns.
struct LayerSparseIndex {
  int64_t num_heads = 0;
  int64_t num_tokens = 0;
  int64_t num_query_blocks = 0;
  int64_t max_ranges = 0;
  int64_t max_columns = 0;
  std::vector<int32_t> range_count;   // [num_heads][num_query_blocks]
  std::vector<int32_t> range_start;   // [num_heads][num_query_blocks][max_ranges]
  std::vector<int32_t> column_count;  // [num_heads][num_query_blocks]
  std::vector<int32_t> column_index;  // [num_heads][num_query_blocks][max_columns]
};

// `index` with every query block that keeps nearly every tile (KeepsNearlyEveryTile) keeping
// all of them: ranges 0, 64, .., 64 b and no columns.
SparseIndex FillNearlyFullBlocks(const SparseIndex& index);

// The heads' indices must share num_tokens.
LayerSparseIndex PackLayerIndex(const std::vector<SparseIndex>& heads);

// A-shape: the first `sink` keys plus the `window` keys up to each query, at block granularity
// (sink and window rounded up to whole 64-key blocks).
SparseIndex AShapeIndex(int64_t num_tokens, int64_t sink, int64_t window);

struct VerticalSlashBudget {
  int64_t vertical = 1000;  // Key columns kept.
  int64_t slash = 6096;     // Diagonals kept.
  int64_t last_q = 64;      // Queries whose attention estimates the pattern.
};

// Vertical-slash: softmax attention of the last `last_q` queries against all keys (causal);
// column sums rank key columns, diagonal sums (offset = query - key) rank diagonals. The top
// `vertical` columns and top `slash` offsets are kept; the first 4 columns and the offsets
// 0..63 always are. Ties rank the smaller index first. Slash offsets become merged key ranges
// per query block; columns already inside a range are dropped.
// q, k: [num_tokens][head_dim] rows of one head (row stride `q_stride` / `k_stride` floats).
SparseIndex VerticalSlashIndex(const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                               int64_t num_tokens, int64_t head_dim,
                               const VerticalSlashBudget& budget);

// Algorithm 2: the index of kept key columns `verticals` (0 <= column < num_tokens) and kept
// diagonal offsets `slashes` (0 <= offset = query - key < num_tokens), in any order, duplicates
// and out-of-range entries ignored. Per query
// block [q0, q1), offset o covers keys [max(0, q0 - o), q1 - 1 - o]; the union over offsets is
// cut, from its low end, into ranges of 64 keys (the last one may reach past the union: those
// keys are computed too); columns below q1 not inside a range become the column list.
SparseIndex ConvertVerticalSlash(int64_t num_tokens, std::vector<int64_t> verticals,
                                 std::vector<int64_t> slashes);

// Block-sparse: Q and K mean-pooled over blocks of 64; softmax over pooled scores of the causal
// key blocks; the top `top_k` key blocks per query block, always with the diagonal block. The
// softmax is monotone, so blocks are ranked by their pooled logits (no exp, no underflow ties).
SparseIndex BlockSparseIndex(const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                             int64_t num_tokens, int64_t head_dim, int64_t top_k);

// Causal dense attention as an index (every key block): what a dense head computes.
SparseIndex DenseIndex(int64_t num_tokens);

// Attention of one head over the selected pairs. q, k, v, out: rows of head_dim floats with the
// given strides (k and v share kv_stride). Each query row is the CPU engine's attention row
// (AttendOneQuery: scale 1/sqrt(head_dim), dot products and softmax in double) over its selected
// keys, so a full index gives the engine's dense attention exactly.
void SparseAttentionCpu(const float* q, int64_t q_stride, const float* k, const float* v,
                        int64_t kv_stride, int64_t head_dim, const SparseIndex& index, float* out,
                        int64_t out_stride);

// Dense attention of one head, computed once and shared by every index measured against it.
struct DenseReference {
  int64_t num_tokens = 0;
  int64_t head_dim = 0;
  std::vector<float> output;  // [num_tokens][head_dim]
  // Causal attention probabilities, row i (keys 0..i) at offset i * (i + 1) / 2.
  std::vector<float> probs;
};

DenseReference ComputeDenseReference(const float* q, int64_t q_stride, const float* k,
                                     const float* v, int64_t kv_stride, int64_t num_tokens,
                                     int64_t head_dim);

// The last queries of a prompt, whose attention produces the first generated token (and the
// retrieval a question at the end of a prompt asks for): Fidelity::tail_recall.
inline constexpr int64_t kTailQueries = 64;

// How good an index is for one head, against dense attention.
struct Fidelity {
  double density = 0;         // Selected causal (q, k) pairs / all causal pairs.
  double tile_cost = 0;       // Kernel cost model: IndexTileCost.
  double recall = 0;          // Mean over queries of the dense attention mass on selected keys.
  double relative_error = 0;  // ||sparse - dense||_F / ||dense||_F of the outputs.
  double tail_recall = 0;     // The same mean over the last kTailQueries queries only.
  double tail_error = 0;      // relative_error over the last kTailQueries output rows only.
};

Fidelity MeasureFidelity(const float* q, int64_t q_stride, const float* k, const float* v,
                         int64_t kv_stride, int64_t head_dim, const DenseReference& dense,
                         const SparseIndex& index);

// The same, computing the dense reference first (for a single index).
Fidelity MeasureFidelity(const float* q, int64_t q_stride, const float* k, const float* v,
                         int64_t kv_stride, int64_t head_dim, const SparseIndex& index);

// Fraction of causal pairs an index selects (no Q/K needed).
double IndexDensity(const SparseIndex& index);

// What a tiled GPU kernel pays, relative to dense causal attention: per query block one 64x64
// tile per key range plus one tile per started group of 64 columns, over the (b + 1) tiles of
// dense query block b. Diagonal tiles count whole although half masked.
double IndexTileCost(const SparseIndex& index);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_SPARSE_SPARSE_INDEX_H_
