#include "proto/sampling.h"

#include <cmath>

namespace sparseaccel {

absl::Status ValidateSampling(const v1::SamplingParams& s) {
  if (!std::isfinite(s.temperature()) || s.temperature() < 0) {
    return absl::InvalidArgumentError("sampling.temperature must be finite and >= 0");
  }
  if (s.top_k() < 0) return absl::InvalidArgumentError("sampling.top_k must be >= 0");
  if (!(s.top_p() >= 0 && s.top_p() <= 1)) {
    return absl::InvalidArgumentError("sampling.top_p must be in [0, 1]");
  }
  return absl::OkStatus();
}

SamplingParams ToSamplingParams(const v1::SamplingParams& s) {
  return SamplingParams{s.temperature(), s.top_k(), s.top_p() == 0 ? 1.0f : s.top_p(), s.seed()};
}

}  // namespace sparseaccel
