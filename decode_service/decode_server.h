#ifndef SPARSEACCEL_DECODE_SERVICE_DECODE_SERVER_H_
#define SPARSEACCEL_DECODE_SERVICE_DECODE_SERVER_H_

// The public Generate API: validates a request, has a prefill service compute the prompt's KV
// cache (streamed into this service's paged pool, every chunk checksummed), then decodes in the
// shared continuous batch and streams tokens back. Cancellation and deadlines of the client
// reach the prefill call and the batch.

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "decode_service/decode_engine.h"
#include "decode_service/remote_prefill.h"
#include "decode_service/request_metrics.h"
#include "decode_service/stream_limit.h"
#include "model/text/tokenizer.h"
#include "prometheus/registry.h"
#include "proto/sparseaccel.grpc.pb.h"

namespace sparseaccel {

// What one Generate request may carry, whoever sends it: a request over any of these is
// INVALID_ARGUMENT before it costs anything (stop strings are matched against every decoded
// token's text, stop ids looked up per token).
inline constexpr int kMaxRequestIdBytes = 128;
inline constexpr int kMaxStopStrings = 16;
inline constexpr int kMaxStopStringBytes = 256;
inline constexpr int kMaxStopTokenIds = 64;

struct DecodeServerOptions {
  // Prefill services, used round robin.
  std::vector<std::string> prefill_addresses;
  // Streams (connections) each prompt's KV cache is read over.
  int32_t kv_streams = 8;
  // HTTP/2 receive window per KV stream (RemotePrefillOptions::receive_window_bytes).
  int32_t kv_receive_window_bytes = 0;
  // TLS to the prefill services (RemotePrefillOptions::credentials, tls_server_name).
  std::shared_ptr<grpc::ChannelCredentials> prefill_credentials;
  std::string prefill_tls_server_name;
  // Fingerprint of the local model; the prefill side must match it.
  std::string model_fingerprint;
  int64_t max_prompt_tokens = 131072;
  int64_t max_new_tokens = 4096;
  // Generate calls running at once on one client connection (ConnectionStreamLimit).
  int64_t max_streams_per_connection = 64;
  // The model's tokenizer, for text and chat prompts, text deltas and stop strings; null when
  // the model directory has none (then only token-id prompts are served). Not owned.
  const Tokenizer* tokenizer = nullptr;
};

class TokenWriter;  // One call's token stream (decode_server.cc).

class DecodeServer final : public v1::DecodeService::Service {
 public:
  DecodeServer(DecodeEngine* engine, const ModelConfig& config, DecodeServerOptions options,
               prometheus::Registry* registry);

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;

  int64_t active_requests() const { return active_.load(); }
  // Refreshes the pool, queue, batch and memory gauges (also done after each request).
  void UpdateGauges();

 private:
  // The prompt's token ids (text and chat prompts encoded), checked against the limits.
  absl::StatusOr<std::vector<int32_t>> PromptTokens(const v1::GenerateRequest& request) const;
  // The remote prefill (its first token sent through `tokens` as soon as it arrives), then the
  // rest of the tokens from the batch; the transfer's figures (none when the first token ended
  // the generation), or the call's error. Leaves the finish reason in `tokens`.
  absl::StatusOr<RemotePrefillResult> PrefillAndDecode(grpc::ServerContext* context,
                                                       const std::string& request_id,
                                                       const v1::GenerateRequest& request,
                                                       const std::vector<int32_t>& prompt,
                                                       std::shared_ptr<DecodeSequence> sequence,
                                                       TokenWriter* tokens);
  // The request's closing message (GenerateResult) and its metrics.
  void WriteResult(const RemotePrefillResult& transfer, int64_t prompt_tokens, double total_seconds,
                   const TokenWriter& tokens, grpc::ServerWriter<v1::GenerateResponse>* writer);
  DecodeEngine* engine_;
  const ModelConfig config_;
  const DecodeServerOptions options_;
  RemotePrefillClient prefill_;
  std::atomic<uint64_t> next_request_id_{0};
  std::atomic<int64_t> active_{0};
  ConnectionStreamLimit stream_limit_;

  DecodeRequestMetrics metrics_;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_DECODE_SERVICE_DECODE_SERVER_H_
