#ifndef SPARSEACCEL_DECODE_SERVICE_GENERATE_CALL_H_
#define SPARSEACCEL_DECODE_SERVICE_GENERATE_CALL_H_

// One DecodeService.Generate call whose responses are waited for with a timeout, so the caller
// can look after something else between tokens (the HTTP API checks that its client is still
// there, and cancels the call when it is not). A thread of its own reads the stream.

#include <deque>
#include <memory>
#include <thread>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "proto/sparseaccel.grpc.pb.h"

namespace sparseaccel {

class GenerateCall {
 public:
  // Starts the call; `timeout` is its deadline (InfiniteDuration: none).
  GenerateCall(v1::DecodeService::StubInterface* stub, const v1::GenerateRequest& request,
               absl::Duration timeout);
  // Cancels the call if it still runs and waits for the reader thread.
  ~GenerateCall();
  GenerateCall(const GenerateCall&) = delete;
  GenerateCall& operator=(const GenerateCall&) = delete;

  struct Event {
    enum class Kind { kResponse, kTimeout, kEnd };
    Kind kind = Kind::kTimeout;
    v1::GenerateResponse response;  // kResponse.
    absl::Status status;            // kEnd: how the call ended.
  };
  // The next response, kTimeout when none came within `wait`, or kEnd once all were taken.
  Event WaitNext(absl::Duration wait);

  // Cancels the call (the decode service frees its batch slot); the stream then ends CANCELLED.
  void Cancel() { context_.TryCancel(); }

 private:
  void Read(std::unique_ptr<grpc::ClientReaderInterface<v1::GenerateResponse>> reader);

  grpc::ClientContext context_;
  absl::Mutex mu_;
  std::deque<v1::GenerateResponse> responses_ ABSL_GUARDED_BY(mu_);
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  std::thread reader_;  // Declared last: starts once everything else exists.
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_DECODE_SERVICE_GENERATE_CALL_H_
