#ifndef SPARSEACCEL_MODEL_SEQUENCE_MODEL_H_
#define SPARSEACCEL_MODEL_SEQUENCE_MODEL_H_

// What the decode service needs from a model backend: sequences whose K/V live with the model
// (host blocks for the CPU engine, the device pool for the GPU engine, so a decode step moves
// no context), filled from K/V rows computed elsewhere and stepped together one token each,
// the next tokens sampled by the model. Implementations: HostSequenceModel (over any
// LanguageModel), LlamaCuda.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/sampling.h"
#include "model/checkpoint/config.h"
#include "model/kv_cache.h"

namespace sparseaccel {

class SequenceModel {
 public:
  virtual ~SequenceModel() = default;
  virtual const ModelConfig& config() const = 0;
  virtual KvShape kv_shape() const = 0;

  // The K/V pool sequences draw blocks from: positions per block, blocks in all, and bytes per
  // block (K and V of every layer).
  virtual int64_t kv_block_tokens() const = 0;
  virtual int64_t kv_pool_blocks() const = 0;
  virtual int64_t kv_block_bytes() const = 0;

  // A new sequence of `length` positions whose K/V WriteKv fills before it decodes; blocks for
  // later positions are taken from the pool as decoding reaches them. ResourceExhausted when
  // the pool lacks the blocks for `length`; InvalidArgument beyond max_position_embeddings.
  virtual absl::StatusOr<int64_t> ImportSequence(int64_t length) = 0;

  // Writes positions [first, first + count) of `layer` of sequence `id`: `k` and `v` each hold
  // `count` rows of kv_shape().RowSize() values of `dtype`, position-major (the KV wire
  // layout). The positions must lie within the imported length.
  virtual absl::Status WriteKv(int64_t id, int64_t layer, int64_t first, int64_t count,
                               KvDtype dtype, const void* k, const void* v) = 0;

  // Appends tokens[i] to sequence ids[i] (all in one batch) and samples each one's next token
  // into (*next)[i], exactly as SampleTokenCpu does for params[i] at draw steps[i].
  virtual absl::Status DecodeAndSample(absl::Span<const int64_t> ids,
                                       absl::Span<const int32_t> tokens,
                                       absl::Span<const SamplingParams> params,
                                       absl::Span<const uint64_t> steps,
                                       std::vector<int32_t>* next) = 0;

  // Called once every WriteKv of the sequence has been made: returns when the rows are in the
  // pool (the GPU engine's uploads run asynchronously).
  virtual absl::Status FinishImport(int64_t id) {
    (void)id;
    return absl::OkStatus();
  }

  // Device memory of the engine; nullopt for host engines.
  virtual std::optional<DeviceMemoryStats> DeviceMemory() const { return std::nullopt; }

  // Returns the sequence's blocks to the pool.
  virtual absl::Status EndSequence(int64_t id) = 0;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_SEQUENCE_MODEL_H_
