#include "kv_stream/host_buffers.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/status_macros.h"

namespace sparseaccel {

absl::StatusOr<std::unique_ptr<KvHostBuffers>> KvHostBuffers::Create(int64_t count,
                                                                     int64_t bytes_each,
                                                                     HostMemoryPinner* pinner) {
  if (count < 1 || bytes_each < 1) {
    return absl::InvalidArgumentError(absl::StrCat("KV host buffers: ", count, " x ", bytes_each,
                                                   " bytes; both must be positive"));
  }
  std::unique_ptr<KvHostBuffers> pool(new KvHostBuffers(bytes_each, pinner));
  for (int64_t i = 0; i < count; ++i) {
    pool->buffers_.push_back(std::make_unique<Buffer>());
    Buffer* buffer = pool->buffers_.back().get();
    for (std::string* part : {&buffer->k, &buffer->v}) {
      part->resize(bytes_each);
      if (pinner == nullptr) continue;
      RETURN_IF_ERROR(pinner->Pin(part->data(), part->size()));
      pool->pinned_.push_back(part->data());
    }
    pool->free_.push_back(buffer);
  }
  return pool;
}

KvHostBuffers::~KvHostBuffers() {
  for (void* data : pinned_) pinner_->Unpin(data);
}

absl::StatusOr<KvHostBuffers::Buffer*> KvHostBuffers::Acquire(
    const std::function<bool()>& abandoned) {
  absl::MutexLock lock(&mu_);
  const absl::Condition available(
      +[](KvHostBuffers* pool) ABSL_NO_THREAD_SAFETY_ANALYSIS { return !pool->free_.empty(); },
      this);
  while (!mu_.AwaitWithTimeout(available, absl::Milliseconds(5))) {
    if (abandoned && abandoned()) {
      return absl::CancelledError("the KV transfer was abandoned while waiting for host buffers");
    }
  }
  Buffer* buffer = free_.back();
  free_.pop_back();
  peak_in_use_ = std::max(peak_in_use_, count() - static_cast<int64_t>(free_.size()));
  return buffer;
}

void KvHostBuffers::Release(Buffer* buffer) {
  // Within the capacity: no reallocation, the pinned pages stay.
  buffer->k.resize(bytes_each_);
  buffer->v.resize(bytes_each_);
  absl::MutexLock lock(&mu_);
  free_.push_back(buffer);
}

int64_t KvHostBuffers::in_use() const {
  absl::MutexLock lock(&mu_);
  return count() - static_cast<int64_t>(free_.size());
}

int64_t KvHostBuffers::peak_in_use() const {
  absl::MutexLock lock(&mu_);
  return peak_in_use_;
}

}  // namespace sparseaccel
