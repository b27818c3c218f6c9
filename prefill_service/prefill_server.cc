#include "prefill_service/prefill_server.h"

#include <thread>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/metrics.h"

namespace sparseaccel {
namespace {

// Unguessable: a FetchKv caller must have seen the header.
std::string NewTransferId() {
  static absl::Mutex mu(absl::kConstInit);
  static absl::BitGen* gen = new absl::BitGen();
  absl::MutexLock lock(&mu);
  return absl::StrFormat("%016x%016x", absl::Uniform<uint64_t>(*gen),
                         absl::Uniform<uint64_t>(*gen));
}

// The last message of the Prefill stream on one stream; with several, sent when the compute ends.
v1::PrefillResponse Trailer(const PrefillStats& stats) {
  v1::PrefillResponse message;
  v1::PrefillTrailer* trailer = message.mutable_trailer();
  trailer->set_first_token(stats.first_token);
  trailer->set_prefill_seconds(stats.seconds);
  trailer->set_kv_bytes(stats.kv_bytes);
  trailer->set_peak_host_memory_bytes(HostPeakResidentBytes());
  trailer->set_peak_gpu_memory_bytes(stats.peak_gpu_bytes);
  return message;
}

}  // namespace

PrefillServer::PrefillServer(PrefillEngine* engine, prometheus::Registry* registry)
    : engine_(engine),
      requests_(prometheus::BuildCounter()
                    .Name("sparseaccel_prefill_requests_total")
                    .Help("Prefill requests by outcome (gRPC status code name).")
                    .Register(*registry)),
      prefill_seconds_(prometheus::BuildHistogram()
                           .Name("sparseaccel_prefill_duration_seconds")
                           .Help("Prefill compute time, by prompt length bucket.")
                           .Register(*registry)),
      kv_bytes_(prometheus::BuildHistogram()
                    .Name("sparseaccel_prefill_kv_sent_bytes")
                    .Help("KV cache bytes streamed per request, by prompt length bucket.")
                    .Register(*registry)),
      peak_memory_(prometheus::BuildHistogram()
                       .Name("sparseaccel_prefill_request_peak_host_memory_bytes")
                       .Help("Peak resident host memory while a request ran, by bucket.")
                       .Register(*registry)),
      peak_gpu_memory_(prometheus::BuildHistogram()
                           .Name("sparseaccel_prefill_peak_gpu_memory_bytes")
                           .Help("Peak GPU memory in use while a request computed, by bucket.")
                           .Register(*registry)),
      active_gauge_(prometheus::BuildGauge()
                        .Name("sparseaccel_prefill_active_requests")
                        .Help("Prefill requests in progress.")
                        .Register(*registry)
                        .Add({})),
      host_memory_(prometheus::BuildGauge()
                       .Name("sparseaccel_host_memory_bytes")
                       .Help("Resident host memory of the process.")
                       .Register(*registry)
                       .Add({{"service", "prefill"}})),
      gpu_memory_(prometheus::BuildGauge()
                      .Name("sparseaccel_gpu_memory_used_bytes")
                      .Help("GPU memory in use on the service's device (all processes).")
                      .Register(*registry)
                      .Add({{"service", "prefill"}})),
      kv_buffers_(prometheus::BuildGauge()
                      .Name("sparseaccel_prefill_kv_host_buffer_bytes")
                      .Help("Host buffers for KV chunks not yet sent, by state (used, free).")
                      .Register(*registry)) {
  UpdateGauges();
}

void PrefillServer::UpdateGauges() {
  host_memory_.Set(static_cast<double>(HostResidentBytes()));
  if (const std::optional<DeviceMemoryStats> memory = engine_->model()->DeviceMemory()) {
    gpu_memory_.Set(static_cast<double>(memory->used));
  }
  const KvHostBuffers& buffers = engine_->host_buffers();
  const double each = 2.0 * static_cast<double>(buffers.bytes_each());
  const int64_t used = buffers.in_use();
  kv_buffers_.Add({{"state", "used"}}).Set(each * static_cast<double>(used));
  kv_buffers_.Add({{"state", "free"}}).Set(each * static_cast<double>(buffers.count() - used));
}

std::shared_ptr<KvStreamWriter> PrefillServer::FindTransfer(const std::string& id) {
  absl::MutexLock lock(&transfers_mu_);
  auto it = transfers_.find(id);
  return it == transfers_.end() ? nullptr : it->second;
}

absl::StatusOr<PrefillStats> PrefillServer::Serve(grpc::ServerContext* context,
                                                  const v1::PrefillRequest& request,
                                                  grpc::ServerWriter<v1::PrefillResponse>* writer) {
  if (absl::Status valid = engine_->Validate(request); !valid.ok()) return valid;
  const int32_t streams = engine_->StreamsFor(request);
  const std::string transfer_id = streams > 1 ? NewTransferId() : std::string();
  std::shared_ptr<KvStreamWriter> kv =
      engine_->NewWriter(request, [context] { return context->IsCancelled(); });
  v1::PrefillResponse header;
  *header.mutable_header() = engine_->Header(request, transfer_id, streams);
  if (!writer->Write(header)) return absl::CancelledError("the caller went away");
  if (!transfer_id.empty()) {
    absl::MutexLock lock(&transfers_mu_);
    transfers_[transfer_id] = kv;
  }
  // The sender thread and the trailer share the Prefill stream; gRPC takes one write at a time.
  // With several streams the Prefill stream stands by: it carries chunks only while no FetchKv
  // stream is attached (none joined, or they reached another replica), so the trailer is not
  // queued behind chunks.
  absl::Mutex write_mu;
  const auto write = [&](const v1::PrefillResponse& m) {
    absl::MutexLock lock(&write_mu);
    return writer->Write(m);
  };
  absl::Status sent;
  std::thread sender([&] {
    sent = kv->SendAll(
        write, streams > 1 ? KvStreamWriter::Role::kStandby : KvStreamWriter::Role::kRegular);
  });
  absl::StatusOr<PrefillStats> stats = engine_->Compute(request, kv.get());
  // With several streams the first token goes out as soon as the compute ends: the decode side
  // streams it to its client while the rest of the KV arrives.
  bool trailer_sent = false;
  if (stats.ok() && streams > 1 && !context->IsCancelled()) {
    trailer_sent = write(Trailer(*stats));
    if (!trailer_sent) kv->Abort(absl::CancelledError("the receiver went away"));
  }
  sender.join();
  if (!transfer_id.empty()) {
    absl::MutexLock lock(&transfers_mu_);
    transfers_.erase(transfer_id);
  }
  if (!stats.ok()) return stats;
  if (context->IsCancelled()) return absl::CancelledError("the caller cancelled the prefill");
  if (!sent.ok()) return sent;
  if (streams > 1 && !trailer_sent) return absl::CancelledError("the receiver went away");
  if (streams == 1 && !writer->Write(Trailer(*stats))) {
    return absl::CancelledError("the receiver went away");
  }
  return stats;
}

grpc::Status PrefillServer::Prefill(grpc::ServerContext* context, const v1::PrefillRequest* request,
                                    grpc::ServerWriter<v1::PrefillResponse>* writer) {
  ++active_;
  active_gauge_.Increment();
  const absl::StatusOr<PrefillStats> stats = Serve(context, *request, writer);
  Record(*request, stats);
  active_gauge_.Decrement();
  --active_;
  return ToGrpcStatus(stats.status());
}

grpc::Status PrefillServer::FetchKv(grpc::ServerContext* context, const v1::KvFetchRequest* request,
                                    grpc::ServerWriter<v1::PrefillResponse>* writer) {
  std::shared_ptr<KvStreamWriter> kv = FindTransfer(request->kv_transfer_id());
  if (kv == nullptr) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("no KV transfer ", request->kv_transfer_id(),
                                     " in progress on this prefill service"));
  }
  return ToGrpcStatus(kv->SendAll([writer, context](const v1::PrefillResponse& m) {
    return !context->IsCancelled() && writer->Write(m);
  }));
}

void PrefillServer::Record(const v1::PrefillRequest& request,
                           const absl::StatusOr<PrefillStats>& stats) {
  const std::string bucket = ContextBucket(request.token_ids_size());
  requests_.Add({{"outcome", OutcomeLabel(stats.status())}}).Increment();
  UpdateGauges();
  if (!stats.ok()) {
    LogWarning("prefill.failed", {{"request_id", request.request_id()},
                                  {"tokens", request.token_ids_size()},
                                  {"status", StatusForLog(stats.status())}});
    return;
  }
  prefill_seconds_.Add({{"context", bucket}}, LatencyBuckets()).Observe(stats->seconds);
  kv_bytes_.Add({{"context", bucket}}, ByteBuckets()).Observe(static_cast<double>(stats->kv_bytes));
  peak_memory_.Add({{"context", bucket}}, ByteBuckets())
      .Observe(static_cast<double>(HostPeakResidentBytes()));
  if (stats->peak_gpu_bytes > 0) {
    peak_gpu_memory_.Add({{"context", bucket}}, ByteBuckets())
        .Observe(static_cast<double>(stats->peak_gpu_bytes));
  }
  LogInfo("prefill.done", {{"request_id", request.request_id()},
                           {"tokens", request.token_ids_size()},
                           {"kv_streams", engine_->StreamsFor(request)},
                           {"seconds", stats->seconds},
                           {"kv_bytes", stats->kv_bytes},
                           {"first_token", stats->first_token}});
}

}  // namespace sparseaccel
