// The decode service: the public Generate API. Prompts are prefilled by prefill services; their
// KV caches arrive over gRPC and decoding runs here in one continuous batch.
//   decode_server --model_dir DIR --listen 0.0.0.0:50052 --metrics_port 9465
//                 --prefill_addresses host1:50051,host2:50051 [--openai_port 8000]

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/server_flags.h"
#include "common/status_macros.h"
#include "common/tls.h"
#include "decode_service/decode_server.h"
#include "decode_service/openai_api.h"
#include "decode_service/openai_http.h"
#include "decode_service/step_metrics.h"
#include "model/backend.h"
#include "model/checkpoint/fingerprint.h"
#include "model/text/tokenizer.h"

ABSL_FLAG(std::string, model_dir, "", "Hugging Face checkpoint directory.");
ABSL_FLAG(std::string, listen, "0.0.0.0:50052", "gRPC listen address.");
ABSL_FLAG(int32_t, metrics_port, 9465, "Port of the Prometheus /metrics endpoint (0: any).");
ABSL_FLAG(std::string, prefill_addresses, "127.0.0.1:50051",
          "Comma-separated prefill service addresses, used round robin.");
ABSL_FLAG(int32_t, kv_streams, 8,
          "Streams (each on its own connection) a prompt's KV cache is read over.");
ABSL_FLAG(int32_t, kv_receive_window_bytes, 0,
          "HTTP/2 receive window (and largest frame) of each KV stream; 0: gRPC's default.");
ABSL_FLAG(std::string, device, "cpu", "Compute backend: cpu, or cuda in builds with nvcc.");
ABSL_FLAG(int64_t, kv_block_tokens, 16, "Positions per paged KV block.");
ABSL_FLAG(
    int64_t, kv_blocks, 4096,
    "Blocks in the KV pool (its memory is allocated at start; on the GPU with --device=cuda).");
ABSL_FLAG(int64_t, max_batch, 32, "Sequences decoded together per step.");
ABSL_FLAG(int64_t, max_waiting, 64, "Requests that may wait for KV space before rejection.");
ABSL_FLAG(int64_t, max_prompt_tokens, 131072, "Longest prompt accepted.");
ABSL_FLAG(int64_t, max_new_tokens, 4096, "Largest max_tokens accepted.");
ABSL_FLAG(std::string, prefill_tls_ca, "",
          "PEM CA of the prefill services' certificates: TLS to them (empty: plaintext).");
ABSL_FLAG(std::string, prefill_tls_cert, "",
          "PEM client certificate for prefill services that require one (mutual TLS).");
ABSL_FLAG(std::string, prefill_tls_key, "", "PEM private key of --prefill_tls_cert.");
ABSL_FLAG(std::string, prefill_tls_server_name, "",
          "Name the prefill certificates must carry, instead of the addresses' host names.");
ABSL_FLAG(int64_t, max_streams_per_connection, 64,
          "Generate calls one client connection may run at once (over it: RESOURCE_EXHAUSTED).");
ABSL_FLAG(int32_t, shutdown_grace_seconds, 30, "How long SIGTERM waits for running requests.");
ABSL_FLAG(int32_t, openai_port, 0,
          "Port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
          "/v1/models, /health); 0: off.");
ABSL_FLAG(std::string, served_model_name, "",
          "Model id of the OpenAI API (empty: the base name of --model_dir).");
ABSL_FLAG(int32_t, openai_request_timeout_seconds, 600,
          "Deadline of each OpenAI API generation (HTTP 504 past it); 0: none.");

namespace sparseaccel {
namespace {

// The OpenAI-compatible HTTP API on --openai_port (null when it is 0), calling the service's
// Generate through an in-process channel of `server`. All its calls share that one channel, so
// --max_streams_per_connection bounds them together (HTTP 429 over it).
absl::StatusOr<std::unique_ptr<OpenAiHttpServer>> StartOpenAiFromFlags(
    grpc::Server* server, const std::string& model_dir) {
  OpenAiHttpOptions options;
  options.port = absl::GetFlag(FLAGS_openai_port);
  if (options.port == 0) return nullptr;
  options.api.served_model_name = absl::GetFlag(FLAGS_served_model_name);
  if (options.api.served_model_name.empty()) {
    options.api.served_model_name = ModelNameOfDirectory(model_dir);
  }
  options.api.default_chat_max_tokens =
      static_cast<int32_t>(std::min<int64_t>(absl::GetFlag(FLAGS_max_new_tokens), INT32_MAX));
  const int32_t timeout = absl::GetFlag(FLAGS_openai_request_timeout_seconds);
  options.request_timeout = timeout > 0 ? absl::Seconds(timeout) : absl::InfiniteDuration();
  // One thread per open connection: the calls the stream limit admits, and some to spare.
  options.threads = static_cast<int>(
      std::min<int64_t>(absl::GetFlag(FLAGS_max_streams_per_connection) + 16, 1024));
  return OpenAiHttpServer::Start(server->InProcessChannel(grpc::ChannelArguments()), options);
}

// The model's tokenizer; null without tokenizer.json (then only token-id prompts are served).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizerIfPresent(const std::string& model_dir) {
  if (!std::ifstream(model_dir + "/tokenizer.json").good()) return nullptr;
  return Tokenizer::Load(model_dir);
}

// The prefill services and the limits from the flags; `prefill_tls` gets the channel TLS files.
absl::StatusOr<DecodeServerOptions> DecodeServerOptionsFromFlags(ChannelTlsFiles* prefill_tls) {
  DecodeServerOptions options;
  options.prefill_addresses =
      absl::StrSplit(absl::GetFlag(FLAGS_prefill_addresses), ',', absl::SkipEmpty());
  options.kv_streams = absl::GetFlag(FLAGS_kv_streams);
  options.kv_receive_window_bytes = absl::GetFlag(FLAGS_kv_receive_window_bytes);
  options.max_prompt_tokens = absl::GetFlag(FLAGS_max_prompt_tokens);
  options.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  options.max_streams_per_connection = absl::GetFlag(FLAGS_max_streams_per_connection);
  prefill_tls->ca = absl::GetFlag(FLAGS_prefill_tls_ca);
  prefill_tls->cert = absl::GetFlag(FLAGS_prefill_tls_cert);
  prefill_tls->key = absl::GetFlag(FLAGS_prefill_tls_key);
  prefill_tls->refresh_seconds = TlsRefreshSecondsFromFlags();
  ASSIGN_OR_RETURN(options.prefill_credentials, MakeChannelCredentials(*prefill_tls));
  options.prefill_tls_server_name = absl::GetFlag(FLAGS_prefill_tls_server_name);
  return options;
}

// After SIGTERM: HTTP requests drain first (the gRPC server's shutdown closes the in-process
// transport, cutting the calls on it; probes fail and the HTTP port is closed meanwhile), then
// the gRPC calls, within --shutdown_grace_seconds in all.
void DrainAndStop(ServicePorts* ports, std::unique_ptr<OpenAiHttpServer> openai) {
  const absl::Time drained_by =
      absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_shutdown_grace_seconds));
  if (openai != nullptr) {
    if (ports->health) ports->health->server->Shutdown();
    openai->StopAccepting();
    openai->WaitUntilIdle(drained_by);
  }
  ShutdownService(ports, std::max(drained_by - absl::Now(), absl::ZeroDuration()));
}

int StartFailed(const absl::Status& status) {
  LogError("decode.start_failed", {{"error", status.ToString()}});
  return 1;
}

int Run() {
  const std::string model_dir = absl::GetFlag(FLAGS_model_dir);
  SequencePoolOptions pool;
  pool.block_tokens = absl::GetFlag(FLAGS_kv_block_tokens);
  pool.num_blocks = absl::GetFlag(FLAGS_kv_blocks);
  pool.max_batch = absl::GetFlag(FLAGS_max_batch);
  absl::StatusOr<std::unique_ptr<SequenceModel>> model =
      LoadSequenceModel(absl::GetFlag(FLAGS_device), model_dir, pool);
  if (!model.ok()) return StartFailed(model.status());
  absl::StatusOr<std::string> fingerprint = ModelFingerprint(model_dir);
  if (!fingerprint.ok()) return StartFailed(fingerprint.status());
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = LoadTokenizerIfPresent(model_dir);
  if (!tokenizer.ok()) return StartFailed(tokenizer.status());
  ChannelTlsFiles prefill_tls;
  absl::StatusOr<DecodeServerOptions> options = DecodeServerOptionsFromFlags(&prefill_tls);
  if (!options.ok()) return StartFailed(options.status());
  options->model_fingerprint = *fingerprint;
  options->tokenizer = tokenizer->get();
  auto registry = std::make_shared<prometheus::Registry>();
  DecodeStepMetrics step_metrics(registry.get());
  DecodeEngineOptions engine_options;
  engine_options.max_batch = absl::GetFlag(FLAGS_max_batch);
  engine_options.max_waiting = absl::GetFlag(FLAGS_max_waiting);
  engine_options.on_step = [&step_metrics](const DecodeStepTiming& timing) {
    step_metrics.Observe(timing);
  };
  DecodeEngine engine(model->get(), engine_options);
  DecodeServer service(&engine, (*model)->config(), *options, registry.get());
  absl::StatusOr<std::unique_ptr<MetricsServer>> metrics =
      MetricsServer::Start("0.0.0.0", absl::GetFlag(FLAGS_metrics_port), registry,
                           [&service] { service.UpdateGauges(); });
  if (!metrics.ok()) return StartFailed(metrics.status());
  absl::StatusOr<ServicePorts> ports = StartServiceFromFlags(absl::GetFlag(FLAGS_listen), &service);
  if (!ports.ok()) return StartFailed(ports.status());
  absl::StatusOr<std::unique_ptr<OpenAiHttpServer>> openai =
      StartOpenAiFromFlags(ports->server.get(), model_dir);
  if (!openai.ok()) {
    ShutdownService(&*ports, absl::ZeroDuration());
    return StartFailed(openai.status());
  }
  LogInfo("decode.ready",
          {{"listen", absl::GetFlag(FLAGS_listen)},
           {"port", ports->port},
           {"tls", ports->tls},
           {"health_port", ports->health_port},
           {"prefill_tls", TlsMode(prefill_tls)},
           {"metrics_port", (*metrics)->port()},
           {"openai_port", *openai ? (*openai)->port() : 0},
           {"prefill", absl::GetFlag(FLAGS_prefill_addresses)},
           {"device", absl::GetFlag(FLAGS_device)},
           {"kv_pool_mib", (*model)->kv_pool_blocks() * (*model)->kv_block_bytes() / (1 << 20)},
           {"tokenizer", *tokenizer != nullptr},
           {"fingerprint", *fingerprint}});
  ServeUntilTerminated(
      "decode", [&service] { return service.active_requests(); },
      [&] { DrainAndStop(&*ports, *std::move(openai)); });
  return 0;
}

}  // namespace
}  // namespace sparseaccel

int main(int argc, char** argv) {
  sparseaccel::BlockTerminationSignals();
  absl::ParseCommandLine(argc, argv);
  return sparseaccel::Run();
}
