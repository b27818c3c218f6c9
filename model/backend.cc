#include "model/backend.h"

#include "absl/strings/str_cat.h"
#include "model/llama_cpu.h"
#ifdef SPARSEACCEL_WITH_CUDA
#include "model/llama_cuda.h"
#endif

namespace sparseaccel {

absl::StatusOr<std::unique_ptr<LanguageModel>> LoadLanguageModel(const std::string& device,
                                                                 const std::string& model_dir) {
  if (device == "cpu") {
    absl::StatusOr<std::unique_ptr<LlamaCpu>> model = LlamaCpu::Load(model_dir);
    if (!model.ok()) return model.status();
    return std::unique_ptr<LanguageModel>(std::move(model).value());
  }
  if (device == "cuda") {
#ifdef SPARSEACCEL_WITH_CUDA
    absl::StatusOr<std::unique_ptr<LlamaCuda>> model = LlamaCuda::Load(model_dir);
    if (!model.ok()) return model.status();
    return std::unique_ptr<LanguageModel>(std::move(model).value());
#else
    return absl::UnimplementedError("--device=cuda: this build has no CUDA backend (no nvcc)");
#endif
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown --device '", device, "' (cpu, cuda)"));
}

}  // namespace sparseaccel
