#ifndef SPARSEACCEL_MODEL_KV_CACHE_H_
#define SPARSEACCEL_MODEL_KV_CACHE_H_

// Where a forward pass reads and writes keys and values, as KvLayerView blocks
// (kernels/kv_view.h). Implementations: a paged pool (decode), a one-layer
// scratch buffer streamed away after each layer (prefill service), a contiguous cache (tests).

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/kv_view.h"

namespace sparseaccel {

// Element type of K/V rows outside the engines (SequenceModel::WriteKv, KvExporter, the wire).
enum class KvDtype { kF32, kBf16 };

inline size_t KvDtypeBytes(KvDtype dtype) { return dtype == KvDtype::kF32 ? 4 : 2; }

// Device memory of a GPU engine, bytes: `used` is the device's total minus free (every process
// and the CUDA context included), `peak_used` its high-water mark since the last reset,
// `kv_pool` the paged K/V pool's share.
struct DeviceMemoryStats {
  int64_t used = 0;
  int64_t peak_used = 0;
  int64_t kv_pool = 0;
};

struct KvShape {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t RowSize() const { return num_kv_heads * head_dim; }
};

// A sequence's K/V as seen by the forward pass.
class KvStore {
 public:
  virtual ~KvStore() = default;
  // Storage for `layer` covering positions [0, num_tokens); grows the store when needed
  // (ResourceExhausted when it cannot).
  virtual absl::StatusOr<KvLayerView> Layer(int64_t layer, int64_t num_tokens) = 0;
  // Called once a layer has written positions [first_pos, first_pos + count); a streaming store
  // ships them here. An error stops the forward pass (e.g. the receiver went away).
  virtual absl::Status LayerDone(int64_t layer, int64_t first_pos, int64_t count) {
    (void)layer, (void)first_pos, (void)count;
    return absl::OkStatus();
  }
};

// All layers of one sequence in contiguous memory: the simple store for tests and tools.
class ContiguousKvStore : public KvStore {
 public:
  ContiguousKvStore(KvShape shape, int64_t capacity_tokens);
  absl::StatusOr<KvLayerView> Layer(int64_t layer, int64_t num_tokens) override;
  const KvShape& shape() const { return shape_; }

 private:
  KvShape shape_;
  int64_t capacity_tokens_;
  std::vector<float> k_;  // [layer][pos][row]
  std::vector<float> v_;
};

// Fixed-size blocks in one preallocated pool, shared by many sequences (thread-safe).
// Block b holds, for every layer, block_tokens K rows and block_tokens V rows.
class KvBlockPool {
 public:
  KvBlockPool(KvShape shape, int64_t block_tokens, int64_t num_blocks);
  KvBlockPool(const KvBlockPool&) = delete;
  KvBlockPool& operator=(const KvBlockPool&) = delete;

  // `count` blocks, or ResourceExhausted (allocating none) when fewer are free.
  absl::StatusOr<std::vector<int32_t>> Allocate(int64_t count);
  void Free(const std::vector<int32_t>& blocks);

  float* K(int32_t block, int64_t layer);
  float* V(int32_t block, int64_t layer);
  const KvShape& shape() const { return shape_; }
  int64_t block_tokens() const { return block_tokens_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const;
  int64_t BytesPerBlock() const;

 private:
  KvShape shape_;
  int64_t block_tokens_;
  int64_t num_blocks_;
  std::vector<float> storage_;
  mutable absl::Mutex mu_;
  std::vector<int32_t> free_list_ ABSL_GUARDED_BY(mu_);
};

// One sequence's block table over a pool; frees its blocks on destruction.
class PagedKvStore : public KvStore {
 public:
  explicit PagedKvStore(KvBlockPool* pool);
  ~PagedKvStore() override;
  PagedKvStore(const PagedKvStore&) = delete;
  PagedKvStore& operator=(const PagedKvStore&) = delete;

  // Makes room for `num_tokens` positions (ResourceExhausted when the pool is full).
  absl::Status Reserve(int64_t num_tokens);
  absl::StatusOr<KvLayerView> Layer(int64_t layer, int64_t num_tokens) override;
  const std::vector<int32_t>& blocks() const { return blocks_; }

 private:
  KvBlockPool* pool_;
  std::vector<int32_t> blocks_;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_KV_CACHE_H_
