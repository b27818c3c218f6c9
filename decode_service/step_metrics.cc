#include "decode_service/step_metrics.h"

#include <vector>

#include "absl/strings/str_cat.h"

namespace sparseaccel {
namespace {

// 0.5 ms to 1 s: a decode step of an 8B model is a few to a few tens of milliseconds.
const std::vector<double>& StepBuckets() {
  static const std::vector<double> buckets = {0.0005, 0.001, 0.002, 0.003, 0.004, 0.005,
                                              0.006,  0.007, 0.008, 0.01,  0.012, 0.015,
                                              0.02,   0.03,  0.05,  0.1,   0.2,   1};
  return buckets;
}

}  // namespace

DecodeStepMetrics::DecodeStepMetrics(prometheus::Registry* registry)
    : model_(prometheus::BuildHistogram()
                 .Name("sparseaccel_decode_step_seconds")
                 .Help("Model time of one decode step (one token for each sequence of the "
                       "batch), by batch size bucket.")
                 .Register(*registry)),
      interval_(prometheus::BuildHistogram()
                    .Name("sparseaccel_decode_step_interval_seconds")
                    .Help("Start of one decode step to the start of the next while sequences "
                          "run, by batch size bucket of the earlier step.")
                    .Register(*registry)) {}

std::string DecodeStepMetrics::BatchBucket(int64_t batch) {
  if (batch <= 1) return "1";
  int64_t upper = 4;
  while (upper < batch && upper < 64) upper *= 2;
  if (batch > upper) return "65+";
  return absl::StrCat(upper == 4 ? 2 : upper / 2 + 1, "-", upper);
}

void DecodeStepMetrics::Observe(const DecodeStepTiming& timing) {
  const std::string bucket = BatchBucket(timing.batch);
  model_.Add({{"batch", bucket}}, StepBuckets()).Observe(timing.model_seconds);
  if (timing.interval_seconds > 0) {
    interval_.Add({{"batch", bucket}}, StepBuckets()).Observe(timing.interval_seconds);
  }
}

}  // namespace sparseaccel
