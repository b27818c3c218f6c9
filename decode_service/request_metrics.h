#ifndef SPARSEACCEL_DECODE_SERVICE_REQUEST_METRICS_H_
#define SPARSEACCEL_DECODE_SERVICE_REQUEST_METRICS_H_

// The decode service's Prometheus metrics of Generate requests (outcomes, TTFT, inter-token
// latency, prefill and KV transfer by context-length bucket) and of its pool, queue, batch and
// memory gauges: every name and help text in one place, registered once per registry.

#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace sparseaccel {

struct DecodeRequestMetrics {
  explicit DecodeRequestMetrics(prometheus::Registry* registry);

  prometheus::Family<prometheus::Counter>& requests;
  prometheus::Family<prometheus::Histogram>& ttft;
  prometheus::Family<prometheus::Histogram>& itl;
  prometheus::Family<prometheus::Histogram>& e2e;
  prometheus::Family<prometheus::Histogram>& prefill_seconds;
  prometheus::Family<prometheus::Histogram>& kv_seconds;
  prometheus::Family<prometheus::Histogram>& kv_bytes;
  prometheus::Family<prometheus::Gauge>& pool_blocks;
  prometheus::Gauge& queue_depth;
  prometheus::Gauge& running;
  prometheus::Family<prometheus::Gauge>& pool_bytes;
  prometheus::Gauge& host_memory;
  prometheus::Gauge& gpu_memory;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_DECODE_SERVICE_REQUEST_METRICS_H_
