#ifndef SPARSEACCEL_MODEL_BACKEND_H_
#define SPARSEACCEL_MODEL_BACKEND_H_

// Picks the compute backend of a service by name: "cpu" (LlamaCpu) or "cuda" (LlamaCuda, in
// builds made where nvcc exists; Unimplemented elsewhere).

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/language_model.h"

namespace sparseaccel {

absl::StatusOr<std::unique_ptr<LanguageModel>> LoadLanguageModel(const std::string& device,
                                                                 const std::string& model_dir);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_BACKEND_H_
