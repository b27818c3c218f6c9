#include "decode_service/stream_limit.h"

#include "absl/strings/str_cat.h"

namespace sparseaccel {

ConnectionStreamLimit::Slot::~Slot() {
  if (owner_ != nullptr) owner_->Release(peer_);
}

absl::StatusOr<ConnectionStreamLimit::Slot> ConnectionStreamLimit::Acquire(
    const std::string& peer) {
  absl::MutexLock lock(&mu_);
  int64_t& running = running_[peer];
  if (running >= limit_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("at most ", limit_, " concurrent Generate calls per connection"));
  }
  ++running;
  return Slot(this, peer);
}

int64_t ConnectionStreamLimit::running(const std::string& peer) const {
  absl::MutexLock lock(&mu_);
  auto it = running_.find(peer);
  return it == running_.end() ? 0 : it->second;
}

void ConnectionStreamLimit::Release(const std::string& peer) {
  absl::MutexLock lock(&mu_);
  auto it = running_.find(peer);
  if (--it->second == 0) running_.erase(it);
}

}  // namespace sparseaccel
