#ifndef SPARSEACCEL_DECODE_SERVICE_STEP_METRICS_H_
#define SPARSEACCEL_DECODE_SERVICE_STEP_METRICS_H_

// Prometheus histograms of the decode scheduler's steps, by batch size bucket: the model call
// (sparseaccel_decode_step_seconds) and the start-to-start interval of consecutive steps
// (sparseaccel_decode_step_interval_seconds). Next to the inter-token latency the clients see,
// they split a token's time into the model's step, the scheduler's work between steps and
// delivery to the client.

#include <cstdint>
#include <string>

#include "decode_service/decode_engine.h"
#include "prometheus/family.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace sparseaccel {

class DecodeStepMetrics {
 public:
  explicit DecodeStepMetrics(prometheus::Registry* registry);

  // For DecodeEngineOptions::on_step (scheduler thread).
  void Observe(const DecodeStepTiming& timing);

  // "1", "2-4", "5-8", "9-16", "17-32", "33-64", "65+".
  static std::string BatchBucket(int64_t batch);

 private:
  prometheus::Family<prometheus::Histogram>& model_;
  prometheus::Family<prometheus::Histogram>& interval_;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_DECODE_SERVICE_STEP_METRICS_H_
