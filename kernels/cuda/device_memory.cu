#include <algorithm>
#include <utility>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/device_memory.h"

namespace sparseaccel {
namespace cuda {

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  DeviceBuffer buffer;
  CUDA_RETURN_IF_ERROR(cudaMalloc(&buffer.data_, std::max<size_t>(bytes, 1)));
  buffer.bytes_ = bytes;
  return buffer;
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_) cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  if (data_) cudaFree(data_);
}

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

}  // namespace cuda
}  // namespace sparseaccel
