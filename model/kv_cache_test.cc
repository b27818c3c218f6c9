#include "model/kv_cache.h"

#include <algorithm>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace sparseaccel {
namespace {

// Writes a distinct value into every K and V element of positions [0, tokens) of every layer,
// then reads them all back: catches views that overlap across layers, blocks or K/V. Values
// start at `base`.
void ExpectRowsAreDistinct(KvStore* store, const KvShape& shape, int64_t tokens,
                           float base = 0.5f) {
  auto value = [&](int64_t layer, int64_t pos, int64_t i, bool is_v) {
    return static_cast<float>(((layer * tokens + pos) * shape.RowSize() + i) * 2 + is_v) + base;
  };
  for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
    absl::StatusOr<KvLayerView> view = store->Layer(layer, tokens);
    ASSERT_TRUE(view.ok()) << view.status();
    ASSERT_EQ(view->row_size, shape.RowSize());
    for (int64_t pos = 0; pos < tokens; ++pos) {
      for (int64_t i = 0; i < shape.RowSize(); ++i) {
        view->KRow(pos)[i] = value(layer, pos, i, false);
        view->VRow(pos)[i] = value(layer, pos, i, true);
      }
    }
  }
  for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
    absl::StatusOr<KvLayerView> view = store->Layer(layer, tokens);
    ASSERT_TRUE(view.ok()) << view.status();
    for (int64_t pos = 0; pos < tokens; ++pos) {
      for (int64_t i = 0; i < shape.RowSize(); ++i) {
        ASSERT_EQ(view->KRow(pos)[i], value(layer, pos, i, false)) << layer << " " << pos;
        ASSERT_EQ(view->VRow(pos)[i], value(layer, pos, i, true)) << layer << " " << pos;
      }
    }
  }
}

TEST(ContiguousKvStoreTest, LayersAndPositionsDoNotOverlap) {
  const KvShape shape{3, 2, 4};
  ContiguousKvStore store(shape, 10);
  ExpectRowsAreDistinct(&store, shape, 10);
}

TEST(ContiguousKvStoreTest, RejectsBadLayerAndOverCapacity) {
  ContiguousKvStore store(KvShape{2, 1, 8}, 5);
  EXPECT_EQ(store.Layer(2, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Layer(-1, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Layer(0, 6).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(store.Layer(1, 5).ok());
}

TEST(KvBlockPoolTest, ExhaustionAllocatesNothing) {
  KvBlockPool pool(KvShape{2, 2, 4}, 4, 3);
  absl::StatusOr<std::vector<int32_t>> a = pool.Allocate(2);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(pool.Allocate(2).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool.free_blocks(), 1);
  pool.Free(*a);
  EXPECT_EQ(pool.free_blocks(), 3);
  EXPECT_EQ(pool.BytesPerBlock(), 2 * 2 * 4 * 8 * static_cast<int64_t>(sizeof(float)));
}

TEST(KvBlockPoolTest, ConcurrentAllocateAndFreeNeverShareBlocks) {
  const int64_t num_blocks = 64;
  KvBlockPool pool(KvShape{1, 1, 4}, 2, num_blocks);
  std::vector<std::thread> threads;
  std::vector<std::vector<int32_t>> held(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&pool, &held, t] {
      std::mt19937 rng(100 + t);
      std::vector<int32_t>& mine = held[t];
      for (int round = 0; round < 2000; ++round) {
        if (mine.size() < 12 && rng() % 2 == 0) {
          absl::StatusOr<std::vector<int32_t>> got = pool.Allocate(1 + rng() % 4);
          if (got.ok()) mine.insert(mine.end(), got->begin(), got->end());
        } else if (!mine.empty()) {
          const size_t keep = rng() % mine.size();
          pool.Free(std::vector<int32_t>(mine.begin() + keep, mine.end()));
          mine.resize(keep);
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  std::set<int32_t> all;
  int64_t count = 0;
  for (const std::vector<int32_t>& mine : held) {
    all.insert(mine.begin(), mine.end());
    count += static_cast<int64_t>(mine.size());
  }
  EXPECT_EQ(static_cast<int64_t>(all.size()), count) << "a block was handed out twice";
  EXPECT_EQ(pool.free_blocks() + count, num_blocks);
}

TEST(PagedKvStoreTest, GrowsByBlocksAndReturnsThemOnDestruction) {
  const KvShape shape{2, 2, 4};
  KvBlockPool pool(shape, 4, 8);
  {
    PagedKvStore store(&pool);
    ASSERT_TRUE(store.Layer(0, 1).ok());
    EXPECT_EQ(store.blocks().size(), 1u);
    ASSERT_TRUE(store.Layer(1, 9).ok());
    EXPECT_EQ(store.blocks().size(), 3u);
    EXPECT_EQ(pool.free_blocks(), 5);
    // Shrinking requests keep the blocks already held.
    ASSERT_TRUE(store.Layer(0, 2).ok());
    EXPECT_EQ(store.blocks().size(), 3u);
    ExpectRowsAreDistinct(&store, shape, 11);
  }
  EXPECT_EQ(pool.free_blocks(), 8);
}

TEST(PagedKvStoreTest, TwoSequencesInOnePoolDoNotOverlap) {
  const KvShape shape{2, 1, 4};
  KvBlockPool pool(shape, 3, 8);
  PagedKvStore a(&pool), b(&pool);
  // Interleaved growth gives each store non-adjacent blocks.
  for (int64_t tokens = 3; tokens <= 12; tokens += 3) {
    ASSERT_TRUE(a.Reserve(tokens).ok());
    ASSERT_TRUE(b.Reserve(tokens).ok());
  }
  std::set<int32_t> blocks(a.blocks().begin(), a.blocks().end());
  blocks.insert(b.blocks().begin(), b.blocks().end());
  EXPECT_EQ(blocks.size(), 8u);
  ExpectRowsAreDistinct(&a, shape, 12);
  // Writing all of b with other values must leave every row of a as it was.
  ExpectRowsAreDistinct(&b, shape, 12, -1000.5f);
  for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
    absl::StatusOr<KvLayerView> view = a.Layer(layer, 12);
    ASSERT_TRUE(view.ok());
    for (int64_t pos = 0; pos < 12; ++pos) {
      EXPECT_GT(view->KRow(pos)[0], 0) << layer << " " << pos;
      EXPECT_GT(view->VRow(pos)[0], 0) << layer << " " << pos;
    }
  }
}

TEST(PagedKvStoreTest, ExhaustedPoolKeepsWhatTheStoreHas) {
  KvBlockPool pool(KvShape{1, 1, 4}, 4, 3);
  PagedKvStore store(&pool);
  ASSERT_TRUE(store.Reserve(8).ok());
  EXPECT_EQ(store.Reserve(20).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(store.Layer(0, 13).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(store.blocks().size(), 2u);
  EXPECT_EQ(pool.free_blocks(), 1);
  EXPECT_EQ(store.Layer(1, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(store.Layer(0, 12).ok());
  EXPECT_EQ(pool.free_blocks(), 0);
}

}  // namespace
}  // namespace sparseaccel
