#include "decode_service/generate_call.h"

#include <utility>

#include "common/grpc_util.h"

namespace sparseaccel {

GenerateCall::GenerateCall(v1::DecodeService::StubInterface* stub,
                           const v1::GenerateRequest& request, absl::Duration timeout) {
  if (timeout != absl::InfiniteDuration()) {
    context_.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }
  reader_ = std::thread(&GenerateCall::Read, this, stub->Generate(&context_, request));
}

GenerateCall::~GenerateCall() {
  Cancel();
  reader_.join();
}

void GenerateCall::Read(std::unique_ptr<grpc::ClientReaderInterface<v1::GenerateResponse>> reader) {
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    absl::MutexLock lock(&mu_);
    responses_.push_back(std::move(response));
    response.Clear();
  }
  const absl::Status status = FromGrpcStatus(reader->Finish());
  absl::MutexLock lock(&mu_);
  status_ = status;
  ended_ = true;
}

GenerateCall::Event GenerateCall::WaitNext(absl::Duration wait) {
  absl::MutexLock lock(&mu_);
  const auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !responses_.empty() || ended_;
  };
  Event event;
  if (!mu_.AwaitWithTimeout(absl::Condition(&ready), wait)) return event;
  if (!responses_.empty()) {
    event.kind = Event::Kind::kResponse;
    event.response = std::move(responses_.front());
    responses_.pop_front();
  } else {
    event.kind = Event::Kind::kEnd;
    event.status = status_;
  }
  return event;
}

}  // namespace sparseaccel
