#include "kernels/sparse/sparse_index.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <set>

#include "gtest/gtest.h"
#include "kernels/sparse/pattern_config.h"
#include "kernels/sparse/planted.h"

namespace sparseaccel {
namespace {

constexpr int64_t kDim = 32;

// Structural invariants every index must satisfy.
void ExpectWellFormed(const SparseIndex& index) {
  const int64_t n = index.num_tokens;
  ASSERT_EQ(index.num_query_blocks, (n + kBlockSize - 1) / kBlockSize);
  for (int64_t b = 0; b < index.num_query_blocks; ++b) {
    std::vector<int64_t> keys = index.KeysOfBlock(b);
    EXPECT_TRUE(std::adjacent_find(keys.begin(), keys.end()) == keys.end()) << "duplicate key";
    for (int64_t key : keys) {
      EXPECT_GE(key, 0);
      EXPECT_LT(key, std::min(n, (b + 1) * kBlockSize));
    }
    // The diagonal: every query sees itself.
    for (int64_t i = b * kBlockSize; i < std::min(n, (b + 1) * kBlockSize); ++i) {
      EXPECT_TRUE(std::binary_search(keys.begin(), keys.end(), i)) << "query " << i;
    }
    for (int32_t r = 1; r < index.range_count[b]; ++r) {
      EXPECT_GE(index.range_start[b * index.max_ranges + r],
                index.range_start[b * index.max_ranges + r - 1] + kBlockSize);
    }
  }
}

TEST(SparseIndexTest, FullBudgetsEqualDense) {
  std::mt19937 rng(21);
  for (int64_t n : {40, 64, 257, 600}) {
    HeadSample s = PlantedHead(Planted::kNone, n, kDim, &rng);
    HeadPattern a_shape{HeadPattern::Kind::kAShape, 0, n};
    HeadPattern vs{HeadPattern::Kind::kVerticalSlash};
    vs.vertical_slash = {n, n, 64};
    HeadPattern bs{HeadPattern::Kind::kBlockSparse};
    bs.top_k = n;
    for (const HeadPattern& p : {a_shape, vs, bs}) {
      SparseIndex index = BuildIndex(p, s.q.data(), kDim, s.k.data(), kDim, n, kDim);
      ExpectWellFormed(index);
      Fidelity f = MeasureFidelity(s.q.data(), kDim, s.k.data(), s.v.data(), kDim, kDim, index);
      EXPECT_NEAR(f.density, 1.0, 1e-12) << PatternName(p.kind) << " n=" << n;
      EXPECT_NEAR(f.recall, 1.0, 1e-6);  // Probabilities stored as float.
      EXPECT_EQ(f.relative_error, 0);    // The same keys in the same order as dense.
    }
  }
}

// The worked example of docs/sparse_attention.md.
TEST(SparseIndexTest, VerticalSlashConversionMatchesTheDocumentedExample) {
  std::vector<int64_t> slashes = {100};
  for (int64_t o = 0; o < 64; ++o) slashes.push_back(o);
  const SparseIndex index = ConvertVerticalSlash(256, {150, 3, 2, 1, 0, 2, 300}, slashes);
  EXPECT_EQ(index.num_query_blocks, 4);
  EXPECT_EQ(index.max_ranges, 3);
  EXPECT_EQ(index.max_columns, 4);
  EXPECT_EQ(index.range_count, (std::vector<int32_t>{1, 2, 3, 3}));
  EXPECT_EQ(index.range_start,
            (std::vector<int32_t>{0, -1, -1, 0, 64, -1, 28, 92, 156, 92, 156, 220}));
  EXPECT_EQ(index.column_count, (std::vector<int32_t>{0, 0, 4, 4}));
  EXPECT_EQ(index.column_index,
            (std::vector<int32_t>{-1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 2, 3, 0, 1, 2, 3}));
  ExpectWellFormed(index);
}

// The documented example's blocks 2 and 3 cost 4 tiles each (3 ranges and a group of 4
// columns) of their 3 and 4 causal tiles: they take all of them. Blocks 0 and 1 already keep
// every tile. A block keeping 8 of its 10 tiles stays as it is, 9 of 10 takes all.
TEST(SparseIndexTest, BlocksKeepingNearlyEveryTileKeepAll) {
  std::vector<int64_t> slashes = {100};
  for (int64_t o = 0; o < 64; ++o) slashes.push_back(o);
  const SparseIndex filled =
      FillNearlyFullBlocks(ConvertVerticalSlash(256, {150, 3, 2, 1, 0, 2, 300}, slashes));
  EXPECT_EQ(filled.range_count, (std::vector<int32_t>{1, 2, 3, 4}));
  EXPECT_EQ(filled.range_start,
            (std::vector<int32_t>{0, -1, -1, -1, 0, 64, -1, -1, 0, 64, 128, -1, 0, 64, 128, 192}));
  EXPECT_EQ(filled.column_count, (std::vector<int32_t>{0, 0, 0, 0}));
  ExpectWellFormed(filled);

  EXPECT_FALSE(KeepsNearlyEveryTile(8, 10));
  EXPECT_TRUE(KeepsNearlyEveryTile(9, 10));
  // A-shape over 10 blocks: block 9 keeps the sink block and a window of 7 (8 of 10 tiles),
  // block 8 keeps 8 of 9 (under 9 in 10 too); both stay, as does every block that keeps all.
  const SparseIndex a_shape = AShapeIndex(640, 64, 7 * 64);
  const SparseIndex same = FillNearlyFullBlocks(a_shape);
  EXPECT_EQ(same.range_count, a_shape.range_count);
  EXPECT_EQ(same.range_start, a_shape.range_start);
  // A window of 8 blocks: block 9 keeps 9 of 10 and takes all.
  const SparseIndex wider = FillNearlyFullBlocks(AShapeIndex(640, 64, 8 * 64));
  EXPECT_EQ(wider.range_count[9], 10);
  EXPECT_EQ(wider.range_count[8], 9);
}

TEST(SparseIndexTest, LayerPackingKeepsEveryHeadsIndex) {
  std::mt19937 rng(25);
  const int64_t n = 333;
  HeadSample s = PlantedHead(Planted::kVertical, n, kDim, &rng);
  const std::vector<SparseIndex> heads = {
      AShapeIndex(n, 64, 64),
      VerticalSlashIndex(s.q.data(), kDim, s.k.data(), kDim, n, kDim, {12, 70, 64}),
      BlockSparseIndex(s.q.data(), kDim, s.k.data(), kDim, n, kDim, 3), DenseIndex(n)};
  const LayerSparseIndex layer = PackLayerIndex(heads);
  ASSERT_EQ(layer.num_heads, 4);
  ASSERT_EQ(layer.num_query_blocks, 6);
  EXPECT_EQ(layer.max_ranges, 6);   // The dense head's last block.
  EXPECT_GT(layer.max_columns, 0);  // The planted columns outside the ranges.
  for (int64_t h = 0; h < layer.num_heads; ++h) {
    for (int64_t b = 0; b < layer.num_query_blocks; ++b) {
      const int64_t row = h * layer.num_query_blocks + b;
      const SparseIndex& head = heads[h];
      ASSERT_EQ(layer.range_count[row], head.range_count[b]);
      ASSERT_EQ(layer.column_count[row], head.column_count[b]);
      for (int64_t i = 0; i < layer.max_ranges; ++i) {
        EXPECT_EQ(layer.range_start[row * layer.max_ranges + i],
                  i < head.range_count[b] ? head.range_start[b * head.max_ranges + i] : -1);
      }
      for (int64_t i = 0; i < layer.max_columns; ++i) {
        EXPECT_EQ(layer.column_index[row * layer.max_columns + i],
                  i < head.column_count[b] ? head.column_index[b * head.max_columns + i] : -1);
      }
    }
  }
}

TEST(SparseIndexTest, DensityAndTileCostCountWhatIsSelected) {
  // 200 tokens: query blocks of 64, 64, 64 and 8 rows.
  const int64_t n = 200;
  EXPECT_DOUBLE_EQ(IndexDensity(DenseIndex(n)), 1.0);
  EXPECT_DOUBLE_EQ(IndexTileCost(DenseIndex(n)), 1.0);
  // Diagonal block only: 4 tiles of the dense 1 + 2 + 3 + 4.
  const SparseIndex diagonal = AShapeIndex(n, 0, 1);
  EXPECT_DOUBLE_EQ(IndexTileCost(diagonal), 0.4);
  EXPECT_DOUBLE_EQ(IndexDensity(diagonal), (3 * 64.0 * 65 / 2 + 8.0 * 9 / 2) / (n * (n + 1) / 2.0));
}

TEST(SparseIndexTest, RandomInputsGiveValidIndices) {
  std::mt19937 rng(22);
  for (int64_t n : {1, 30, 100, 257, 700}) {
    HeadSample s = PlantedHead(Planted::kNone, n, kDim, &rng);
    std::vector<SparseIndex> indices = {
        AShapeIndex(n, 64, 128),
        VerticalSlashIndex(s.q.data(), kDim, s.k.data(), kDim, n, kDim, {20, 80, 64}),
        BlockSparseIndex(s.q.data(), kDim, s.k.data(), kDim, n, kDim, 2)};
    for (const SparseIndex& index : indices) {
      ExpectWellFormed(index);
      Fidelity f = MeasureFidelity(s.q.data(), kDim, s.k.data(), s.v.data(), kDim, kDim, index);
      EXPECT_GT(f.density, 0);
      EXPECT_LE(f.density, 1.0 + 1e-12);
      EXPECT_TRUE(std::isfinite(f.relative_error));
      EXPECT_LE(f.recall, 1.0 + 1e-6);
    }
  }
}

TEST(SparseIndexTest, SparseAttentionMatchesBruteForceOverSelectedKeys) {
  std::mt19937 rng(23);
  const int64_t n = 200;
  HeadSample s = PlantedHead(Planted::kNone, n, kDim, &rng);
  SparseIndex index = VerticalSlashIndex(s.q.data(), kDim, s.k.data(), kDim, n, kDim, {10, 70, 64});
  std::vector<float> out(n * kDim, NAN);
  SparseAttentionCpu(s.q.data(), kDim, s.k.data(), s.v.data(), kDim, kDim, index, out.data(), kDim);
  for (int64_t i = 0; i < n; i += 7) {
    std::vector<int64_t> keys = index.KeysOfBlock(i / kBlockSize);
    std::vector<double> w;
    double mx = -1e300;
    for (int64_t key : keys) {
      if (key > i) continue;
      double dot = 0;
      for (int64_t t = 0; t < kDim; ++t) dot += double(s.q[i * kDim + t]) * s.k[key * kDim + t];
      w.push_back(dot / std::sqrt(double(kDim)));
      mx = std::max(mx, w.back());
    }
    double sum = 0;
    for (double& x : w) sum += (x = std::exp(x - mx));
    for (int64_t t = 0; t < kDim; ++t) {
      double expected = 0;
      size_t j = 0;
      for (int64_t key : keys) {
        if (key <= i) expected += w[j++] / sum * s.v[key * kDim + t];
      }
      EXPECT_NEAR(out[i * kDim + t], expected, 1e-5 * (1 + std::fabs(expected)));
    }
  }
}

TEST(SparseIndexTest, PlantedStructureIsRecovered) {
  std::mt19937 rng(24);
  const int64_t n = 1024;
  {
    HeadSample s = PlantedHead(Planted::kVertical, n, kDim, &rng);
    SparseIndex index =
        VerticalSlashIndex(s.q.data(), kDim, s.k.data(), kDim, n, kDim, {16, 64, 64});
    Fidelity f = MeasureFidelity(s.q.data(), kDim, s.k.data(), s.v.data(), kDim, kDim, index);
    EXPECT_GT(f.recall, 0.9);
    EXPECT_LT(f.density, 0.2);
  }
  {
    HeadSample s = PlantedHead(Planted::kSlash, n, kDim, &rng);
    SparseIndex index =
        VerticalSlashIndex(s.q.data(), kDim, s.k.data(), kDim, n, kDim, {8, 68, 64});
    Fidelity f = MeasureFidelity(s.q.data(), kDim, s.k.data(), s.v.data(), kDim, kDim, index);
    // Random codes in 32 dimensions leave cross-talk, so the mass is not all on the diagonals;
    // the planted diagonals themselves must be selected for every query.
    EXPECT_GT(f.recall, 0.8);
    for (int64_t i = 0; i < n; ++i) {
      std::vector<int64_t> keys = index.KeysOfBlock(i / kBlockSize);
      for (int64_t o : {int64_t{0}, n / 5 + 3, n / 2 + 1}) {
        if (i - o >= 0) {
          EXPECT_TRUE(std::binary_search(keys.begin(), keys.end(), i - o)) << i << " " << o;
        }
      }
    }
    // Each kept diagonal costs a 64-key range per query block: the price of tensor-core tiles.
    EXPECT_LT(f.density, 0.6);
    // The A-shape cannot see the far diagonals.
    Fidelity a = MeasureFidelity(s.q.data(), kDim, s.k.data(), s.v.data(), kDim, kDim,
                                 AShapeIndex(n, 64, 128));
    EXPECT_LT(a.recall, f.recall - 0.2);
  }
  {
    HeadSample s = PlantedHead(Planted::kBlock, n, kDim, &rng);
    SparseIndex index = BlockSparseIndex(s.q.data(), kDim, s.k.data(), kDim, n, kDim, 2);
    Fidelity f = MeasureFidelity(s.q.data(), kDim, s.k.data(), s.v.data(), kDim, kDim, index);
    EXPECT_GT(f.recall, 0.9);
    EXPECT_LT(f.density, 0.3);
  }
  {
    HeadSample s = PlantedHead(Planted::kSinkLocal, n, kDim, &rng);
    Fidelity f = MeasureFidelity(s.q.data(), kDim, s.k.data(), s.v.data(), kDim, kDim,
                                 AShapeIndex(n, 64, 192));
    EXPECT_GT(f.recall, 0.9);
    EXPECT_LT(f.density, 0.45);
    // The always-kept sink columns and nearest diagonals of vertical-slash reach only part of
    // the window.
    Fidelity near = MeasureFidelity(
        s.q.data(), kDim, s.k.data(), s.v.data(), kDim, kDim,
        VerticalSlashIndex(s.q.data(), kDim, s.k.data(), kDim, n, kDim, {4, 64, 64}));
    EXPECT_LT(near.recall, f.recall - 0.1);
  }
}

}  // namespace
}  // namespace sparseaccel
