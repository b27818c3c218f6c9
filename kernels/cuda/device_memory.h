#ifndef SPARSEACCEL_KERNELS_CUDA_DEVICE_MEMORY_H_
#define SPARSEACCEL_KERNELS_CUDA_DEVICE_MEMORY_H_

// Device memory and timing from plain C++ (no CUDA headers), for tests and benchmarks of the
// kernels in cuda_kernels.h.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sparseaccel {
namespace cuda {

// An owned device allocation (on the device current when it was made). Every DeviceBuffer
// of the process counts toward DeviceBytesHeld.
class DeviceBuffer {
 public:
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  // At least `bytes` (contents not kept when it grows): keeps the allocation when it is large
  // enough. ResourceExhausted when the device is out of memory.
  absl::Status Reserve(size_t bytes);
  void Release();

  template <typename T>
  T* As() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

  // Synchronous copies of `bytes` from/to host memory.
  absl::Status CopyFrom(const void* host, size_t bytes);
  absl::Status CopyTo(void* host, size_t bytes) const;
  // Fills every byte with `value` (0xff: every bf16 and fp32 in the buffer becomes NaN).
  absl::Status Fill(uint8_t value);

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Bytes DeviceBuffers hold now (all devices), and the most they held since the process began
// or the last ResetPeakDeviceBytesHeld (comparable to torch's memory_allocated).
int64_t DeviceBytesHeld();
int64_t PeakDeviceBytesHeld();
void ResetPeakDeviceBytesHeld();

// Allocates a buffer holding `values`.
template <typename T>
absl::StatusOr<DeviceBuffer> ToDevice(const std::vector<T>& values) {
  absl::StatusOr<DeviceBuffer> buffer = DeviceBuffer::Allocate(values.size() * sizeof(T));
  if (buffer.ok()) {
    absl::Status status = buffer->CopyFrom(values.data(), values.size() * sizeof(T));
    if (!status.ok()) return status;
  }
  return buffer;
}

template <typename T>
absl::StatusOr<std::vector<T>> ToHost(const DeviceBuffer& buffer, size_t count) {
  std::vector<T> values(count);
  absl::Status status = buffer.CopyTo(values.data(), count * sizeof(T));
  if (!status.ok()) return status;
  return values;
}

// GPUs visible to this process.
absl::StatusOr<int> DeviceCount();

absl::Status DeviceSynchronize();

// Copies `bytes` from device memory the caller does not own as a DeviceBuffer (a view another
// component hands out) to the host; waits for the copy.
absl::Status CopyDeviceToHost(const void* device, void* host, size_t bytes);

// "NVIDIA H100 80GB HBM3, 132 SMs, cc 9.0".
absl::StatusOr<std::string> DeviceDescription();

// GPU time between two events on the default stream.
class EventTimer {
 public:
  static absl::StatusOr<EventTimer> Create();
  EventTimer(EventTimer&& other) noexcept;
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  ~EventTimer();
  absl::Status Start();
  // Waits for the stop event; the GPU time since Start() in milliseconds.
  absl::StatusOr<float> StopMilliseconds();
  // The GPU times of `repeats` runs of `run` (launches on the default stream), in
  // milliseconds, ascending.
  absl::StatusOr<std::vector<double>> SortedMilliseconds(int repeats,
                                                         const std::function<absl::Status()>& run);

 private:
  EventTimer() = default;
  void* start_ = nullptr;
  void* stop_ = nullptr;
};

}  // namespace cuda
}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_CUDA_DEVICE_MEMORY_H_
