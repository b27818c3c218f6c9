#ifndef SPARSEACCEL_PREFILL_SERVICE_PREFILL_SERVER_H_
#define SPARSEACCEL_PREFILL_SERVICE_PREFILL_SERVER_H_

// The gRPC face of a PrefillEngine: streams what the engine emits through a small bounded queue
// (so the next layer computes while the previous one is on the wire, and a slow receiver slows
// the prefill instead of growing memory), and records metrics.

#include <atomic>
#include <memory>

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

  // Requests being served now.
  int64_t active_requests() const { return active_.load(); }

 private:
  PrefillEngine* engine_;
  std::atomic<int64_t> active_{0};
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& prefill_seconds_;
  prometheus::Family<prometheus::Histogram>& kv_bytes_;
  prometheus::Family<prometheus::Histogram>& peak_memory_;
  prometheus::Gauge& active_gauge_;
  prometheus::Gauge& host_memory_;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_PREFILL_SERVICE_PREFILL_SERVER_H_
