#ifndef SPARSEACCEL_DECODE_SERVICE_STREAM_LIMIT_H_
#define SPARSEACCEL_DECODE_SERVICE_STREAM_LIMIT_H_

// At most `limit` calls running at once per client connection (grpc::ServerContext::peer():
// the remote address and port, so one TCP connection). HTTP/2 would let one connection carry
// thousands of streams; over the limit a call is RESOURCE_EXHAUSTED at once, saying so,
// instead of queueing in the decode service.

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace sparseaccel {

class ConnectionStreamLimit {
 public:
  explicit ConnectionStreamLimit(int64_t limit) : limit_(limit) {}

  // One running call; gives its place back when destroyed.
  class Slot {
   public:
    Slot(Slot&& other) noexcept : owner_(other.owner_), peer_(std::move(other.peer_)) {
      other.owner_ = nullptr;
    }
    Slot& operator=(Slot&&) = delete;
    ~Slot();

   private:
    friend class ConnectionStreamLimit;
    Slot(ConnectionStreamLimit* owner, std::string peer) : owner_(owner), peer_(std::move(peer)) {}
    ConnectionStreamLimit* owner_;
    std::string peer_;
  };

  // A slot for a call from `peer`, or RESOURCE_EXHAUSTED when that connection runs `limit`
  // calls already.
  absl::StatusOr<Slot> Acquire(const std::string& peer);

  int64_t running(const std::string& peer) const;

 private:
  void Release(const std::string& peer);

  const int64_t limit_;
  mutable absl::Mutex mu_;
  std::map<std::string, int64_t> running_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_DECODE_SERVICE_STREAM_LIMIT_H_
