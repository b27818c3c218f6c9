#ifndef SPARSEACCEL_MODEL_CHECKPOINT_FINGERPRINT_H_
#define SPARSEACCEL_MODEL_CHECKPOINT_FINGERPRINT_H_

#include <string>

#include "absl/status/statusor.h"

namespace sparseaccel {

// A stable 64-bit FNV-1a hash (16 hex digits) of a checkpoint directory's config.json and of
// every tensor's name, dtype, shape and first and last bytes: two services agree on it exactly
// when they serve the same model, without reading gigabytes of weights.
absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_CHECKPOINT_FINGERPRINT_H_
