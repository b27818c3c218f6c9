#ifndef SPARSEACCEL_MODEL_CUDA_KV_TRANSFER_CUH_
#define SPARSEACCEL_MODEL_CUDA_KV_TRANSFER_CUH_

// K/V between the device and host memory beside the compute, on a copy stream of their own:
//  - ExportLayerRows (prefill): one finished layer's rows -> the exporter's page-locked slots,
//    asynchronous device -> host copies; each slot is published with an event to wait on.
//  - KvUploader (decode import): received rows -> page-locked staging slots -> asynchronous
//    host -> device copies straight into the paged pool, one per run of consecutive pool rows
//    (bf16: no kernel, so an import does not time-slice the GPU against a prefill running in
//    another process; fp32 rows are converted and scattered by kernels). A slot is reused once
//    its previous upload is done, so the caller's rows may go away on return.
// Included by .cu files only.

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/device_memory.h"
#include "model/kv_export.h"

namespace sparseaccel {

// Page-locks with cudaHostRegister.
class CudaHostPinner final : public HostMemoryPinner {
 public:
  absl::Status Pin(void* data, size_t bytes) override;
  void Unpin(void* data) override;
};

// One GPU's columns [offset, offset + width) of a layer's K/V rows: [n][width] bf16 rows on
// `device`, with the streams and events of their export.
struct DeviceKvColumns {
  int device = 0;
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  int64_t width = 0;
  int64_t offset = 0;
  cudaStream_t compute = nullptr;
  cudaStream_t copy = nullptr;
  cudaEvent_t computed = nullptr;
  cudaEvent_t copied = nullptr;
};

// Copies rows [0, n) of the layer's K and V (rows of `row` bf16 elements, put together from
// `parts`: one part of the whole row on one GPU, or a tensor-parallel engine's column slices)
// into exporter slots, on each part's `copy` stream after the work queued so far on its
// `compute` stream (through `computed`, re-recorded here). Each slot is published with the
// events of every part's copies into it; each part's `copied` is recorded after its last copy.
// Keeps the current device.
absl::Status ExportLayerRows(int64_t layer, absl::Span<const DeviceKvColumns> parts, int64_t n,
                             int64_t row, KvExporter* exporter);

class KvUploader {
 public:
  KvUploader() = default;
  ~KvUploader();
  KvUploader(const KvUploader&) = delete;
  KvUploader& operator=(const KvUploader&) = delete;

  absl::Status Init();
  // Rows of `dtype` (fp32 rounded to bf16 on the device) to pool rows `slots[i]` (host
  // int32, count of them) of the layer planes `pool_k` / `pool_v` (`row` bf16 elements each).
  // Thread-safe; returns once the rows are staged.
  absl::Status Upload(const void* k, const void* v, KvDtype dtype, const int32_t* slots,
                      int64_t count, int64_t row, uint16_t* pool_k, uint16_t* pool_v);
  // Makes `stream` wait (on the device) for every upload queued so far.
  absl::Status OrderBefore(cudaStream_t stream);
  // Waits on the host for every upload queued so far.
  absl::Status Synchronize();

 private:
  struct Slot {
    absl::Mutex mu;
    void* host ABSL_GUARDED_BY(mu) = nullptr;
    size_t host_bytes ABSL_GUARDED_BY(mu) = 0;
    cuda::DeviceBuffer device ABSL_GUARDED_BY(mu);
    cudaEvent_t done = nullptr;
  };
  // Enough staged chunks to ride out a wait for the GPU (another process's time slice).
  static constexpr int kSlots = 32;
  absl::Status Stage(Slot& slot, const void* k, const void* v, size_t rows_bytes,
                     const int32_t* slots, int64_t count) ABSL_EXCLUSIVE_LOCKS_REQUIRED(slot.mu);
  // bf16 rows staged at `host` (K then V) to their pool rows.
  absl::Status CopyRuns(const char* host, const int32_t* slots, int64_t count, int64_t row,
                        uint16_t* pool_k, uint16_t* pool_v);
  absl::Status ConvertAndScatter(Slot& slot, size_t rows_bytes, int64_t count, int64_t row,
                                 uint16_t* pool_k, uint16_t* pool_v)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(slot.mu);

  cudaStream_t stream_ = nullptr;
  std::array<Slot, kSlots> slots_;
  std::atomic<uint64_t> next_{0};
  absl::Mutex tail_mu_;
  cudaEvent_t tail_ = nullptr;  // Recorded after each upload.
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_CUDA_KV_TRANSFER_CUH_
