#include <algorithm>
#include <atomic>
#include <utility>

#include "common/status_macros.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/device_memory.h"

namespace sparseaccel {
namespace cuda {

namespace {

std::atomic<int64_t> g_bytes_held{0};
std::atomic<int64_t> g_peak_bytes_held{0};

}  // namespace

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  DeviceBuffer buffer;
  RETURN_IF_ERROR(buffer.Reserve(std::max<size_t>(bytes, 1)));
  return buffer;
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Release();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() { Release(); }

absl::Status DeviceBuffer::Reserve(size_t bytes) {
  if (bytes <= bytes_) return absl::OkStatus();
  Release();
  CUDA_RETURN_IF_ERROR(cudaMalloc(&data_, bytes));
  bytes_ = bytes;
  const int64_t held = g_bytes_held += static_cast<int64_t>(bytes);
  int64_t peak = g_peak_bytes_held.load();
  while (held > peak && !g_peak_bytes_held.compare_exchange_weak(peak, held)) {
  }
  return absl::OkStatus();
}

void DeviceBuffer::Release() {
  if (data_ != nullptr) {
    cudaFree(data_);
    g_bytes_held -= static_cast<int64_t>(bytes_);
  }
  data_ = nullptr;
  bytes_ = 0;
}

int64_t DeviceBytesHeld() { return g_bytes_held.load(); }
int64_t PeakDeviceBytesHeld() { return g_peak_bytes_held.load(); }
void ResetPeakDeviceBytesHeld() { g_peak_bytes_held = g_bytes_held.load(); }

absl::Status DeviceBuffer::CopyFrom(const void* host, size_t bytes) {
  if (bytes > bytes_) return absl::OutOfRangeError("DeviceBuffer::CopyFrom past the end");
  return CudaStatus(cudaMemcpy(data_, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
}

absl::Status DeviceBuffer::CopyTo(void* host, size_t bytes) const {
  if (bytes > bytes_) return absl::OutOfRangeError("DeviceBuffer::CopyTo past the end");
  return CudaStatus(cudaMemcpy(host, data_, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
}

absl::Status CopyDeviceToHost(const void* device, void* host, size_t bytes) {
  return CudaStatus(cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
}

absl::Status DeviceBuffer::Fill(uint8_t value) {
  CUDA_RETURN_IF_ERROR(cudaMemset(data_, value, bytes_));
  return CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

absl::StatusOr<int> DeviceCount() {
  int count = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  return count;
}

absl::Status DeviceSynchronize() {
  return CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

absl::StatusOr<std::string> DeviceDescription() {
  int device = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  cudaDeviceProp prop;
  CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  return absl::StrCat(prop.name, ", ", prop.multiProcessorCount, " SMs, cc ", prop.major, ".",
                      prop.minor);
}

absl::StatusOr<EventTimer> EventTimer::Create() {
  EventTimer timer;
  cudaEvent_t start, stop;
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
  timer.start_ = start;
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop));
  timer.stop_ = stop;
  return timer;
}

EventTimer::EventTimer(EventTimer&& other) noexcept
    : start_(std::exchange(other.start_, nullptr)), stop_(std::exchange(other.stop_, nullptr)) {}

EventTimer::~EventTimer() {
  if (start_) cudaEventDestroy(static_cast<cudaEvent_t>(start_));
  if (stop_) cudaEventDestroy(static_cast<cudaEvent_t>(stop_));
}

absl::Status EventTimer::Start() {
  return CudaStatus(cudaEventRecord(static_cast<cudaEvent_t>(start_)), "cudaEventRecord");
}

absl::StatusOr<float> EventTimer::StopMilliseconds() {
  const auto stop = static_cast<cudaEvent_t>(stop_);
  CUDA_RETURN_IF_ERROR(cudaEventRecord(stop));
  CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop));
  float ms = 0;
  CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start_), stop));
  return ms;
}

absl::StatusOr<std::vector<double>> EventTimer::SortedMilliseconds(
    int repeats, const std::function<absl::Status()>& run) {
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    RETURN_IF_ERROR(Start());
    RETURN_IF_ERROR(run());
    ASSIGN_OR_RETURN(const float elapsed, StopMilliseconds());
    ms.push_back(elapsed);
  }
  std::sort(ms.begin(), ms.end());
  return ms;
}

}  // namespace cuda
}  // namespace sparseaccel
