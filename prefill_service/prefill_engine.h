#ifndef SPARSEACCEL_PREFILL_SERVICE_PREFILL_ENGINE_H_
#define SPARSEACCEL_PREFILL_SERVICE_PREFILL_ENGINE_H_

// Runs a prompt through the model and exports its KV cache layer by layer into a
// KvStreamWriter (kv_stream/), whose host buffers, shared by all requests, bound the memory in
// flight. No network: the gRPC layer (prefill_server.h) sends what the writer hands out, on as
// many streams as the caller opened, while the compute goes on.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kv_stream/host_buffers.h"
#include "kv_stream/kv_stream.h"
#include "model/language_model.h"
#include "proto/sparseaccel.pb.h"

namespace sparseaccel {

struct PrefillEngineOptions {
  // Longest prompt accepted (also bounded by the model's max_position_embeddings).
  int64_t max_prompt_tokens = 8192;
  // Size of one KvChunk message (k + v); a layer is split into several chunks.
  int64_t chunk_bytes = 4 << 20;
  // Host memory for chunks not yet sent, all requests together (at least one chunk).
  int64_t host_buffer_bytes = 64 << 20;
  // Most streams one request's chunks are spread over.
  int32_t max_kv_streams = 8;
  // Element type of K/V on the wire. bf16 halves the bytes; it loses nothing for the GPU
  // engine, whose K/V are bf16 (the only type it exports), and rounds the CPU engine's fp32
  // K/V (to nearest even).
  KvDtype kv_dtype = KvDtype::kF32;
};

struct PrefillStats {
  int32_t first_token = 0;
  double seconds = 0;
  int64_t kv_bytes = 0;
  int64_t peak_gpu_bytes = 0;
};

class PrefillEngine {
 public:
  // `pinner` (may be null) page-locks the host buffers; it must outlive the engine.
  static absl::StatusOr<std::unique_ptr<PrefillEngine>> Create(LanguageModel* model,
                                                               std::string fingerprint,
                                                               PrefillEngineOptions options,
                                                               HostMemoryPinner* pinner);

  // InvalidArgument for empty or over-long prompts, unknown token ids, bad sampling values or
  // checksum kinds; FailedPrecondition for a fingerprint mismatch.
  absl::Status Validate(const v1::PrefillRequest& request) const;

  // What the response stream starts with; `streams` are the streams the chunks go out on.
  v1::PrefillHeader Header(const v1::PrefillRequest& request, const std::string& transfer_id,
                           int32_t streams) const;
  // The writer of one request's chunks; `abandoned` is polled while it waits for buffers.
  std::unique_ptr<KvStreamWriter> NewWriter(const v1::PrefillRequest& request,
                                            std::function<bool()> abandoned);

  // Computes the prompt, publishing its K/V into `writer`, then closes it (or aborts it with
  // the error). Prompts compute one at a time; the next starts as soon as this one's compute
  // ends, while its chunks may still be on their way.
  absl::StatusOr<PrefillStats> Compute(const v1::PrefillRequest& request, KvStreamWriter* writer);

  // Streams a request may use.
  int32_t StreamsFor(const v1::PrefillRequest& request) const;
  const std::string& fingerprint() const { return fingerprint_; }
  const KvHostBuffers& host_buffers() const { return *buffers_; }
  LanguageModel* model() const { return model_; }

 private:
  PrefillEngine(LanguageModel* model, std::string fingerprint, PrefillEngineOptions options,
                std::unique_ptr<KvHostBuffers> buffers);
  v1::KvLayout Layout(v1::KvChecksum checksum) const;

  LanguageModel* model_;
  const std::string fingerprint_;
  const PrefillEngineOptions options_;
  const std::unique_ptr<KvHostBuffers> buffers_;
  absl::Mutex run_mu_;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_PREFILL_SERVICE_PREFILL_ENGINE_H_
