#ifndef SPARSEACCEL_MODEL_CUDA_CUDA_UTIL_CUH_
#define SPARSEACCEL_MODEL_CUDA_CUDA_UTIL_CUH_

// Error handling and device memory for the CUDA engine (included by .cu files only).
// bf16 values are handled as their raw bits (uint16_t), as in kernels/cuda/cuda_kernels.h.

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace sparseaccel {

inline absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  std::string message = absl::StrCat(what, ": ", cudaGetErrorString(error));
  if (error == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

#define CUDA_RETURN_IF_ERROR(expr)                                        \
  do {                                                                    \
    absl::Status cuda_status_ = ::sparseaccel::CudaStatus((expr), #expr); \
    if (!cuda_status_.ok()) return cuda_status_;                          \
  } while (0)

// Checks the launch just made (bad configuration, missing kernel image).
#define CUDA_RETURN_IF_LAUNCH_FAILED() CUDA_RETURN_IF_ERROR(cudaGetLastError())

// Bytes held by DeviceBuffers in this process, and their high-water mark.
inline std::atomic<int64_t> g_device_allocated{0};
inline std::atomic<int64_t> g_device_peak_allocated{0};

// One cudaMalloc'ed region, freed on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { Release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      Release();
      data_ = std::exchange(other.data_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
    }
    return *this;
  }

  // Keeps the current allocation when it is already large enough.
  absl::Status Reserve(size_t bytes) {
    if (bytes <= bytes_) return absl::OkStatus();
    Release();
    CUDA_RETURN_IF_ERROR(cudaMalloc(&data_, bytes));
    bytes_ = bytes;
    const int64_t now = g_device_allocated += static_cast<int64_t>(bytes);
    int64_t peak = g_device_peak_allocated.load();
    while (now > peak && !g_device_peak_allocated.compare_exchange_weak(peak, now)) {
    }
    return absl::OkStatus();
  }
  void Release() {
    if (data_ != nullptr) {
      cudaFree(data_);
      g_device_allocated -= static_cast<int64_t>(bytes_);
    }
    data_ = nullptr;
    bytes_ = 0;
  }

  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_CUDA_CUDA_UTIL_CUH_
