#ifndef SPARSEACCEL_PREFILL_SERVICE_PREFILL_SERVER_H_
#define SPARSEACCEL_PREFILL_SERVICE_PREFILL_SERVER_H_

// The gRPC face of a PrefillEngine. A Prefill call computes in its handler thread while a
// sender thread streams the published KV chunks; with kv_streams > 1 the caller's FetchKv calls
// take chunks from the same writer, so one transfer uses several HTTP/2 streams (and
// connections), and the trailer with the first token goes out as soon as the compute ends, not
// after the last chunk. The engine's host buffers bound what waits for the network: a slow
// receiver slows the prefill instead of growing memory. Records metrics.

#include <atomic>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "prefill_service/prefill_engine.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "proto/sparseaccel.grpc.pb.h"

namespace sparseaccel {

class PrefillServer final : public v1::PrefillService::Service {
 public:
  PrefillServer(PrefillEngine* engine, prometheus::Registry* registry);

  grpc::Status Prefill(grpc::ServerContext* context, const v1::PrefillRequest* request,
                       grpc::ServerWriter<v1::PrefillResponse>* writer) override;
  grpc::Status FetchKv(grpc::ServerContext* context, const v1::KvFetchRequest* request,
                       grpc::ServerWriter<v1::PrefillResponse>* writer) override;

  // Requests being served now.
  int64_t active_requests() const { return active_.load(); }
  // Refreshes the memory gauges (before each scrape).
  void UpdateGauges();

 private:
  absl::StatusOr<PrefillStats> Serve(grpc::ServerContext* context,
                                     const v1::PrefillRequest& request,
                                     grpc::ServerWriter<v1::PrefillResponse>* writer);
  std::shared_ptr<KvStreamWriter> FindTransfer(const std::string& id);
  void Record(const v1::PrefillRequest& request, const absl::StatusOr<PrefillStats>& stats);

  PrefillEngine* engine_;
  std::atomic<int64_t> active_{0};
  absl::Mutex transfers_mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<KvStreamWriter>> transfers_
      ABSL_GUARDED_BY(transfers_mu_);
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& prefill_seconds_;
  prometheus::Family<prometheus::Histogram>& kv_bytes_;
  prometheus::Family<prometheus::Histogram>& peak_memory_;
  prometheus::Family<prometheus::Histogram>& peak_gpu_memory_;
  prometheus::Gauge& active_gauge_;
  prometheus::Gauge& host_memory_;
  prometheus::Gauge& gpu_memory_;
  prometheus::Family<prometheus::Gauge>& kv_buffers_;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_PREFILL_SERVICE_PREFILL_SERVER_H_
