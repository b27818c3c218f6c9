#ifndef SPARSEACCEL_DECODE_SERVICE_REMOTE_PREFILL_H_
#define SPARSEACCEL_DECODE_SERVICE_REMOTE_PREFILL_H_

// The decode side of a prefill call: asks a prefill service (round robin) to compute a prompt
// and reads its KV chunks from the Prefill stream plus kv_streams - 1 FetchKv streams, each on
// its own connection, checking them with a KvStreamReader (kv_stream/) and writing them into the
// sequence's pool blocks as they arrive. The client's cancellation and deadline reach every
// stream; any stream failing cancels the others. A FetchKv stream waits for its connection
// rather than failing the transfer, and those still open once every row has arrived (on the
// other streams) are cancelled.

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "decode_service/decode_engine.h"
#include "grpcpp/security/credentials.h"
#include "proto/sparseaccel.grpc.pb.h"

namespace sparseaccel {

struct RemotePrefillOptions {
  std::vector<std::string> addresses;
  // Fingerprint of the local model; the prefill side must match it.
  std::string model_fingerprint;
  // Streams (and connections) one transfer is read from; the prefill side may grant fewer.
  int32_t kv_streams = 8;
  // HTTP/2 receive window of each KV stream (0: gRPC's default, 64 KiB growing with its
  // bandwidth probe): what the prefill side may send ahead while a chunk is being checked and
  // uploaded. Also the largest HTTP/2 frame accepted.
  int32_t receive_window_bytes = 0;
  // Channel credentials (common/tls.h; null: plaintext) and, when set, the name the prefill
  // services' certificates must carry instead of the addresses' host names.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  std::string tls_server_name;
};

struct RemotePrefillResult {
  int32_t first_token = 0;
  double prefill_seconds = 0;
  double kv_seconds = 0;  // From the header to the last chunk.
  int64_t kv_bytes = 0;
  int64_t peak_gpu_bytes = 0;  // The prefill side's, while it computed.
  std::string address;
};

class RemotePrefillClient {
 public:
  explicit RemotePrefillClient(RemotePrefillOptions options);

  // Unavailable when no prefill service answers or a stream breaks, DataLoss for corrupt or
  // inconsistent KV, FailedPrecondition for another model or layout, Cancelled when `client`
  // went away; InvalidArgument and DeadlineExceeded from the prefill side pass through.
  // `first_token` is called on the calling thread with the first token as soon as it is known,
  // which may be before the KV cache has all arrived; when it returns false nothing more is
  // wanted, the transfer is ended and Run returns Cancelled.
  absl::StatusOr<RemotePrefillResult> Run(grpc::ServerContext* client,
                                          const std::string& request_id,
                                          const std::vector<int32_t>& prompt,
                                          const v1::SamplingParams& sampling, DecodeEngine* engine,
                                          DecodeSequence* sequence,
                                          const std::function<bool(int32_t)>& first_token);

 private:
  // One prefill service: a stub per stream, each over its own channel and connection.
  struct Target {
    std::string address;
    std::vector<std::unique_ptr<v1::PrefillService::Stub>> stubs;
  };
  const RemotePrefillOptions options_;
  std::vector<Target> targets_;
  std::atomic<uint64_t> next_{0};
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_DECODE_SERVICE_REMOTE_PREFILL_H_
