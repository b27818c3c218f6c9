#ifndef SPARSEACCEL_KERNELS_CUDA_ATTENTION_OPERANDS_H_
#define SPARSEACCEL_KERNELS_CUDA_ATTENTION_OPERANDS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "kernels/cuda/attention_inner_loop.h"

namespace sparseaccel {
namespace cuda {

// What the prefill attention kernels of a layer (dense and sparse) read and write: bf16 rows
// of Q, K, V and the output (device memory), their head counts and strides, and which
// tensor-core path to take. Which rows take part is each kernel's own argument.
struct AttentionOperands {
  const uint16_t* q = nullptr;  // Rows of [num_heads][head_dim] at q_stride.
  int64_t q_stride = 0;
  const uint16_t* k = nullptr;  // Rows of [num_kv_heads][head_dim] at kv_stride.
  const uint16_t* v = nullptr;
  int64_t kv_stride = 0;
  uint16_t* out = nullptr;  // Rows of [num_heads][head_dim] at out_stride.
  int64_t out_stride = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  AttentionInnerLoop inner_loop = AttentionInnerLoop::kAuto;
};

// InvalidArgument (its message starting with `kernel`) unless head_dim is 64 or 128, the head
// counts are positive, at most 65535 query heads and a multiple of the KV heads, every stride
// covers a row and is a multiple of 8 elements, and every pointer is 16-byte aligned.
absl::Status CheckAttentionOperands(const AttentionOperands& operands, absl::string_view kernel);

}  // namespace cuda
}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_CUDA_ATTENTION_OPERANDS_H_
