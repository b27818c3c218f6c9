#include "prefill_service/prefill_server.h"

#include <thread>

#include "common/bounded_queue.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/metrics.h"

namespace sparseaccel {

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
      active_gauge_(prometheus::BuildGauge()
                        .Name("sparseaccel_prefill_active_requests")
                        .Help("Prefill requests in progress.")
                        .Register(*registry)
                        .Add({})),
      host_memory_(prometheus::BuildGauge()
                       .Name("sparseaccel_host_memory_bytes")
                       .Help("Resident host memory of the process.")
                       .Register(*registry)
                       .Add({{"service", "prefill"}})) {}

grpc::Status PrefillServer::Prefill(grpc::ServerContext* context, const v1::PrefillRequest* request,
                                    grpc::ServerWriter<v1::PrefillResponse>* writer) {
  const std::string bucket = ContextBucket(request->token_ids_size());
  ++active_;
  active_gauge_.Increment();
  // Four messages in flight (about 4 MiB): enough to keep the wire busy while the next layer
  // computes, small enough that a stalled receiver stops the prefill quickly.
  BoundedQueue<v1::PrefillResponse> queue(4);
  std::atomic<bool> write_failed{false};
  std::thread sender([&] {
    while (std::optional<v1::PrefillResponse> message = queue.Pop()) {
      if (!writer->Write(*message)) {
        write_failed = true;
        queue.Close();
        break;
      }
    }
  });
  PrefillEmit emit = [&](v1::PrefillResponse message) -> absl::Status {
    if (context->IsCancelled()) return absl::CancelledError("the caller cancelled the prefill");
    if (!queue.Push(std::move(message))) {
      return absl::CancelledError("the receiver went away during the KV transfer");
    }
    return absl::OkStatus();
  };
  absl::StatusOr<PrefillStats> stats = engine_->Run(*request, emit);
  queue.Close();
  sender.join();
  absl::Status status = stats.status();
  if (status.ok() && write_failed) status = absl::CancelledError("the receiver went away");
  requests_.Add({{"outcome", OutcomeLabel(status)}}).Increment();
  host_memory_.Set(static_cast<double>(HostResidentBytes()));
  if (status.ok()) {
    prefill_seconds_.Add({{"context", bucket}}, LatencyBuckets()).Observe(stats->seconds);
    kv_bytes_.Add({{"context", bucket}}, ByteBuckets())
        .Observe(static_cast<double>(stats->kv_bytes));
    peak_memory_.Add({{"context", bucket}}, ByteBuckets())
        .Observe(static_cast<double>(HostPeakResidentBytes()));
    LogInfo("prefill.done", {{"request_id", request->request_id()},
                             {"tokens", request->token_ids_size()},
                             {"seconds", stats->seconds},
                             {"kv_bytes", stats->kv_bytes},
                             {"first_token", stats->first_token}});
  } else {
    LogWarning("prefill.failed", {{"request_id", request->request_id()},
                                  {"tokens", request->token_ids_size()},
                                  {"status", status.ToString()}});
  }
  active_gauge_.Decrement();
  --active_;
  return ToGrpcStatus(status);
}

}  // namespace sparseaccel
