#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/status_macros.h"
#include "kernels/cuda/cuda_kernels.h"
#include "model/cuda/kv_copy.cuh"
#include "model/cuda/kv_transfer.cuh"

namespace sparseaccel {
namespace {

using SharedEvent = std::shared_ptr<std::remove_pointer_t<cudaEvent_t>>;

absl::StatusOr<SharedEvent> RecordedEvent(cudaStream_t stream) {
  cudaEvent_t event = nullptr;
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  SharedEvent shared(event, [](cudaEvent_t e) { cudaEventDestroy(e); });
  CUDA_RETURN_IF_ERROR(cudaEventRecord(event, stream));
  return shared;
}

}  // namespace

absl::Status CudaHostPinner::Pin(void* data, size_t bytes) {
  // Portable: pinned for every GPU's context, so each GPU of a tensor-parallel engine copies
  // its K/V columns into the slots at full speed.
  return cuda::CudaStatus(cudaHostRegister(data, bytes, cudaHostRegisterPortable),
                          "cudaHostRegister");
}

void CudaHostPinner::Unpin(void* data) { cudaHostUnregister(data); }

namespace {

// Rows [first, first + count) of `part`'s K or V (`src`) into host rows of `row_bytes` at
// `dst`, at the part's columns.
absl::Status CopyColumns(const DeviceKvColumns& part, const uint16_t* src, int64_t first,
                         int64_t count, size_t row_bytes, void* dst) {
  const size_t width_bytes = static_cast<size_t>(part.width) * sizeof(uint16_t);
  char* to = static_cast<char*>(dst) + part.offset * sizeof(uint16_t);
  const uint16_t* from = src + first * part.width;
  if (width_bytes == row_bytes) {
    return cuda::CudaStatus(
        cudaMemcpyAsync(to, from, count * row_bytes, cudaMemcpyDeviceToHost, part.copy),
        "K/V copy to the host");
  }
  return cuda::CudaStatus(cudaMemcpy2DAsync(to, row_bytes, from, width_bytes, width_bytes, count,
                                            cudaMemcpyDeviceToHost, part.copy),
                          "K/V copy to the host");
}

absl::Status QueueLayerRows(int64_t layer, absl::Span<const DeviceKvColumns> parts, int64_t n,
                            int64_t row, KvExporter* exporter) {
  for (const DeviceKvColumns& part : parts) {
    CUDA_RETURN_IF_ERROR(cudaSetDevice(part.device));
    CUDA_RETURN_IF_ERROR(cudaEventRecord(part.computed, part.compute));
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(part.copy, part.computed, 0));
  }
  const int64_t step = std::max<int64_t>(1, exporter->rows_per_slot());
  const size_t row_bytes = static_cast<size_t>(row) * sizeof(uint16_t);
  for (int64_t first = 0; first < n; first += step) {
    const int64_t count = std::min(step, n - first);
    ASSIGN_OR_RETURN(KvExportSlot slot, exporter->Acquire(layer, first, count));
    std::vector<SharedEvent> done;
    for (const DeviceKvColumns& part : parts) {
      CUDA_RETURN_IF_ERROR(cudaSetDevice(part.device));
      RETURN_IF_ERROR(CopyColumns(part, part.k, first, count, row_bytes, slot.k));
      RETURN_IF_ERROR(CopyColumns(part, part.v, first, count, row_bytes, slot.v));
      ASSIGN_OR_RETURN(SharedEvent event, RecordedEvent(part.copy));
      done.push_back(std::move(event));
    }
    RETURN_IF_ERROR(exporter->Publish(slot, [done]() -> absl::Status {
      for (const SharedEvent& event : done) {
        CUDA_RETURN_IF_ERROR(cudaEventSynchronize(event.get()));
      }
      return absl::OkStatus();
    }));
  }
  for (const DeviceKvColumns& part : parts) {
    CUDA_RETURN_IF_ERROR(cudaSetDevice(part.device));
    CUDA_RETURN_IF_ERROR(cudaEventRecord(part.copied, part.copy));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ExportLayerRows(int64_t layer, absl::Span<const DeviceKvColumns> parts, int64_t n,
                             int64_t row, KvExporter* exporter) {
  int current = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&current));
  const absl::Status status = QueueLayerRows(layer, parts, n, row, exporter);
  CUDA_RETURN_IF_ERROR(cudaSetDevice(current));
  return status;
}

KvUploader::~KvUploader() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  for (Slot& slot : slots_) {
    absl::MutexLock lock(&slot.mu);
    if (slot.host != nullptr) cudaFreeHost(slot.host);
    if (slot.done != nullptr) cudaEventDestroy(slot.done);
  }
  if (tail_ != nullptr) cudaEventDestroy(tail_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status KvUploader::Init() {
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&tail_, cudaEventDisableTiming));
  for (Slot& slot : slots_) {
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&slot.done, cudaEventDisableTiming));
  }
  return absl::OkStatus();
}

absl::Status KvUploader::Stage(Slot& slot, const void* k, const void* v, size_t rows_bytes,
                               const int32_t* slots, int64_t count) {
  // The slot's previous upload has left its staging memory.
  CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot.done));
  const size_t bytes = 2 * rows_bytes + count * sizeof(int32_t);
  if (slot.host_bytes < bytes) {
    if (slot.host != nullptr) CUDA_RETURN_IF_ERROR(cudaFreeHost(slot.host));
    slot.host = nullptr;
    slot.host_bytes = 0;
    CUDA_RETURN_IF_ERROR(cudaHostAlloc(&slot.host, bytes, cudaHostAllocDefault));
    slot.host_bytes = bytes;
  }
  char* host = static_cast<char*>(slot.host);
  std::memcpy(host, k, rows_bytes);
  std::memcpy(host + rows_bytes, v, rows_bytes);
  std::memcpy(host + 2 * rows_bytes, slots, count * sizeof(int32_t));
  return absl::OkStatus();
}

absl::Status KvUploader::Upload(const void* k, const void* v, KvDtype dtype, const int32_t* slots,
                                int64_t count, int64_t row, uint16_t* pool_k, uint16_t* pool_v) {
  if (count == 0) return absl::OkStatus();
  Slot& slot = slots_[next_++ % kSlots];
  absl::MutexLock lock(&slot.mu);
  const size_t rows_bytes = static_cast<size_t>(count * row) * KvDtypeBytes(dtype);
  RETURN_IF_ERROR(Stage(slot, k, v, rows_bytes, slots, count));
  if (dtype == KvDtype::kBf16) {
    RETURN_IF_ERROR(
        CopyRuns(static_cast<const char*>(slot.host), slots, count, row, pool_k, pool_v));
  } else {
    RETURN_IF_ERROR(ConvertAndScatter(slot, rows_bytes, count, row, pool_k, pool_v));
  }
  CUDA_RETURN_IF_ERROR(cudaEventRecord(slot.done, stream_));
  absl::MutexLock tail(&tail_mu_);
  CUDA_RETURN_IF_ERROR(cudaEventRecord(tail_, stream_));
  return absl::OkStatus();
}

absl::Status KvUploader::CopyRuns(const char* host, const int32_t* slots, int64_t count,
                                  int64_t row, uint16_t* pool_k, uint16_t* pool_v) {
  const size_t row_bytes = static_cast<size_t>(row) * sizeof(uint16_t);
  const char* host_v = host + count * row_bytes;
  for (int64_t i = 0; i < count;) {
    int64_t run = 1;
    while (i + run < count && slots[i + run] == slots[i] + run) ++run;
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(pool_k + static_cast<int64_t>(slots[i]) * row,
                                         host + i * row_bytes, run * row_bytes,
                                         cudaMemcpyHostToDevice, stream_));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(pool_v + static_cast<int64_t>(slots[i]) * row,
                                         host_v + i * row_bytes, run * row_bytes,
                                         cudaMemcpyHostToDevice, stream_));
    i += run;
  }
  return absl::OkStatus();
}

absl::Status KvUploader::ConvertAndScatter(Slot& slot, size_t rows_bytes, int64_t count,
                                           int64_t row, uint16_t* pool_k, uint16_t* pool_v) {
  // Device layout: fp32 K rows, V rows, pool slots, then the bf16 K and V.
  const size_t slots_at = 2 * rows_bytes;
  const size_t bf16_at = (slots_at + count * sizeof(int32_t) + 255) / 256 * 256;
  const size_t bf16_bytes = static_cast<size_t>(count * row) * sizeof(uint16_t);
  RETURN_IF_ERROR(slot.device.Reserve(bf16_at + 2 * bf16_bytes));
  char* device = slot.device.As<char>();
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device, slot.host, slots_at + count * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, stream_));
  uint16_t* k_bf16 = reinterpret_cast<uint16_t*>(device + bf16_at);
  uint16_t* v_bf16 = reinterpret_cast<uint16_t*>(device + bf16_at + bf16_bytes);
  RETURN_IF_ERROR(
      cuda::F32ToBf16(reinterpret_cast<const float*>(device), count * row, k_bf16, stream_));
  RETURN_IF_ERROR(cuda::F32ToBf16(reinterpret_cast<const float*>(device + rows_bytes), count * row,
                                  v_bf16, stream_));
  const int32_t* pool_slots = reinterpret_cast<const int32_t*>(device + slots_at);
  RETURN_IF_ERROR(CopyRows(k_bf16, row, nullptr, pool_k, row, pool_slots, count, row, stream_));
  return CopyRows(v_bf16, row, nullptr, pool_v, row, pool_slots, count, row, stream_);
}

absl::Status KvUploader::OrderBefore(cudaStream_t stream) {
  absl::MutexLock tail(&tail_mu_);
  return cuda::CudaStatus(cudaStreamWaitEvent(stream, tail_, 0), "waiting for K/V uploads");
}

absl::Status KvUploader::Synchronize() {
  return cuda::CudaStatus(cudaStreamSynchronize(stream_), "K/V upload");
}

}  // namespace sparseaccel
