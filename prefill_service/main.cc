// The prefill service: computes prompts' KV caches and first tokens for decode services.
//   prefill_server --model_dir DIR --listen 0.0.0.0:50051 --metrics_port 9464

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/time/time.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/server_flags.h"
#include "common/status_macros.h"
#include "common/tls.h"
#include "kernels/sparse/pattern_config.h"
#include "model/backend.h"
#include "model/checkpoint/fingerprint.h"
#include "prefill_service/prefill_server.h"

ABSL_FLAG(std::string, model_dir, "", "Hugging Face checkpoint directory.");
ABSL_FLAG(std::string, listen, "0.0.0.0:50051", "gRPC listen address.");
ABSL_FLAG(int32_t, metrics_port, 9464, "Port of the Prometheus /metrics endpoint (0: any).");
ABSL_FLAG(std::string, device, "cpu", "Compute backend: cpu, or cuda in builds with nvcc.");
ABSL_FLAG(int32_t, gpus, 0,
          "With --device=cuda: 0 prefills on one GPU; N >= 1 tensor parallel over GPUs 0..N-1 "
          "through NCCL (1: that path on one GPU). N must divide the heads, KV heads and "
          "intermediate size.");
ABSL_FLAG(int64_t, max_prompt_tokens, 131072, "Longest prompt accepted.");
ABSL_FLAG(int32_t, shutdown_grace_seconds, 30, "How long SIGTERM waits for running requests.");
ABSL_FLAG(int64_t, kv_chunk_bytes, 4 << 20, "Bytes of K and V per KV chunk message.");
ABSL_FLAG(int64_t, kv_host_buffer_bytes, 0,
          "Host memory (page-locked on cuda) for KV chunks waiting for the network, all requests "
          "together: a slow receiver stalls the prefill once it is full. 0: 1 GiB on cuda, "
          "64 MiB on cpu.");
ABSL_FLAG(int32_t, max_kv_streams, 8, "Most streams one request's KV chunks are spread over.");
ABSL_FLAG(std::string, sparse_config, "",
          "Per-head sparse attention config (from pattern_search). Empty: the model directory's "
          "sparse_config.json when there is one, else dense prefill; 'none': dense prefill.");

namespace sparseaccel {
namespace {

// The sparse config the flags ask for: nullopt for dense prefill.
absl::StatusOr<std::optional<SparseConfig>> SparseConfigFromFlags(const std::string& model_dir) {
  std::string path = absl::GetFlag(FLAGS_sparse_config);
  if (path == "none") return std::nullopt;
  if (path.empty()) {
    const std::filesystem::path beside_model =
        std::filesystem::path(model_dir) / "sparse_config.json";
    std::error_code error;
    if (!std::filesystem::exists(beside_model, error)) return std::nullopt;
    path = beside_model.string();
  }
  ASSIGN_OR_RETURN(SparseConfig config, LoadSparseConfig(path));
  LogInfo("prefill.sparse_attention",
          {{"config", path}, {"dense_below_tokens", config.dense_below_tokens}});
  return config;
}

int Run() {
  const std::string model_dir = absl::GetFlag(FLAGS_model_dir);
  absl::StatusOr<std::optional<SparseConfig>> sparse = SparseConfigFromFlags(model_dir);
  if (!sparse.ok()) {
    LogError("prefill.start_failed", {{"error", sparse.status().ToString()}});
    return 1;
  }
  if (!sparse->has_value()) LogInfo("prefill.dense_attention", {{"model", model_dir}});
  absl::StatusOr<std::unique_ptr<LanguageModel>> model = LoadLanguageModel(
      absl::GetFlag(FLAGS_device), model_dir, *std::move(sparse), absl::GetFlag(FLAGS_gpus));
  if (!model.ok()) {
    LogError("prefill.start_failed", {{"error", model.status().ToString()}});
    return 1;
  }
  absl::StatusOr<std::string> fingerprint = ModelFingerprint(model_dir);
  if (!fingerprint.ok()) {
    LogError("prefill.start_failed", {{"error", fingerprint.status().ToString()}});
    return 1;
  }
  PrefillEngineOptions options;
  options.max_prompt_tokens = absl::GetFlag(FLAGS_max_prompt_tokens);
  options.chunk_bytes = absl::GetFlag(FLAGS_kv_chunk_bytes);
  const bool cuda = absl::GetFlag(FLAGS_device) == "cuda";
  options.host_buffer_bytes = absl::GetFlag(FLAGS_kv_host_buffer_bytes);
  if (options.host_buffer_bytes <= 0) options.host_buffer_bytes = cuda ? 1LL << 30 : 64 << 20;
  options.max_kv_streams = absl::GetFlag(FLAGS_max_kv_streams);
  // The GPU engine's K/V are bf16: shipping them as bf16 halves the bytes and loses nothing.
  if (cuda) options.kv_dtype = KvDtype::kBf16;
  const std::unique_ptr<HostMemoryPinner> pinner = NewHostMemoryPinner(absl::GetFlag(FLAGS_device));
  absl::StatusOr<std::unique_ptr<PrefillEngine>> engine =
      PrefillEngine::Create(model->get(), *fingerprint, options, pinner.get());
  if (!engine.ok()) {
    LogError("prefill.start_failed", {{"error", engine.status().ToString()}});
    return 1;
  }
  auto registry = std::make_shared<prometheus::Registry>();
  PrefillServer service(engine->get(), registry.get());
  absl::StatusOr<std::unique_ptr<MetricsServer>> metrics =
      MetricsServer::Start("0.0.0.0", absl::GetFlag(FLAGS_metrics_port), registry,
                           [&service] { service.UpdateGauges(); });
  if (!metrics.ok()) {
    LogError("prefill.start_failed", {{"error", metrics.status().ToString()}});
    return 1;
  }
  absl::StatusOr<ServicePorts> ports = StartServiceFromFlags(absl::GetFlag(FLAGS_listen), &service);
  if (!ports.ok()) {
    LogError("prefill.start_failed", {{"error", ports.status().ToString()}});
    return 1;
  }
  LogInfo("prefill.ready", {{"listen", absl::GetFlag(FLAGS_listen)},
                            {"port", ports->port},
                            {"tls", ports->tls},
                            {"health_port", ports->health_port},
                            {"metrics_port", (*metrics)->port()},
                            {"model", model_dir},
                            {"gpus", absl::GetFlag(FLAGS_gpus)},
                            {"fingerprint", *fingerprint},
                            {"kv_host_buffer_bytes", options.host_buffer_bytes}});
  ServeUntilTerminated(
      "prefill", [&service] { return service.active_requests(); },
      [&] {
        ShutdownService(&*ports, absl::Seconds(absl::GetFlag(FLAGS_shutdown_grace_seconds)));
      });
  return 0;
}

}  // namespace
}  // namespace sparseaccel

int main(int argc, char** argv) {
  sparseaccel::BlockTerminationSignals();
  absl::ParseCommandLine(argc, argv);
  return sparseaccel::Run();
}
