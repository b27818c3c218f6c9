#ifndef SPARSEACCEL_MODEL_LANGUAGE_MODEL_H_
#define SPARSEACCEL_MODEL_LANGUAGE_MODEL_H_

// What the serving engines need from a model backend (LlamaCpu, LlamaCuda): run batches of
// sequence chunks against their KV stores, and prefill a prompt exporting its K/V.

#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "model/checkpoint/config.h"
#include "model/kv_cache.h"
#include "model/kv_export.h"

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

  // Prefills `tokens` from position 0, handing each layer's K/V to `exporter` as soon as the
  // layer is computed, and writes the last position's logits (fp32, vocab_size) to
  // `last_logits`. Returns when the compute is done; published slots may still be in flight.
  // This default runs Forward over a one-layer host store (kv_export.cc); the GPU engine
  // copies from the device beside its compute.
  virtual absl::Status PrefillExport(absl::Span<const int32_t> tokens, KvExporter* exporter,
                                     std::vector<float>* last_logits);

  // Device memory of the engine; nullopt for host engines. ResetDevicePeak starts a new
  // high-water mark (per request).
  virtual std::optional<DeviceMemoryStats> DeviceMemory() const { return std::nullopt; }
  virtual void ResetDevicePeak() {}
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_LANGUAGE_MODEL_H_
