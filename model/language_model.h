#ifndef SPARSEACCEL_MODEL_LANGUAGE_MODEL_H_
#define SPARSEACCEL_MODEL_LANGUAGE_MODEL_H_

// What the serving engines need from a model backend (the CPU reference engine today; a GPU
// engine implements the same): run batches of sequence chunks against their KV stores.

#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "model/config.h"
#include "model/kv_cache.h"

namespace sparseaccel {

// Which positions of a chunk produce logits.
enum class LogitsFor { kNone, kLast, kAll };

// A run of consecutive tokens of one sequence: tokens[i] sits at position start_pos + i;
// positions [0, start_pos) are already in `kv`.
struct SequenceChunk {
  absl::Span<const int32_t> tokens;
  int64_t start_pos = 0;
  KvStore* kv = nullptr;
  LogitsFor logits = LogitsFor::kLast;
};

class LanguageModel {
 public:
  virtual ~LanguageModel() = default;
  virtual const ModelConfig& config() const = 0;
  virtual KvShape kv_shape() const = 0;
  // Runs the chunks as one batch. Logits rows are appended to `logits` in chunk order
  // ([rows][vocab_size]). Thread-safe. InvalidArgument for token ids out of range or positions
  // beyond max_position_embeddings; errors from a KvStore are returned as they are.
  virtual absl::Status Forward(absl::Span<const SequenceChunk> batch,
                               std::vector<float>* logits) = 0;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_LANGUAGE_MODEL_H_
