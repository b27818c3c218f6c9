#ifndef SPARSEACCEL_MODEL_KV_EXPORT_H_
#define SPARSEACCEL_MODEL_KV_EXPORT_H_

// How a prefill hands each finished layer's K/V out of the engine without holding the whole
// cache: the exporter lends host memory one slot at a time (it bounds how many are out), the
// engine fills a slot with rows of one layer (the GPU engine by an asynchronous device -> host
// copy) and publishes it together with a way to wait for those bytes. The KV stream writer
// (kv_stream/kv_stream.h) is the exporter of the prefill service.

#include <cstddef>
#include <cstdint>
#include <functional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/kv_cache.h"

namespace sparseaccel {

// Page-locks host memory that exporters lend, so device copies into it run asynchronously at
// full speed (cudaHostRegister in the GPU build: LlamaCuda::NewHostMemoryPinner).
class HostMemoryPinner {
 public:
  virtual ~HostMemoryPinner() = default;
  virtual absl::Status Pin(void* data, size_t bytes) = 0;
  virtual void Unpin(void* data) = 0;
};

// Host memory for K and V rows [first, first + count) of `layer`: `count` rows of
// KvShape::RowSize() values of the exporter's dtype each, position-major.
struct KvExportSlot {
  int64_t layer = 0;
  int64_t first = 0;
  int64_t count = 0;
  void* k = nullptr;
  void* v = nullptr;
  int64_t handle = 0;  // The exporter's name for the slot.
};

class KvExporter {
 public:
  virtual ~KvExporter() = default;
  virtual KvDtype dtype() const = 0;
  // Most rows one slot holds.
  virtual int64_t rows_per_slot() const = 0;
  // Waits for a free slot (count <= rows_per_slot()). An error (the transfer was abandoned)
  // stops the prefill.
  virtual absl::StatusOr<KvExportSlot> Acquire(int64_t layer, int64_t first, int64_t count) = 0;
  // Hands the slot on. Its bytes are written once `written` returns OK (empty: already written);
  // `written` may be called from any thread, after the prefill call has returned.
  virtual absl::Status Publish(const KvExportSlot& slot, std::function<absl::Status()> written) = 0;
};

// Acquires, fills (rows converted from fp32 to the exporter's dtype) and publishes the rows
// [first, first + count) of `layer` held in host memory (`k`, `v`: count fp32 rows of `row`).
absl::Status ExportHostRows(KvExporter* exporter, int64_t layer, int64_t first, int64_t count,
                            int64_t row, const float* k, const float* v);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_KV_EXPORT_H_
