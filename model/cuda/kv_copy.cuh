#ifndef SPARSEACCEL_MODEL_CUDA_KV_COPY_CUH_
#define SPARSEACCEL_MODEL_CUDA_KV_COPY_CUH_

// Moving K/V rows between the engine's buffers: the fused projection output, a one-layer
// contiguous buffer and the paged pool (a pool "slot" is block * block_tokens + offset).

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace sparseaccel {

// For i < n: dst row dst_slots[i] (nullptr: row i) = src row src_slots[i] (nullptr: row i),
// `row` bf16 elements each; rows sit at src_stride / dst_stride elements (multiples of 8).
absl::Status CopyRows(const uint16_t* src, int64_t src_stride, const int32_t* src_slots,
                      uint16_t* dst, int64_t dst_stride, const int32_t* dst_slots, int64_t n,
                      int64_t row, cudaStream_t stream);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_CUDA_KV_COPY_CUH_
