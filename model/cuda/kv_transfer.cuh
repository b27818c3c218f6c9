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
#include "model/cuda/cuda_util.cuh"
#include "model/kv_export.h"

namespace sparseaccel {

// Page-locks with cudaHostRegister.
class CudaHostPinner final : public HostMemoryPinner {
 public:
  absl::Status Pin(void* data, size_t bytes) override;
  void Unpin(void* data) override;
};

// Copies rows [0, n) of the layer's K and V (bf16, `row` elements each) into exporter slots on
// `copy` after the work queued so far on `compute` (through `computed`, re-recorded here), and
// publishes each slot with its own event. `copied` is recorded on `copy` after the last slot.
absl::Status ExportLayerRows(int64_t layer, const uint16_t* k, const uint16_t* v, int64_t n,
                             int64_t row, cudaStream_t compute, cudaStream_t copy,
                             cudaEvent_t computed, cudaEvent_t copied, KvExporter* exporter);

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
    DeviceBuffer device ABSL_GUARDED_BY(mu);
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
