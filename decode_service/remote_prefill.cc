#include "decode_service/remote_prefill.h"

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/grpc_util.h"
#include "common/status_macros.h"
#include "kv_stream/kv_stream.h"

namespace sparseaccel {
namespace {

using Clock = std::chrono::steady_clock;

// How a transfer ends when the decode service's own client has gone.
absl::Status ClientWentAway() { return absl::CancelledError("client went away during prefill"); }

// The calls of one transfer: the first failure wins and cancels every call.
class CallGroup {
 public:
  explicit CallGroup(grpc::ServerContext* client) : client_(client) {}

  grpc::ClientContext* NewCall() {
    absl::MutexLock lock(&mu_);
    return NewCallLocked();
  }
  // A FetchKv call, open until FetchEnded. It waits for its connection instead of failing at
  // once: a channel still connecting (or reconnecting) must not fail a transfer that the other
  // streams carry.
  grpc::ClientContext* NewFetchCall() {
    absl::MutexLock lock(&mu_);
    grpc::ClientContext* call = NewCallLocked();
    call->set_wait_for_ready(true);
    ++open_fetches_;
    return call;
  }
  // A FetchKv call ended with `status`, which fails the transfer unless it is OK or the
  // fetches were ended (EndFetches cancelled it).
  void FetchEnded(absl::Status status) {
    absl::MutexLock lock(&mu_);
    --open_fetches_;
    if (!status.ok() && !fetches_ended_) FailLocked(std::move(status));
  }
  // Every row of the transfer has arrived (KvStreamReader::AllRowsArrived).
  void AllRowsArrived() {
    absl::MutexLock lock(&mu_);
    all_rows_ = true;
  }
  // After the Prefill stream: waits until every FetchKv call has ended, every row has arrived
  // or the transfer failed. FetchKv calls still open then carry nothing more (one may still
  // be connecting) and are cancelled; that is not a failure. Fails the transfer (Cancelled)
  // if the client goes away meanwhile.
  void EndFetches() {
    absl::MutexLock lock(&mu_);
    const absl::Condition settled(this, &CallGroup::FetchesSettled);
    while (!mu_.AwaitWithTimeout(settled, absl::Milliseconds(100))) {
      if (client_->IsCancelled()) {
        FailLocked(ClientWentAway());
        return;
      }
    }
    fetches_ended_ = true;
    for (const auto& call : calls_) call->TryCancel();
  }
  void Fail(absl::Status status) {
    absl::MutexLock lock(&mu_);
    FailLocked(std::move(status));
  }
  // Fails the group (Cancelled) once the client has gone; false then.
  bool ClientStillThere() {
    if (!client_->IsCancelled()) return true;
    Fail(ClientWentAway());
    return false;
  }
  absl::Status failure() {
    absl::MutexLock lock(&mu_);
    return failure_;
  }

 private:
  grpc::ClientContext* NewCallLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    calls_.push_back(std::make_unique<grpc::ClientContext>());
    calls_.back()->set_deadline(client_->deadline());
    if (!failure_.ok() || fetches_ended_) calls_.back()->TryCancel();
    return calls_.back().get();
  }
  void FailLocked(absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (failure_.ok()) failure_ = std::move(status);
    for (const auto& call : calls_) call->TryCancel();
  }
  bool FetchesSettled() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return open_fetches_ == 0 || all_rows_ || !failure_.ok();
  }

  grpc::ServerContext* const client_;
  absl::Mutex mu_;
  std::vector<std::unique_ptr<grpc::ClientContext>> calls_ ABSL_GUARDED_BY(mu_);
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
  int open_fetches_ ABSL_GUARDED_BY(mu_) = 0;
  bool all_rows_ ABSL_GUARDED_BY(mu_) = false;
  bool fetches_ended_ ABSL_GUARDED_BY(mu_) = false;
};

// Passes a chunk to `kv`, and tells `group` once every row has arrived.
absl::Status DeliverChunk(const v1::KvChunk& chunk, KvStreamReader* kv, CallGroup* group) {
  RETURN_IF_ERROR(kv->OnChunk(chunk));
  if (kv->AllRowsArrived()) group->AllRowsArrived();
  return absl::OkStatus();
}

// How a failed Prefill or FetchKv call ends the request: request errors pass through,
// transport failures become UNAVAILABLE. `call` names the call for the message.
absl::Status RemoteCallFailure(const grpc::Status& status, grpc::ServerContext* client,
                               absl::string_view call) {
  absl::Status remote = FromGrpcStatus(status);
  if (client->IsCancelled()) return ClientWentAway();
  if (remote.code() == absl::StatusCode::kInvalidArgument ||
      remote.code() == absl::StatusCode::kFailedPrecondition ||
      remote.code() == absl::StatusCode::kDeadlineExceeded) {
    return remote;
  }
  return absl::UnavailableError(absl::StrCat(call, " failed: ", remote.ToString()));
}

// Reads one FetchKv stream of the transfer into `kv` until it ends; `call` is from
// group->NewFetchCall().
void ReadFetchStream(v1::PrefillService::Stub* stub, grpc::ClientContext* call,
                     const std::string& transfer_id, const std::string& address,
                     grpc::ServerContext* client, KvStreamReader* kv, CallGroup* group) {
  v1::KvFetchRequest request;
  request.set_kv_transfer_id(transfer_id);
  std::unique_ptr<grpc::ClientReader<v1::PrefillResponse>> reader = stub->FetchKv(call, request);
  v1::PrefillResponse message;
  while (reader->Read(&message) && group->ClientStillThere()) {
    const absl::Status status = message.has_kv()
                                    ? DeliverChunk(message.kv(), kv, group)
                                    : absl::DataLossError("FetchKv sent something else than KV");
    if (!status.ok()) {
      group->Fail(status);
      break;
    }
  }
  const grpc::Status finished = reader->Finish();
  // NOT_FOUND: the transfer was over before this stream joined, or the call reached another
  // replica behind the same address; the other streams carry the chunks (Complete checks).
  group->FetchEnded(
      finished.ok() || finished.error_code() == grpc::StatusCode::NOT_FOUND
          ? absl::OkStatus()
          : RemoteCallFailure(finished, client,
                              absl::StrCat("KV stream from prefill service ", address)));
}

absl::Status WithAddress(const absl::Status& status, const std::string& address) {
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat("prefill service ", address, ": ", status.message()));
}

using Stubs = std::vector<std::unique_ptr<v1::PrefillService::Stub>>;

// The messages of one Prefill stream: the header (which starts a FetchKv stream per extra
// stub), KV chunks and the trailer with the first token.
class PrefillStream {
 public:
  PrefillStream(const std::string& address, const Stubs& stubs, grpc::ServerContext* client,
                KvStreamReader* kv, CallGroup* group, int64_t vocab_size,
                const std::function<bool(int32_t)>& first_token, RemotePrefillResult* result)
      : address_(address),
        stubs_(stubs),
        client_(client),
        kv_(kv),
        group_(group),
        vocab_size_(vocab_size),
        first_token_(first_token),
        result_(result) {}
  ~PrefillStream() { JoinFetchers(); }

  absl::Status Handle(const v1::PrefillResponse& message) {
    switch (message.kind_case()) {
      case v1::PrefillResponse::kHeader:
        return OnHeader(message.header());
      case v1::PrefillResponse::kKv:
        return DeliverChunk(message.kv(), kv_, group_);
      case v1::PrefillResponse::kTrailer:
        return OnTrailer(message.trailer());
      default:
        return absl::DataLossError("unknown prefill message");
    }
  }
  // Waits for the FetchKv streams to end.
  void JoinFetchers() {
    for (std::thread& fetcher : fetchers_) fetcher.join();
    fetchers_.clear();
  }
  bool have_trailer() const { return have_trailer_; }
  Clock::time_point header_at() const { return header_at_; }

 private:
  absl::Status OnHeader(const v1::PrefillHeader& header) {
    RETURN_IF_ERROR(WithAddress(kv_->OnHeader(header), address_));
    header_at_ = Clock::now();
    const int32_t streams = std::min<int32_t>(header.kv_streams(), stubs_.size());
    for (int32_t i = 1; i < streams && !header.kv_transfer_id().empty(); ++i) {
      fetchers_.emplace_back(ReadFetchStream, stubs_[i].get(), group_->NewFetchCall(),
                             header.kv_transfer_id(), address_, client_, kv_, group_);
    }
    return absl::OkStatus();
  }
  absl::Status OnTrailer(const v1::PrefillTrailer& trailer) {
    if (have_trailer_) return absl::DataLossError("a second prefill trailer");
    result_->first_token = trailer.first_token();
    result_->prefill_seconds = trailer.prefill_seconds();
    result_->peak_gpu_bytes = trailer.peak_gpu_memory_bytes();
    have_trailer_ = true;
    if (result_->first_token < 0 || result_->first_token >= vocab_size_) {
      return absl::DataLossError("prefill returned an invalid first token");
    }
    if (!first_token_(result_->first_token)) {
      return absl::CancelledError("generation ended with the first token");
    }
    return absl::OkStatus();
  }

  const std::string& address_;
  const Stubs& stubs_;
  grpc::ServerContext* const client_;
  KvStreamReader* const kv_;
  CallGroup* const group_;
  const int64_t vocab_size_;
  const std::function<bool(int32_t)>& first_token_;
  RemotePrefillResult* const result_;
  std::vector<std::thread> fetchers_;
  bool have_trailer_ = false;
  Clock::time_point header_at_ = Clock::now();
};

}  // namespace

constexpr int kInitialReconnectBackoffMs = 100;
constexpr int kMaxReconnectBackoffMs = 1000;

RemotePrefillClient::RemotePrefillClient(RemotePrefillOptions options)
    : options_(std::move(options)) {
  for (const std::string& address : options_.addresses) {
    Target target{address, {}};
    for (int32_t i = 0; i < std::max(1, options_.kv_streams); ++i) {
      grpc::ChannelArguments args;
      args.SetMaxReceiveMessageSize(64 << 20);
      // An address that resolves to several prefill pods (a headless Service) spreads over all.
      args.SetLoadBalancingPolicyName("round_robin");
      // A connection of its own per stream: one TCP connection tops out below what the
      // streams together carry.
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
      // A restarted prefill pod is back in seconds: reconnect within kMaxReconnectBackoffMs
      // instead of gRPC's default backoff of up to 120 s, during which every call fails fast
      // with UNAVAILABLE (measured by tests/soak_test.py).
      args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, kInitialReconnectBackoffMs);
      args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, kInitialReconnectBackoffMs);
      args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, kMaxReconnectBackoffMs);
      if (options_.receive_window_bytes > 0) {
        args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, options_.receive_window_bytes);
        args.SetInt(GRPC_ARG_HTTP2_MAX_FRAME_SIZE,
                    std::min(options_.receive_window_bytes, (1 << 24) - 1));
      }
      if (!options_.tls_server_name.empty()) {
        args.SetSslTargetNameOverride(options_.tls_server_name);
      }
      target.stubs.push_back(v1::PrefillService::NewStub(grpc::CreateCustomChannel(
          address, options_.credentials ? options_.credentials : grpc::InsecureChannelCredentials(),
          args)));
    }
    targets_.push_back(std::move(target));
  }
}

absl::StatusOr<RemotePrefillResult> RemotePrefillClient::Run(
    grpc::ServerContext* client, const std::string& request_id, const std::vector<int32_t>& prompt,
    const v1::SamplingParams& sampling, DecodeEngine* engine, DecodeSequence* sequence,
    const std::function<bool(int32_t)>& first_token) {
  if (targets_.empty()) return absl::UnavailableError("no prefill service configured");
  const Target& target = targets_[next_++ % targets_.size()];
  RemotePrefillResult result;
  result.address = target.address;
  CallGroup group(client);
  KvStreamReader kv(engine->model().kv_shape(), static_cast<int64_t>(prompt.size()),
                    options_.model_fingerprint,
                    [engine, sequence](int64_t layer, int64_t first, int64_t count, KvDtype dtype,
                                       const void* k, const void* v) {
                      return engine->WriteKv(sequence, layer, first, count, dtype, k, v);
                    });
  v1::PrefillRequest request;
  request.set_request_id(request_id);
  *request.mutable_token_ids() = {prompt.begin(), prompt.end()};
  *request.mutable_sampling() = sampling;
  request.set_expected_model_fingerprint(options_.model_fingerprint);
  request.set_kv_streams(static_cast<int32_t>(target.stubs.size()));
  request.set_kv_checksum(v1::KV_CHECKSUM_XXH3_64);
  PrefillStream stream(target.address, target.stubs, client, &kv, &group,
                       engine->model().config().vocab_size, first_token, &result);
  std::unique_ptr<grpc::ClientReader<v1::PrefillResponse>> reader =
      target.stubs[0]->Prefill(group.NewCall(), request);
  v1::PrefillResponse message;
  while (group.failure().ok() && reader->Read(&message) && group.ClientStillThere()) {
    if (absl::Status handled = stream.Handle(message); !handled.ok()) group.Fail(handled);
  }
  const grpc::Status status = reader->Finish();
  if (!status.ok()) {
    group.Fail(RemoteCallFailure(status, client, absl::StrCat("prefill service ", target.address)));
  } else if (!stream.have_trailer()) {
    group.Fail(absl::UnavailableError(
        absl::StrCat("prefill stream from ", target.address, " ended early")));
  }
  group.EndFetches();
  stream.JoinFetchers();
  RETURN_IF_ERROR(group.failure());
  RETURN_IF_ERROR(WithAddress(kv.Complete(), target.address));
  RETURN_IF_ERROR(engine->FinishImport(sequence));
  result.kv_seconds = std::chrono::duration<double>(Clock::now() - stream.header_at()).count();
  result.kv_bytes = kv.bytes();
  return result;
}

}  // namespace sparseaccel
