#include "model/kv_cache.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace sparseaccel {

ContiguousKvStore::ContiguousKvStore(KvShape shape, int64_t capacity_tokens)
    : shape_(shape),
      capacity_tokens_(capacity_tokens),
      k_(shape.num_layers * capacity_tokens * shape.RowSize()),
      v_(shape.num_layers * capacity_tokens * shape.RowSize()) {}

absl::StatusOr<KvLayerView> ContiguousKvStore::Layer(int64_t layer, int64_t num_tokens) {
  if (layer < 0 || layer >= shape_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("KV layer ", layer, " out of range"));
  }
  if (num_tokens > capacity_tokens_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV store holds ", capacity_tokens_, " tokens, ", num_tokens, " requested"));
  }
  const int64_t offset = layer * capacity_tokens_ * shape_.RowSize();
  KvLayerView view;
  view.block_tokens = std::max<int64_t>(capacity_tokens_, 1);
  view.row_size = shape_.RowSize();
  view.k_blocks = {k_.data() + offset};
  view.v_blocks = {v_.data() + offset};
  return view;
}

KvBlockPool::KvBlockPool(KvShape shape, int64_t block_tokens, int64_t num_blocks)
    : shape_(shape),
      block_tokens_(block_tokens),
      num_blocks_(num_blocks),
      storage_(num_blocks * 2 * shape.num_layers * block_tokens * shape.RowSize()) {
  free_list_.reserve(num_blocks);
  // Hand out low block ids first (free_list_ is used as a stack).
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_list_.push_back(static_cast<int32_t>(b));
}

absl::StatusOr<std::vector<int32_t>> KvBlockPool::Allocate(int64_t count) {
  absl::MutexLock lock(&mu_);
  if (count > static_cast<int64_t>(free_list_.size())) {
    return absl::ResourceExhaustedError(absl::StrCat("KV pool: ", count, " blocks requested, ",
                                                     free_list_.size(), " of ", num_blocks_,
                                                     " free"));
  }
  std::vector<int32_t> blocks(free_list_.end() - count, free_list_.end());
  free_list_.resize(free_list_.size() - count);
  return blocks;
}

void KvBlockPool::Free(const std::vector<int32_t>& blocks) {
  absl::MutexLock lock(&mu_);
  free_list_.insert(free_list_.end(), blocks.begin(), blocks.end());
}

int64_t KvBlockPool::free_blocks() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(free_list_.size());
}

int64_t KvBlockPool::BytesPerBlock() const {
  return 2 * shape_.num_layers * block_tokens_ * shape_.RowSize() * sizeof(float);
}

float* KvBlockPool::K(int32_t block, int64_t layer) {
  const int64_t layer_stride = block_tokens_ * shape_.RowSize();
  return storage_.data() +
         (static_cast<int64_t>(block) * 2 * shape_.num_layers + layer) * layer_stride;
}

float* KvBlockPool::V(int32_t block, int64_t layer) {
  return K(block, layer) + shape_.num_layers * block_tokens_ * shape_.RowSize();
}

PagedKvStore::PagedKvStore(KvBlockPool* pool) : pool_(pool) {}

PagedKvStore::~PagedKvStore() {
  if (!blocks_.empty()) pool_->Free(blocks_);
}

absl::Status PagedKvStore::Reserve(int64_t num_tokens) {
  const int64_t needed = (num_tokens + pool_->block_tokens() - 1) / pool_->block_tokens();
  const int64_t missing = needed - static_cast<int64_t>(blocks_.size());
  if (missing <= 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(const std::vector<int32_t> more, pool_->Allocate(missing));
  blocks_.insert(blocks_.end(), more.begin(), more.end());
  return absl::OkStatus();
}

absl::StatusOr<KvLayerView> PagedKvStore::Layer(int64_t layer, int64_t num_tokens) {
  if (layer < 0 || layer >= pool_->shape().num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("KV layer ", layer, " out of range"));
  }
  RETURN_IF_ERROR(Reserve(num_tokens));
  KvLayerView view;
  view.block_tokens = pool_->block_tokens();
  view.row_size = pool_->shape().RowSize();
  for (int32_t block : blocks_) {
    view.k_blocks.push_back(pool_->K(block, layer));
    view.v_blocks.push_back(pool_->V(block, layer));
  }
  return view;
}

}  // namespace sparseaccel
