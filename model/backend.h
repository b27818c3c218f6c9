#ifndef SPARSEACCEL_MODEL_BACKEND_H_
#define SPARSEACCEL_MODEL_BACKEND_H_

// Picks the compute backend of a service by name: "cpu" (LlamaCpu) or "cuda" (LlamaCuda, in
// builds made where nvcc exists; Unimplemented elsewhere).

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/sparse/pattern_config.h"
#include "model/language_model.h"
#include "model/sequence_model.h"

namespace sparseaccel {

// The prefill service's model. With `sparse`, prompts of at least sparse->dense_below_tokens
// tokens prefill with each head's dynamic sparse pattern (CPU: SparsePrefillAttention in
// LlamaCpu; CUDA: LlamaCuda's sparse kernels); InvalidArgument when the config does not fit
// the model. `gpus` (cuda only, LlamaCudaOptions::gpus): 0 runs on one GPU, N >= 1 tensor
// parallel over GPUs 0 .. N-1.
absl::StatusOr<std::unique_ptr<LanguageModel>> LoadLanguageModel(
    const std::string& device, const std::string& model_dir,
    std::optional<SparseConfig> sparse = std::nullopt, int64_t gpus = 0);

// What page-locks the host buffers of exported K/V for `device`: null for "cpu" (pageable
// memory is as good there).
std::unique_ptr<HostMemoryPinner> NewHostMemoryPinner(const std::string& device);

// The decode service's K/V pool and batch.
struct SequencePoolOptions {
  int64_t block_tokens = 16;
  int64_t num_blocks = 4096;
  // Most sequences decoded in one step.
  int64_t max_batch = 32;
};

// The decode service's model: on "cpu", LlamaCpu over a host pool (HostSequenceModel); on
// "cuda", LlamaCuda with a device pool of options.num_blocks blocks.
absl::StatusOr<std::unique_ptr<SequenceModel>> LoadSequenceModel(
    const std::string& device, const std::string& model_dir, const SequencePoolOptions& options);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_BACKEND_H_
