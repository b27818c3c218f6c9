#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/device_memory.h"
#include "model/cuda/kv_copy.cuh"

namespace sparseaccel {
namespace {

__global__ void CopyRowsKernel(const uint16_t* src, int64_t src_stride, const int32_t* src_slots,
                               uint16_t* dst, int64_t dst_stride, const int32_t* dst_slots,
                               int64_t row) {
  const int64_t i = blockIdx.x;
  const int64_t from = src_slots ? src_slots[i] : i;
  const int64_t to = dst_slots ? dst_slots[i] : i;
  const uint4* s = reinterpret_cast<const uint4*>(src + from * src_stride);
  uint4* d = reinterpret_cast<uint4*>(dst + to * dst_stride);
  for (int64_t j = threadIdx.x; j < row / 8; j += blockDim.x) d[j] = s[j];
}

}  // namespace

absl::Status CopyRows(const uint16_t* src, int64_t src_stride, const int32_t* src_slots,
                      uint16_t* dst, int64_t dst_stride, const int32_t* dst_slots, int64_t n,
                      int64_t row, cudaStream_t stream) {
  if (row % 8 != 0 || src_stride % 8 != 0 || dst_stride % 8 != 0) {
    return absl::InvalidArgumentError("CopyRows: rows and strides must be multiples of 8");
  }
  if (n == 0) return absl::OkStatus();
  CopyRowsKernel<<<n, 128, 0, stream>>>(src, src_stride, src_slots, dst, dst_stride, dst_slots,
                                        row);
  RETURN_IF_LAUNCH_FAILED("CopyRowsKernel");
  return absl::OkStatus();
}

}  // namespace sparseaccel
