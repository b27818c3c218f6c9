#ifndef SPARSEACCEL_COMMON_BOUNDED_QUEUE_H_
#define SPARSEACCEL_COMMON_BOUNDED_QUEUE_H_

// A blocking FIFO of bounded capacity between one producer and one consumer: Push waits while
// the queue is full (backpressure), Pop waits while it is empty; Close wakes both for good.

#include <deque>
#include <optional>
#include <utility>

#include "absl/synchronization/mutex.h"

namespace sparseaccel {

template <typename T>
class BoundedQueue {
 public:
  explicit BoundedQueue(size_t capacity) : capacity_(capacity) {}

  // False (dropping `item`) once the queue is closed.
  bool Push(T item) {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](BoundedQueue* q) { return q->closed_ || q->items_.size() < q->capacity_; }, this));
    if (closed_) return false;
    items_.push_back(std::move(item));
    return true;
  }

  // The next item, or nullopt once the queue is closed and drained.
  std::optional<T> Pop() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](BoundedQueue* q) { return q->closed_ || !q->items_.empty(); }, this));
    if (items_.empty()) return std::nullopt;
    T item = std::move(items_.front());
    items_.pop_front();
    return item;
  }

  void Close() {
    absl::MutexLock lock(&mu_);
    closed_ = true;
  }

 private:
  const size_t capacity_;
  absl::Mutex mu_;
  std::deque<T> items_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_COMMON_BOUNDED_QUEUE_H_
