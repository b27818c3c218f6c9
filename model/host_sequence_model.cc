#include "model/host_sequence_model.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/checkpoint/safetensors.h"

namespace sparseaccel {
namespace {

// One row of `n` values of `dtype` (little-endian, as on the wire) into fp32.
void WidenRow(KvDtype dtype, const char* src, int64_t n, float* dst) {
  if (dtype == KvDtype::kF32) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    uint16_t bits;
    std::memcpy(&bits, src + 2 * i, 2);
    dst[i] = Bf16ToFloat(bits);
  }
}

}  // namespace

HostSequenceModel::HostSequenceModel(LanguageModel* model, int64_t block_tokens,
                                     int64_t num_blocks)
    : model_(model), pool_(model->kv_shape(), block_tokens, num_blocks) {}

HostSequenceModel::HostSequenceModel(std::unique_ptr<LanguageModel> model, int64_t block_tokens,
                                     int64_t num_blocks)
    : owned_(std::move(model)),
      model_(owned_.get()),
      pool_(model_->kv_shape(), block_tokens, num_blocks) {}

absl::StatusOr<HostSequenceModel::Sequence*> HostSequenceModel::Find(int64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("no sequence ", id));
  return it->second.get();
}

absl::StatusOr<int64_t> HostSequenceModel::ImportSequence(int64_t length) {
  if (length < 0 || length > config().max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("sequence length ", length, " outside [0, ",
                                                   config().max_position_embeddings, "]"));
  }
  auto sequence = std::make_unique<Sequence>(&pool_);
  RETURN_IF_ERROR(sequence->kv.Reserve(length));
  sequence->length = length;
  absl::MutexLock lock(&mu_);
  const int64_t id = next_id_++;
  sequences_.emplace(id, std::move(sequence));
  return id;
}

absl::Status HostSequenceModel::WriteKv(int64_t id, int64_t layer, int64_t first, int64_t count,
                                        KvDtype dtype, const void* k, const void* v) {
  ASSIGN_OR_RETURN(Sequence * sequence, Find(id));
  const KvShape shape = kv_shape();
  if (layer < 0 || layer >= shape.num_layers || first < 0 || count < 0 ||
      first + count > sequence->length) {
    return absl::InvalidArgumentError(absl::StrCat("KV rows out of range: layer ", layer,
                                                   " positions ", first, "+", count,
                                                   " of a sequence of ", sequence->length));
  }
  ASSIGN_OR_RETURN(KvLayerView view, sequence->kv.Layer(layer, sequence->length));
  const int64_t row = shape.RowSize();
  const size_t row_bytes = row * KvDtypeBytes(dtype);
  for (int64_t i = 0; i < count; ++i) {
    WidenRow(dtype, static_cast<const char*>(k) + i * row_bytes, row, view.KRow(first + i));
    WidenRow(dtype, static_cast<const char*>(v) + i * row_bytes, row, view.VRow(first + i));
  }
  return absl::OkStatus();
}

absl::Status HostSequenceModel::DecodeAndSample(absl::Span<const int64_t> ids,
                                                absl::Span<const int32_t> tokens,
                                                absl::Span<const SamplingParams> params,
                                                absl::Span<const uint64_t> steps,
                                                std::vector<int32_t>* next) {
  const size_t batch = ids.size();
  if (tokens.size() != batch || params.size() != batch || steps.size() != batch) {
    return absl::InvalidArgumentError("DecodeAndSample needs a token, params and step per sequence");
  }
  std::vector<Sequence*> sequences(batch);
  std::vector<SequenceChunk> chunks(batch);
  for (size_t i = 0; i < batch; ++i) {
    ASSIGN_OR_RETURN(sequences[i], Find(ids[i]));
    chunks[i] = SequenceChunk{tokens.subspan(i, 1), sequences[i]->length, &sequences[i]->kv,
                              LogitsFor::kLast};
  }
  std::vector<float> logits;
  RETURN_IF_ERROR(model_->Forward(chunks, &logits));
  const int64_t vocab = config().vocab_size;
  next->resize(batch);
  for (size_t i = 0; i < batch; ++i) {
    (*next)[i] = SampleTokenCpu(logits.data() + i * vocab, vocab, params[i], steps[i]);
    ++sequences[i]->length;
  }
  return absl::OkStatus();
}

absl::Status HostSequenceModel::EndSequence(int64_t id) {
  std::unique_ptr<Sequence> ended;  // Its blocks return to the pool outside the lock.
  absl::MutexLock lock(&mu_);
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("no sequence ", id));
  ended = std::move(it->second);
  sequences_.erase(it);
  return absl::OkStatus();
}

}  // namespace sparseaccel
