#include "kernels/sparse/sparse_index.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "kernels/attention.h"
#include "kernels/kv_view.h"

namespace sparseaccel {
namespace {

int64_t NumBlocks(int64_t n) { return (n + kBlockSize - 1) / kBlockSize; }

// Builds the flat index from per-block sorted range starts and column lists.
SparseIndex Pack(int64_t n, const std::vector<std::vector<int32_t>>& ranges,
                 const std::vector<std::vector<int32_t>>& columns) {
  SparseIndex index;
  index.num_tokens = n;
  index.num_query_blocks = static_cast<int64_t>(ranges.size());
  for (const auto& r : ranges) index.max_ranges = std::max<int64_t>(index.max_ranges, r.size());
  for (const auto& c : columns) index.max_columns = std::max<int64_t>(index.max_columns, c.size());
  index.range_count.resize(index.num_query_blocks);
  index.column_count.resize(index.num_query_blocks);
  index.range_start.assign(index.num_query_blocks * index.max_ranges, -1);
  index.column_index.assign(index.num_query_blocks * index.max_columns, -1);
  for (int64_t b = 0; b < index.num_query_blocks; ++b) {
    index.range_count[b] = static_cast<int32_t>(ranges[b].size());
    std::copy(ranges[b].begin(), ranges[b].end(), &index.range_start[b * index.max_ranges]);
    index.column_count[b] = static_cast<int32_t>(columns[b].size());
    std::copy(columns[b].begin(), columns[b].end(), &index.column_index[b * index.max_columns]);
  }
  return index;
}

// Indices of the `count` largest scores, larger first, ties to the smaller index; entries with
// score +inf (forced) always come first.
std::vector<int64_t> TopK(const std::vector<double>& scores, int64_t count) {
  std::vector<int64_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  count = std::min<int64_t>(count, static_cast<int64_t>(scores.size()));
  auto better = [&](int64_t a, int64_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  };
  std::partial_sort(order.begin(), order.begin() + count, order.end(), better);
  order.resize(count);
  return order;
}

// Softmax of q . k / sqrt(d) over keys 0..last (causal), in double.
void SoftmaxRow(const float* q, const float* k, int64_t k_stride, int64_t last, int64_t d,
                std::vector<double>* probs) {
  probs->assign(last + 1, 0.0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  double mx = -INFINITY;
  for (int64_t j = 0; j <= last; ++j) {
    double dot = 0;
    for (int64_t t = 0; t < d; ++t) dot += static_cast<double>(q[t]) * k[j * k_stride + t];
    (*probs)[j] = dot * scale;
    mx = std::max(mx, (*probs)[j]);
  }
  double sum = 0;
  for (double& p : *probs) sum += (p = std::exp(p - mx));
  for (double& p : *probs) p /= sum;
}

}  // namespace

std::vector<int64_t> SparseIndex::KeysOfBlock(int64_t block) const {
  const int64_t limit = std::min(num_tokens, (block + 1) * kBlockSize);
  std::vector<int64_t> keys;
  for (int32_t i = 0; i < range_count[block]; ++i) {
    const int64_t start = range_start[block * max_ranges + i];
    for (int64_t key = start; key < std::min(start + kBlockSize, limit); ++key) keys.push_back(key);
  }
  for (int32_t i = 0; i < column_count[block]; ++i) {
    keys.push_back(column_index[block * max_columns + i]);
  }
  std::sort(keys.begin(), keys.end());
  return keys;
}

SparseIndex FillNearlyFullBlocks(const SparseIndex& index) {
  std::vector<std::vector<int32_t>> ranges(index.num_query_blocks), columns(index.num_query_blocks);
  for (int64_t b = 0; b < index.num_query_blocks; ++b) {
    const int64_t tiles =
        index.range_count[b] + (index.column_count[b] + kBlockSize - 1) / kBlockSize;
    if (KeepsNearlyEveryTile(tiles, b + 1)) {
      for (int64_t kb = 0; kb <= b; ++kb)
        ranges[b].push_back(static_cast<int32_t>(kb * kBlockSize));
      continue;
    }
    const int32_t* range_start = &index.range_start[b * index.max_ranges];
    const int32_t* column_index = &index.column_index[b * index.max_columns];
    ranges[b].assign(range_start, range_start + index.range_count[b]);
    columns[b].assign(column_index, column_index + index.column_count[b]);
  }
  return Pack(index.num_tokens, ranges, columns);
}

LayerSparseIndex PackLayerIndex(const std::vector<SparseIndex>& heads) {
  LayerSparseIndex layer;
  layer.num_heads = static_cast<int64_t>(heads.size());
  if (heads.empty()) return layer;
  layer.num_tokens = heads[0].num_tokens;
  layer.num_query_blocks = heads[0].num_query_blocks;
  for (const SparseIndex& head : heads) {
    layer.max_ranges = std::max(layer.max_ranges, head.max_ranges);
    layer.max_columns = std::max(layer.max_columns, head.max_columns);
  }
  const int64_t rows = layer.num_heads * layer.num_query_blocks;
  layer.range_count.reserve(rows);
  layer.column_count.reserve(rows);
  layer.range_start.assign(rows * layer.max_ranges, -1);
  layer.column_index.assign(rows * layer.max_columns, -1);
  for (int64_t h = 0; h < layer.num_heads; ++h) {
    const SparseIndex& head = heads[h];
    layer.range_count.insert(layer.range_count.end(), head.range_count.begin(),
                             head.range_count.end());
    layer.column_count.insert(layer.column_count.end(), head.column_count.begin(),
                              head.column_count.end());
    for (int64_t b = 0; b < layer.num_query_blocks; ++b) {
      const int64_t row = h * layer.num_query_blocks + b;
      std::copy_n(&head.range_start[b * head.max_ranges], head.range_count[b],
                  &layer.range_start[row * layer.max_ranges]);
      std::copy_n(&head.column_index[b * head.max_columns], head.column_count[b],
                  &layer.column_index[row * layer.max_columns]);
    }
  }
  return layer;
}

SparseIndex DenseIndex(int64_t n) {
  std::vector<std::vector<int32_t>> ranges(NumBlocks(n)), columns(NumBlocks(n));
  for (int64_t b = 0; b < NumBlocks(n); ++b) {
    for (int64_t kb = 0; kb <= b; ++kb) ranges[b].push_back(static_cast<int32_t>(kb * kBlockSize));
  }
  return Pack(n, ranges, columns);
}

SparseIndex AShapeIndex(int64_t n, int64_t sink, int64_t window) {
  const int64_t sink_blocks = NumBlocks(sink);
  const int64_t window_blocks = std::max<int64_t>(1, NumBlocks(window));
  std::vector<std::vector<int32_t>> ranges(NumBlocks(n)), columns(NumBlocks(n));
  for (int64_t b = 0; b < NumBlocks(n); ++b) {
    for (int64_t kb = 0; kb <= b; ++kb) {
      if (kb < sink_blocks || kb > b - window_blocks) {
        ranges[b].push_back(static_cast<int32_t>(kb * kBlockSize));
      }
    }
  }
  return Pack(n, ranges, columns);
}

SparseIndex VerticalSlashIndex(const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                               int64_t n, int64_t d, const VerticalSlashBudget& budget) {
  const int64_t last_q = std::max<int64_t>(1, std::min(budget.last_q, n));
  std::vector<double> column_score(n, 0.0), slash_score(n, 0.0), probs;
  for (int64_t i = n - last_q; i < n; ++i) {
    SoftmaxRow(q + i * q_stride, k, k_stride, i, d, &probs);
    for (int64_t j = 0; j <= i; ++j) {
      column_score[j] += probs[j];
      slash_score[i - j] += probs[j];
    }
  }
  // Always kept: the first columns (attention sinks) and the nearest diagonals (local window).
  constexpr int64_t kForcedColumns = 4;
  for (int64_t j = 0; j < std::min(kForcedColumns, n); ++j) column_score[j] = INFINITY;
  for (int64_t o = 0; o < std::min(kBlockSize, n); ++o) slash_score[o] = INFINITY;
  return ConvertVerticalSlash(n, TopK(column_score, std::max(budget.vertical, kForcedColumns)),
                              TopK(slash_score, std::max(budget.slash, kBlockSize)));
}

SparseIndex ConvertVerticalSlash(int64_t n, std::vector<int64_t> verticals,
                                 std::vector<int64_t> slashes) {
  auto outside = [n](int64_t x) { return x < 0 || x >= n; };
  verticals.erase(std::remove_if(verticals.begin(), verticals.end(), outside), verticals.end());
  slashes.erase(std::remove_if(slashes.begin(), slashes.end(), outside), slashes.end());
  std::sort(verticals.begin(), verticals.end());
  verticals.erase(std::unique(verticals.begin(), verticals.end()), verticals.end());
  std::sort(slashes.begin(), slashes.end(), std::greater<int64_t>());  // Far diagonals first.
  slashes.erase(std::unique(slashes.begin(), slashes.end()), slashes.end());
  std::vector<std::vector<int32_t>> ranges(NumBlocks(n)), columns(NumBlocks(n));
  for (int64_t b = 0; b < NumBlocks(n); ++b) {
    const int64_t q0 = b * kBlockSize, q1 = std::min(n, q0 + kBlockSize);
    // Offset o covers keys [q0 - o, q1 - 1 - o] (clipped at 0); merge into sorted intervals.
    std::vector<std::pair<int64_t, int64_t>> intervals;
    for (int64_t o : slashes) {
      if (o > q1 - 1) continue;
      const int64_t lo = std::max<int64_t>(0, q0 - o), hi = q1 - 1 - o;
      if (!intervals.empty() && lo <= intervals.back().second + 1) {
        intervals.back().second = std::max(intervals.back().second, hi);
      } else {
        intervals.emplace_back(lo, hi);
      }
    }
    // Tile the union into 64-key ranges, never overlapping.
    int64_t covered_until = 0;  // Keys below this are already in a range.
    for (const auto& [lo, hi] : intervals) {
      for (int64_t start = std::max(lo, covered_until); start <= hi; start += kBlockSize) {
        ranges[b].push_back(static_cast<int32_t>(start));
        covered_until = start + kBlockSize;
      }
    }
    size_t r = 0;
    for (int64_t col : verticals) {
      if (col >= q1) break;
      while (r < ranges[b].size() && ranges[b][r] + kBlockSize <= col) ++r;
      const bool inside = r < ranges[b].size() && ranges[b][r] <= col;
      if (!inside) columns[b].push_back(static_cast<int32_t>(col));
    }
  }
  return Pack(n, ranges, columns);
}

SparseIndex BlockSparseIndex(const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                             int64_t n, int64_t d, int64_t top_k) {
  const int64_t blocks = NumBlocks(n);
  auto pool = [&](const float* x, int64_t stride) {
    std::vector<double> pooled(blocks * d, 0.0);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t r0 = b * kBlockSize, r1 = std::min(n, r0 + kBlockSize);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t t = 0; t < d; ++t) pooled[b * d + t] += x[r * stride + t];
      }
      for (int64_t t = 0; t < d; ++t) pooled[b * d + t] /= static_cast<double>(r1 - r0);
    }
    return pooled;
  };
  const std::vector<double> pq = pool(q, q_stride), pk = pool(k, k_stride);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<std::vector<int32_t>> ranges(blocks), columns(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    std::vector<double> scores(b + 1);
    for (int64_t kb = 0; kb <= b; ++kb) {
      double dot = 0;
      for (int64_t t = 0; t < d; ++t) dot += pq[b * d + t] * pk[kb * d + t];
      scores[kb] = dot * scale;
    }
    scores[b] = INFINITY;  // The diagonal block is always computed.
    std::vector<int64_t> chosen = TopK(scores, std::max<int64_t>(1, top_k));
    std::sort(chosen.begin(), chosen.end());
    for (int64_t kb : chosen) ranges[b].push_back(static_cast<int32_t>(kb * kBlockSize));
  }
  return Pack(n, ranges, columns);
}

void SparseAttentionCpu(const float* q, int64_t q_stride, const float* k, const float* v,
                        int64_t kv_stride, int64_t d, const SparseIndex& index, float* out,
                        int64_t out_stride) {
  // This head's K/V as a one-block layer view, so each row runs the engine's attention row.
  // The view is only read.
  KvLayerView kv;
  kv.block_tokens = std::max<int64_t>(1, index.num_tokens);
  kv.row_size = kv_stride;
  kv.k_blocks = {const_cast<float*>(k)};
  kv.v_blocks = {const_cast<float*>(v)};
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < index.num_query_blocks; ++b) {
    const std::vector<int64_t> keys = index.KeysOfBlock(b);
    std::vector<double> scores(keys.size());
    const int64_t q1 = std::min(index.num_tokens, (b + 1) * kBlockSize);
    for (int64_t i = b * kBlockSize; i < q1; ++i) {
      const int64_t visible = std::upper_bound(keys.begin(), keys.end(), i) - keys.begin();
      AttendOneQuery(q + i * q_stride, kv, /*kv_head=*/0, d, keys.data(), visible, scores.data(),
                     out + i * out_stride);
    }
  }
}

double IndexDensity(const SparseIndex& index) {
  const int64_t n = index.num_tokens;
  int64_t selected = 0;
  for (int64_t b = 0; b < index.num_query_blocks; ++b) {
    const std::vector<int64_t> keys = index.KeysOfBlock(b);
    const int64_t q1 = std::min(n, (b + 1) * kBlockSize);
    for (int64_t i = b * kBlockSize; i < q1; ++i) {
      selected += std::upper_bound(keys.begin(), keys.end(), i) - keys.begin();
    }
  }
  return static_cast<double>(selected) / (static_cast<double>(n) * (n + 1) / 2);
}

double IndexTileCost(const SparseIndex& index) {
  int64_t tiles = 0, dense_tiles = 0;
  for (int64_t b = 0; b < index.num_query_blocks; ++b) {
    tiles += index.range_count[b] + (index.column_count[b] + kBlockSize - 1) / kBlockSize;
    dense_tiles += b + 1;
  }
  return dense_tiles == 0 ? 0.0 : static_cast<double>(tiles) / dense_tiles;
}

DenseReference ComputeDenseReference(const float* q, int64_t q_stride, const float* k,
                                     const float* v, int64_t kv_stride, int64_t n, int64_t d) {
  DenseReference dense;
  dense.num_tokens = n;
  dense.head_dim = d;
  dense.output.resize(n * d);
  SparseAttentionCpu(q, q_stride, k, v, kv_stride, d, DenseIndex(n), dense.output.data(), d);
  dense.probs.resize(n * (n + 1) / 2);
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> row;
    SoftmaxRow(q + i * q_stride, k, kv_stride, i, d, &row);
    std::copy(row.begin(), row.end(), dense.probs.begin() + i * (i + 1) / 2);
  }
  return dense;
}

Fidelity MeasureFidelity(const float* q, int64_t q_stride, const float* k, const float* v,
                         int64_t kv_stride, int64_t d, const DenseReference& dense,
                         const SparseIndex& index) {
  const int64_t n = index.num_tokens;
  std::vector<float> sparse(n * d);
  SparseAttentionCpu(q, q_stride, k, v, kv_stride, d, index, sparse.data(), d);
  const int64_t tail_begin = std::max<int64_t>(0, n - kTailQueries);
  double err = 0, norm = 0, tail_err = 0, tail_norm = 0;
  for (int64_t i = 0; i < n * d; ++i) {
    const double diff = static_cast<double>(sparse[i]) - dense.output[i];
    const double ref = static_cast<double>(dense.output[i]) * dense.output[i];
    err += diff * diff;
    norm += ref;
    if (i >= tail_begin * d) {
      tail_err += diff * diff;
      tail_norm += ref;
    }
  }
  double recall = 0, tail_recall = 0;
  for (int64_t b = 0; b < index.num_query_blocks; ++b) {
    const std::vector<int64_t> keys = index.KeysOfBlock(b);
    const int64_t q1 = std::min(n, (b + 1) * kBlockSize);
    for (int64_t i = b * kBlockSize; i < q1; ++i) {
      const float* row = &dense.probs[i * (i + 1) / 2];
      double row_recall = 0;
      for (int64_t key : keys) {
        if (key > i) break;
        row_recall += row[key];
      }
      recall += row_recall;
      if (i >= tail_begin) tail_recall += row_recall;
    }
  }
  return Fidelity{IndexDensity(index),
                  IndexTileCost(index),
                  recall / n,
                  std::sqrt(err / norm),
                  tail_recall / (n - tail_begin),
                  std::sqrt(tail_err / std::max(tail_norm, 1e-300))};
}

Fidelity MeasureFidelity(const float* q, int64_t q_stride, const float* k, const float* v,
                         int64_t kv_stride, int64_t d, const SparseIndex& index) {
  const DenseReference dense =
      ComputeDenseReference(q, q_stride, k, v, kv_stride, index.num_tokens, d);
  return MeasureFidelity(q, q_stride, k, v, kv_stride, d, dense, index);
}

}  // namespace sparseaccel
