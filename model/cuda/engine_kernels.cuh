#ifndef SPARSEACCEL_MODEL_CUDA_ENGINE_KERNELS_CUH_
#define SPARSEACCEL_MODEL_CUDA_ENGINE_KERNELS_CUH_

// The non-GEMM steps of the CUDA Llama engine on bf16 activations (fp32 arithmetic inside),
// rounding where Hugging Face's bf16 Llama rounds so the two stay close. Row-major throughout;
// a K/V "row" is one position's [num_kv_heads * head_dim] keys or values.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace sparseaccel {

using bf16 = __nv_bfloat16;

// out[i] = table[ids[i]] (rows of `hidden`).
absl::Status EmbeddingGather(const int32_t* ids, int64_t n, const bf16* table, int64_t hidden,
                             bf16* out, cudaStream_t stream);

// out = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * weight), per row of `hidden`; rows n.
absl::Status RmsNorm(const bf16* x, int64_t n, int64_t hidden, const bf16* weight, float eps,
                     bf16* out, cudaStream_t stream);

// For `n` rows of a fused [q | k | v] projection (row stride qkv_stride): rotates q heads in
// place, writes rotated k and plain v to k_dst/v_dst row slot[i] (slots == nullptr: row
// first_slot + i). positions == nullptr: row i sits at position first_pos + i.
struct RopeStoreArgs {
  bf16* qkv = nullptr;
  int64_t n = 0;
  int64_t qkv_stride = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  const float* inv_freq = nullptr;  // [head_dim / 2], device.
  const int32_t* positions = nullptr;
  int64_t first_pos = 0;
  const int32_t* slots = nullptr;
  int64_t first_slot = 0;
  bf16* k_dst = nullptr;
  bf16* v_dst = nullptr;
};
absl::Status RopeAndStoreKv(const RopeStoreArgs& args, cudaStream_t stream);

// out[i][j] = bf16(bf16(silu(gate_up[i][j])) * gate_up[i][inter + j]); rows n.
absl::Status SwiGlu(const bf16* gate_up, int64_t n, int64_t inter, bf16* out, cudaStream_t stream);

// Causal attention of `nq` query rows at positions q_start.. (row stride q_stride, head h at
// column h * head_dim) over contiguous K/V rows [0, q_start + nq). Output [nq][heads*head_dim].
struct PrefillAttentionArgs {
  const bf16* q = nullptr;
  int64_t q_stride = 0;
  int64_t nq = 0;
  int64_t q_start = 0;
  const bf16* k = nullptr;
  const bf16* v = nullptr;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // 16, 32, 64 or 128.
  bf16* out = nullptr;
};
absl::Status PrefillAttention(const PrefillAttentionArgs& args, cudaStream_t stream);

// One query row per sequence against that sequence's paged K/V: sequence s has lengths[s]
// positions, position p in pool row block_tables[s * table_stride + p / block_tokens] *
// block_tokens + p % block_tokens. Split over positions; `partials` needs
// DecodeAttentionPartialsBytes(). Output [num_seqs][heads*head_dim].
struct DecodeAttentionArgs {
  const bf16* q = nullptr;
  int64_t q_stride = 0;
  int64_t num_seqs = 0;
  const bf16* k_pool = nullptr;
  const bf16* v_pool = nullptr;
  const int32_t* block_tables = nullptr;
  int64_t table_stride = 0;
  const int32_t* lengths = nullptr;
  int64_t max_length = 0;
  int64_t block_tokens = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  float* partials = nullptr;
  bf16* out = nullptr;
};
size_t DecodeAttentionPartialsBytes(int64_t num_seqs, int64_t num_heads, int64_t head_dim,
                                    int64_t max_length);
absl::Status DecodeAttention(const DecodeAttentionArgs& args, cudaStream_t stream);

// dst row dst_slots[i] = src row src_slots[i] (nullptr: row i), rows of `row` elements.
absl::Status CopyRows(const bf16* src, const int32_t* src_slots, bf16* dst,
                      const int32_t* dst_slots, int64_t n, int64_t row, cudaStream_t stream);

absl::Status F32ToBf16(const float* in, int64_t n, bf16* out, cudaStream_t stream);
absl::Status Bf16ToF32(const bf16* in, int64_t n, float* out, cudaStream_t stream);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_CUDA_ENGINE_KERNELS_CUH_
