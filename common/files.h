#ifndef SPARSEACCEL_COMMON_FILES_H_
#define SPARSEACCEL_COMMON_FILES_H_

#include <string>

#include "absl/status/statusor.h"

namespace sparseaccel {

// The whole file at `path`, bytes as they are. NotFound when it cannot be opened, DataLoss when
// reading it fails; both name the path.
absl::StatusOr<std::string> ReadFile(const std::string& path);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_COMMON_FILES_H_
