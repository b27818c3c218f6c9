#include "model/kv_export.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/language_model.h"
#include "model/checkpoint/safetensors.h"

namespace sparseaccel {
namespace {

void EncodeRows(const float* values, int64_t n, KvDtype dtype, void* out) {
  if (dtype == KvDtype::kF32) {
    std::memcpy(out, values, n * sizeof(float));
    return;
  }
  uint16_t* bits = static_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; ++i) bits[i] = FloatToBf16(values[i]);
}

// One layer of K/V at a time for Forward: every layer writes into the same buffer, and
// LayerDone exports the rows just written before the next layer overwrites them.
class ExportingKvStore : public KvStore {
 public:
  ExportingKvStore(KvShape shape, int64_t num_tokens, KvExporter* exporter)
      : shape_(shape),
        k_(num_tokens * shape.RowSize()),
        v_(num_tokens * shape.RowSize()),
        exporter_(exporter) {}

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
    return ExportHostRows(exporter_, layer, first_pos, count, row, &k_[first_pos * row],
                          &v_[first_pos * row]);
  }

 private:
  const KvShape shape_;
  std::vector<float> k_, v_;
  KvExporter* const exporter_;
};

}  // namespace

absl::Status ExportHostRows(KvExporter* exporter, int64_t layer, int64_t first, int64_t count,
                            int64_t row, const float* k, const float* v) {
  const int64_t step = std::max<int64_t>(1, exporter->rows_per_slot());
  for (int64_t begin = 0; begin < count; begin += step) {
    const int64_t rows = std::min(step, count - begin);
    ASSIGN_OR_RETURN(KvExportSlot slot, exporter->Acquire(layer, first + begin, rows));
    EncodeRows(k + begin * row, rows * row, exporter->dtype(), slot.k);
    EncodeRows(v + begin * row, rows * row, exporter->dtype(), slot.v);
    RETURN_IF_ERROR(exporter->Publish(slot, nullptr));
  }
  return absl::OkStatus();
}

absl::Status LanguageModel::PrefillExport(absl::Span<const int32_t> tokens, KvExporter* exporter,
                                          std::vector<float>* last_logits) {
  ExportingKvStore kv(kv_shape(), static_cast<int64_t>(tokens.size()), exporter);
  last_logits->clear();
  return Forward({SequenceChunk{tokens, 0, &kv, LogitsFor::kLast}}, last_logits);
}

}  // namespace sparseaccel
