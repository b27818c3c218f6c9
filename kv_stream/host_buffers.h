#ifndef SPARSEACCEL_KV_STREAM_HOST_BUFFERS_H_
#define SPARSEACCEL_KV_STREAM_HOST_BUFFERS_H_

// The host memory of KV chunks in flight: a fixed set of equal buffers shared by every transfer
// of a process, so the bytes waiting for the network never exceed count x bytes. A buffer holds
// one chunk's K and V as two std::strings: a message takes them by swapping (no copy), and the
// GPU build page-locks them so device copies run at full speed and asynchronously.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "model/kv_export.h"

namespace sparseaccel {

class KvHostBuffers {
 public:
  struct Buffer {
    std::string k, v;
  };

  // `count` buffers of `bytes_each` bytes for K and as many for V; `pinner` may be null
  // (pageable memory) and must outlive the buffers.
  static absl::StatusOr<std::unique_ptr<KvHostBuffers>> Create(int64_t count, int64_t bytes_each,
                                                               HostMemoryPinner* pinner);
  ~KvHostBuffers();
  KvHostBuffers(const KvHostBuffers&) = delete;
  KvHostBuffers& operator=(const KvHostBuffers&) = delete;

  // A free buffer, its strings bytes_each() long. Waits while every buffer is out; Cancelled
  // once `abandoned()` (polled every few milliseconds) is true.
  absl::StatusOr<Buffer*> Acquire(const std::function<bool()>& abandoned);
  // Gives a buffer back (its strings may have been shortened; they are restored).
  void Release(Buffer* buffer);

  int64_t count() const { return static_cast<int64_t>(buffers_.size()); }
  int64_t bytes_each() const { return bytes_each_; }
  int64_t in_use() const;
  // Most buffers out at once since creation.
  int64_t peak_in_use() const;

 private:
  KvHostBuffers(int64_t bytes_each, HostMemoryPinner* pinner)
      : bytes_each_(bytes_each), pinner_(pinner) {}

  const int64_t bytes_each_;
  HostMemoryPinner* const pinner_;
  std::vector<std::unique_ptr<Buffer>> buffers_;
  std::vector<void*> pinned_;  // What the destructor unpins.
  mutable absl::Mutex mu_;
  std::vector<Buffer*> free_ ABSL_GUARDED_BY(mu_);
  int64_t peak_in_use_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KV_STREAM_HOST_BUFFERS_H_
