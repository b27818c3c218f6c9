#ifndef SPARSEACCEL_PROTO_SAMPLING_H_
#define SPARSEACCEL_PROTO_SAMPLING_H_

// The wire SamplingParams <-> the kernels' SamplingParams, validated the same way by both
// services.

#include "absl/status/status.h"
#include "kernels/sampling.h"
#include "proto/sparseaccel.pb.h"

namespace sparseaccel {

// InvalidArgument for a negative or non-finite temperature, negative top_k, top_p outside [0, 1].
absl::Status ValidateSampling(const v1::SamplingParams& params);

// top_p 0 (unset) means no nucleus cut.
SamplingParams ToSamplingParams(const v1::SamplingParams& params);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_PROTO_SAMPLING_H_
