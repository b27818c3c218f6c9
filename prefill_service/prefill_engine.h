#ifndef SPARSEACCEL_PREFILL_SERVICE_PREFILL_ENGINE_H_
#define SPARSEACCEL_PREFILL_SERVICE_PREFILL_ENGINE_H_

// Runs a prompt through the model and hands out its KV cache layer by layer as PrefillResponse
// messages (header, KV chunks, trailer), holding only one layer's K/V at a time. No network:
// the gRPC layer (prefill_server.h) forwards what it emits.

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "model/language_model.h"
#include "model/sequence_model.h"
#include "proto/sparseaccel.pb.h"

namespace sparseaccel {

struct PrefillEngineOptions {
  // Longest prompt accepted (also bounded by the model's max_position_embeddings).
  int64_t max_prompt_tokens = 8192;
  // Target size of one KvChunk message (k + v); a layer is split into several chunks.
  int64_t chunk_bytes = 1 << 20;
  // Element type of K/V on the wire. bf16 halves the bytes; it loses nothing for the GPU
  // engine, whose K/V are bf16 (its fp32 rows are exact bf16 values), and rounds the CPU
  // engine's fp32 K/V (to nearest even).
  KvDtype kv_dtype = KvDtype::kF32;
};

struct PrefillStats {
  int32_t first_token = 0;
  double seconds = 0;
  int64_t kv_bytes = 0;
  int64_t layers_sent = 0;
};

// Receives each message in order; an error (e.g. the receiver went away) stops the prefill.
using PrefillEmit = std::function<absl::Status(v1::PrefillResponse)>;

// CRC-32 of `k` then `v`, as KvChunk.crc32 carries it.
uint32_t KvChunkCrc(const std::string& k, const std::string& v);

class PrefillEngine {
 public:
  PrefillEngine(LanguageModel* model, std::string fingerprint, PrefillEngineOptions options);

  // InvalidArgument for empty or over-long prompts, unknown token ids, bad sampling values;
  // FailedPrecondition for a fingerprint mismatch.
  absl::Status Validate(const v1::PrefillRequest& request) const;

  // Emits the header, the KV chunks of every layer as soon as the layer is computed, then the
  // trailer with the first generated token. Prompts run one at a time (the backend is busy
  // with one prompt); later callers wait.
  absl::StatusOr<PrefillStats> Run(const v1::PrefillRequest& request, const PrefillEmit& emit);

  const std::string& fingerprint() const { return fingerprint_; }
  v1::KvLayout layout() const;

 private:
  LanguageModel* model_;
  const std::string fingerprint_;
  const PrefillEngineOptions options_;
  absl::Mutex run_mu_;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_PREFILL_SERVICE_PREFILL_ENGINE_H_
