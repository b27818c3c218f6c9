#include "prefill_service/prefill_engine.h"

#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/metrics.h"
#include "common/status_macros.h"
#include "kernels/sampling.h"
#include "model/safetensors.h"
#include "proto/sampling.h"

namespace sparseaccel {
namespace {

// `n` fp32 values as wire bytes of `dtype` (little-endian).
void EncodeRows(const float* values, int64_t n, KvDtype dtype, std::string* out) {
  if (dtype == KvDtype::kF32) {
    out->assign(reinterpret_cast<const char*>(values), n * sizeof(float));
    return;
  }
  out->resize(n * 2);
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t bits = FloatToBf16(values[i]);
    std::memcpy(&(*out)[2 * i], &bits, 2);
  }
}

// One layer of K/V at a time: every layer writes into the same buffer, and LayerDone ships the
// rows just written before the next layer overwrites them.
class StreamingKvStore : public KvStore {
 public:
  StreamingKvStore(KvShape shape, int64_t num_tokens, int64_t chunk_bytes, KvDtype dtype,
                   const PrefillEmit* emit)
      : shape_(shape),
        dtype_(dtype),
        k_(num_tokens * shape.RowSize()),
        v_(num_tokens * shape.RowSize()),
        rows_per_chunk_(std::max<int64_t>(
            1, chunk_bytes / (2 * shape.RowSize() * static_cast<int64_t>(KvDtypeBytes(dtype))))),
        emit_(emit) {}

  absl::StatusOr<KvLayerView> Layer(int64_t layer, int64_t num_tokens) override {
    const int64_t capacity = static_cast<int64_t>(k_.size()) / shape_.RowSize();
    if (num_tokens > capacity) {
      return absl::InternalError(absl::StrCat("prefill KV buffer holds ", capacity,
                                              " tokens, layer ", layer, " needs ", num_tokens));
    }
    KvLayerView view;
    view.block_tokens = std::max<int64_t>(capacity, 1);
    view.row_size = shape_.RowSize();
    view.k_blocks = {k_.data()};
    view.v_blocks = {v_.data()};
    return view;
  }

  absl::Status LayerDone(int64_t layer, int64_t first_pos, int64_t count) override {
    const int64_t row = shape_.RowSize();
    for (int64_t begin = first_pos; begin < first_pos + count; begin += rows_per_chunk_) {
      const int64_t rows = std::min(rows_per_chunk_, first_pos + count - begin);
      v1::PrefillResponse message;
      v1::KvChunk* chunk = message.mutable_kv();
      chunk->set_layer(static_cast<int32_t>(layer));
      chunk->set_first_position(static_cast<int32_t>(begin));
      chunk->set_num_positions(static_cast<int32_t>(rows));
      EncodeRows(&k_[begin * row], rows * row, dtype_, chunk->mutable_k());
      EncodeRows(&v_[begin * row], rows * row, dtype_, chunk->mutable_v());
      chunk->set_crc32(KvChunkCrc(chunk->k(), chunk->v()));
      kv_bytes_ += static_cast<int64_t>(chunk->k().size() + chunk->v().size());
      RETURN_IF_ERROR((*emit_)(std::move(message)));
    }
    ++layers_sent_;
    return absl::OkStatus();
  }

  int64_t kv_bytes() const { return kv_bytes_; }
  int64_t layers_sent() const { return layers_sent_; }

 private:
  KvShape shape_;
  const KvDtype dtype_;
  std::vector<float> k_, v_;
  const int64_t rows_per_chunk_;
  const PrefillEmit* emit_;
  int64_t kv_bytes_ = 0;
  int64_t layers_sent_ = 0;
};

}  // namespace

uint32_t KvChunkCrc(const std::string& k, const std::string& v) {
  uLong crc = crc32(0L, Z_NULL, 0);
  crc = crc32_z(crc, reinterpret_cast<const Bytef*>(k.data()), k.size());
  crc = crc32_z(crc, reinterpret_cast<const Bytef*>(v.data()), v.size());
  return static_cast<uint32_t>(crc);
}

PrefillEngine::PrefillEngine(LanguageModel* model, std::string fingerprint,
                             PrefillEngineOptions options)
    : model_(model), fingerprint_(std::move(fingerprint)), options_(options) {}

v1::KvLayout PrefillEngine::layout() const {
  v1::KvLayout layout;
  const KvShape shape = model_->kv_shape();
  layout.set_num_layers(static_cast<int32_t>(shape.num_layers));
  layout.set_num_kv_heads(static_cast<int32_t>(shape.num_kv_heads));
  layout.set_head_dim(static_cast<int32_t>(shape.head_dim));
  layout.set_dtype(options_.kv_dtype == KvDtype::kBf16 ? v1::KV_DTYPE_BF16 : v1::KV_DTYPE_F32);
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
  for (int32_t id : request.token_ids()) {
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " outside the vocabulary [0, ", config.vocab_size, ")"));
    }
  }
  RETURN_IF_ERROR(ValidateSampling(request.sampling()));
  if (!request.expected_model_fingerprint().empty() &&
      request.expected_model_fingerprint() != fingerprint_) {
    return absl::FailedPreconditionError(absl::StrCat("model fingerprint mismatch: caller expects ",
                                                      request.expected_model_fingerprint(),
                                                      ", this service has ", fingerprint_));
  }
  return absl::OkStatus();
}

absl::StatusOr<PrefillStats> PrefillEngine::Run(const v1::PrefillRequest& request,
                                                const PrefillEmit& emit) {
  RETURN_IF_ERROR(Validate(request));
  const int64_t n = request.token_ids_size();
  {
    v1::PrefillResponse message;
    v1::PrefillHeader* header = message.mutable_header();
    header->set_request_id(request.request_id());
    header->set_model_fingerprint(fingerprint_);
    *header->mutable_layout() = layout();
    header->set_num_tokens(static_cast<int32_t>(n));
    RETURN_IF_ERROR(emit(std::move(message)));
  }
  absl::MutexLock lock(&run_mu_);
  const auto start = std::chrono::steady_clock::now();
  StreamingKvStore kv(model_->kv_shape(), n, options_.chunk_bytes, options_.kv_dtype, &emit);
  const std::vector<int32_t> tokens(request.token_ids().begin(), request.token_ids().end());
  std::vector<float> logits;
  RETURN_IF_ERROR(model_->Forward({SequenceChunk{tokens, 0, &kv, LogitsFor::kLast}}, &logits));
  PrefillStats stats;
  stats.first_token = SampleTokenCpu(logits.data(), model_->config().vocab_size,
                                     ToSamplingParams(request.sampling()), /*step=*/0);
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  stats.kv_bytes = kv.kv_bytes();
  stats.layers_sent = kv.layers_sent();
  v1::PrefillResponse message;
  v1::PrefillTrailer* trailer = message.mutable_trailer();
  trailer->set_first_token(stats.first_token);
  trailer->set_prefill_seconds(stats.seconds);
  trailer->set_kv_bytes(stats.kv_bytes);
  trailer->set_peak_host_memory_bytes(HostPeakResidentBytes());
  RETURN_IF_ERROR(emit(std::move(message)));
  return stats;
}

}  // namespace sparseaccel
