#include "prefill_service/prefill_engine.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/metrics.h"
#include "common/status_macros.h"
#include "kernels/sampling.h"
#include "model/checkpoint/config.h"
#include "proto/sampling.h"

namespace sparseaccel {

absl::StatusOr<std::unique_ptr<PrefillEngine>> PrefillEngine::Create(LanguageModel* model,
                                                                     std::string fingerprint,
                                                                     PrefillEngineOptions options,
                                                                     HostMemoryPinner* pinner) {
  const int64_t row_bytes =
      model->kv_shape().RowSize() * static_cast<int64_t>(KvDtypeBytes(options.kv_dtype));
  // Half a chunk for K, half for V, whole rows.
  const int64_t part_bytes = std::max<int64_t>(1, options.chunk_bytes / 2 / row_bytes) * row_bytes;
  const int64_t count = std::max<int64_t>(1, options.host_buffer_bytes / (2 * part_bytes));
  ASSIGN_OR_RETURN(std::unique_ptr<KvHostBuffers> buffers,
                   KvHostBuffers::Create(count, part_bytes, pinner));
  return std::unique_ptr<PrefillEngine>(
      new PrefillEngine(model, std::move(fingerprint), options, std::move(buffers)));
}

PrefillEngine::PrefillEngine(LanguageModel* model, std::string fingerprint,
                             PrefillEngineOptions options, std::unique_ptr<KvHostBuffers> buffers)
    : model_(model),
      fingerprint_(std::move(fingerprint)),
      options_(options),
      buffers_(std::move(buffers)) {}

v1::KvLayout PrefillEngine::Layout(v1::KvChecksum checksum) const {
  v1::KvLayout layout;
  const KvShape shape = model_->kv_shape();
  layout.set_num_layers(static_cast<int32_t>(shape.num_layers));
  layout.set_num_kv_heads(static_cast<int32_t>(shape.num_kv_heads));
  layout.set_head_dim(static_cast<int32_t>(shape.head_dim));
  layout.set_dtype(options_.kv_dtype == KvDtype::kBf16 ? v1::KV_DTYPE_BF16 : v1::KV_DTYPE_F32);
  layout.set_checksum(checksum);
  return layout;
}

absl::Status PrefillEngine::Validate(const v1::PrefillRequest& request) const {
  const ModelConfig& config = model_->config();
  const int64_t n = request.token_ids_size();
  if (n == 0) return absl::InvalidArgumentError("empty prompt");
  const int64_t limit = std::min(options_.max_prompt_tokens, config.max_position_embeddings);
  if (n > limit) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt has ", n, " tokens, the limit is ", limit));
  }
  RETURN_IF_ERROR(CheckTokenIds(request.token_ids(), config.vocab_size));
  RETURN_IF_ERROR(ValidateSampling(request.sampling()));
  if (!v1::KvChecksum_IsValid(request.kv_checksum())) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown kv_checksum ", request.kv_checksum(), " (see docs/services.md)"));
  }
  if (!request.expected_model_fingerprint().empty() &&
      request.expected_model_fingerprint() != fingerprint_) {
    return absl::FailedPreconditionError(absl::StrCat("model fingerprint mismatch: caller expects ",
                                                      request.expected_model_fingerprint(),
                                                      ", this service has ", fingerprint_));
  }
  return absl::OkStatus();
}

int32_t PrefillEngine::StreamsFor(const v1::PrefillRequest& request) const {
  return std::clamp(request.kv_streams(), 1, std::max(1, options_.max_kv_streams));
}

v1::PrefillHeader PrefillEngine::Header(const v1::PrefillRequest& request,
                                        const std::string& transfer_id, int32_t streams) const {
  v1::PrefillHeader header;
  header.set_request_id(request.request_id());
  header.set_model_fingerprint(fingerprint_);
  *header.mutable_layout() = Layout(request.kv_checksum());
  header.set_num_tokens(request.token_ids_size());
  header.set_kv_transfer_id(transfer_id);
  header.set_kv_streams(streams);
  return header;
}

std::unique_ptr<KvStreamWriter> PrefillEngine::NewWriter(const v1::PrefillRequest& request,
                                                         std::function<bool()> abandoned) {
  return std::make_unique<KvStreamWriter>(model_->kv_shape(), options_.kv_dtype,
                                          request.kv_checksum(), buffers_.get(),
                                          std::move(abandoned));
}

absl::StatusOr<PrefillStats> PrefillEngine::Compute(const v1::PrefillRequest& request,
                                                    KvStreamWriter* writer) {
  absl::MutexLock lock(&run_mu_);
  const auto start = std::chrono::steady_clock::now();
  model_->ResetDevicePeak();
  const std::vector<int32_t> tokens(request.token_ids().begin(), request.token_ids().end());
  std::vector<float> logits;
  const absl::Status computed = model_->PrefillExport(tokens, writer, &logits);
  if (!computed.ok()) {
    writer->Abort(computed);
    return computed;
  }
  writer->Close();
  PrefillStats stats;
  stats.first_token = SampleTokenCpu(logits.data(), model_->config().vocab_size,
                                     ToSamplingParams(request.sampling()), /*step=*/0);
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  stats.kv_bytes = writer->published_bytes();
  if (const std::optional<DeviceMemoryStats> memory = model_->DeviceMemory()) {
    stats.peak_gpu_bytes = memory->peak_used;
  }
  return stats;
}

}  // namespace sparseaccel
