#ifndef SPARSEACCEL_KERNELS_CUDA_CUDA_CHECK_CUH_
#define SPARSEACCEL_KERNELS_CUDA_CUDA_CHECK_CUH_

// Status plumbing and bf16 helpers shared by the .cu files of kernels/cuda and model/cuda.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace sparseaccel {
namespace cuda {

// Out of device memory is ResourceExhausted (a request too large for what is free), every
// other error Internal.
inline absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrCat(what, ": ", cudaGetErrorName(error), ": ", cudaGetErrorString(error));
  if (error == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

// The status of the launch just made (configuration errors show up here at once).
inline absl::Status LaunchStatus(const char* kernel) {
  return CudaStatus(cudaGetLastError(), kernel);
}

inline cudaStream_t AsStream(void* stream) { return static_cast<cudaStream_t>(stream); }

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float Bf16BitsToFloat(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

__device__ __forceinline__ uint16_t FloatToBf16Bits(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// 8 bf16 (one 16-byte load) as floats.
__device__ __forceinline__ void Unpack8(const uint4& bits, float (&dst)[8]) {
  const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    dst[2 * i] = __uint_as_float(words[i] << 16);
    dst[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

}  // namespace cuda
}  // namespace sparseaccel

#define CUDA_RETURN_IF_ERROR(expr)                                                    \
  do {                                                                                \
    const absl::Status cuda_status_ = ::sparseaccel::cuda::CudaStatus((expr), #expr); \
    if (!cuda_status_.ok()) return cuda_status_;                                      \
  } while (0)

#define RETURN_IF_LAUNCH_FAILED(kernel)                                            \
  do {                                                                             \
    const absl::Status launch_status_ = ::sparseaccel::cuda::LaunchStatus(kernel); \
    if (!launch_status_.ok()) return launch_status_;                               \
  } while (0)

#endif  // SPARSEACCEL_KERNELS_CUDA_CUDA_CHECK_CUH_
