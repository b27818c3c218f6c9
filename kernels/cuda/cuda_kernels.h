#ifndef SPARSEACCEL_KERNELS_CUDA_CUDA_KERNELS_H_
#define SPARSEACCEL_KERNELS_CUDA_CUDA_KERNELS_H_

// CUDA kernels of the GPU Llama engine: bf16 storage, fp32 arithmetic. Each one is the twin of
// a CPU function in kernels/ and is tested against it. Plain C++ interface: device pointers to
// bf16 values are `uint16_t*` (the raw bf16 bits), the stream is a `cudaStream_t` passed as
// `void*` (nullptr: the default stream). Every function launches asynchronously on `stream`
// and returns an error status (with CUDA's error text) on bad arguments or a failed launch.
// Row strides are in elements.

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/attention_operands.h"
#include "kernels/sampling.h"

namespace sparseaccel {
namespace cuda {

// out[i] = float(in[i]) and back (round to nearest even).
absl::Status Bf16ToF32(const uint16_t* in, int64_t count, float* out, void* stream);
absl::Status F32ToBf16(const float* in, int64_t count, uint16_t* out, void* stream);

// out[r] = table[ids[r]] for `rows` ids (rows of `hidden` bf16). An id outside
// [0, vocab_size) yields a row of zeros (the host validates ids before).
absl::Status EmbeddingGather(const int32_t* ids, int64_t rows, const uint16_t* table,
                             int64_t vocab_size, int64_t hidden, uint16_t* out, void* stream);

// Per row of `dim`: if `residual` is not null, x = bf16(x + residual) (stored back into x);
// then out = bf16(x * rsqrt(mean(x^2) + eps) * weight). Twin of RmsNormCpu on the bf16 x.
absl::Status AddRmsNorm(uint16_t* x, const uint16_t* residual, const uint16_t* weight, int64_t rows,
                        int64_t dim, float eps, uint16_t* out, void* stream);

// Rotary embedding in place on `rows` rows of q ([num_heads][head_dim] at q + r * q_stride)
// and k ([num_kv_heads][head_dim] at k + r * k_stride; k may be null); row r sits at
// positions[r] (device int32). inv_freq: device copy of RopeInverseFrequencies() (head_dim/2
// floats), so the angles match the CPU twin ApplyRopeCpu bit for bit.
absl::Status ApplyRope(uint16_t* q, int64_t q_stride, int64_t num_heads, uint16_t* k,
                       int64_t k_stride, int64_t num_kv_heads, int64_t rows, int64_t head_dim,
                       const int32_t* positions, const float* inv_freq, void* stream);

// A decode step's RoPE and K/V store in one launch, on `rows` fused [q | k | v] rows of qkv
// (row stride qkv_stride, num_heads then num_kv_heads heads of K and of V): Q rotated in place
// as ApplyRope does, the rotated K and the V of row r written to row slots[r] (device int32)
// of k_pool and v_pool ([num_kv_heads][head_dim] bf16 per row). The K in qkv is left as it was.
absl::Status RopeAndStoreKv(uint16_t* qkv, int64_t qkv_stride, int64_t num_heads,
                            int64_t num_kv_heads, int64_t rows, int64_t head_dim,
                            const int32_t* positions, const float* inv_freq, const int32_t* slots,
                            uint16_t* k_pool, uint16_t* v_pool, void* stream);

// out[r][i] = bf16(silu(gate[r][i]) * up[r][i]) for `rows` rows of `width`; gate and up rows
// at stride `in_stride` (a fused [gate | up] projection: up = gate + width), out rows dense.
absl::Status SwiGlu(const uint16_t* gate, const uint16_t* up, int64_t rows, int64_t width,
                    int64_t in_stride, uint16_t* out, void* stream);

// Linear layers of few rows (decode steps): out = x w^T with w in PyTorch's [n][k] layout,
// bf16 operands, fp32 sums, each weight row read once for all rows of x. Meant for m up to
// kSmallBatchLinearRows, where it reads the weights faster than cuBLASLt's GEMMs do, and folds
// in the epilogue the layer needs next. Each output is summed in the same order whatever m
// is, so a row's result does not depend on the batch it is in.
constexpr int64_t kSmallBatchLinearRows = 8;
enum class LinearEpilogue {
  kStoreBf16,       // out[r][j] = bf16(sum): bf16 [m][n].
  kStoreF32,        // out[r][j] = sum: fp32 [m][n].
  kAccumulateBf16,  // out[r][j] = bf16(out[r][j] + sum): the residual add.
  // Weight rows [0, n/2) are the gate and [n/2, n) the up projection (the fused gate_up):
  // out[r][j] = bf16(silu(bf16(gate)) * bf16(up)), bf16 [m][n/2], as SwiGlu on a bf16 [gate |
  // up] output gives. n even.
  kSwiGluBf16,
};
struct SmallBatchLinearArgs {
  const uint16_t* x = nullptr;  // [m][k], 16-byte aligned rows.
  const uint16_t* w = nullptr;  // [n][k], 16-byte aligned.
  void* out = nullptr;          // Dense rows; see LinearEpilogue. Not overlapping x or w.
  int64_t m = 0;                // 1 .. kSmallBatchLinearRows.
  int64_t n = 0;
  int64_t k = 0;  // A multiple of 8.
  LinearEpilogue epilogue = LinearEpilogue::kStoreBf16;
};
// Whether SmallBatchLinear takes these operands (shape and alignment).
bool SmallBatchLinearFits(const SmallBatchLinearArgs& args);
absl::Status SmallBatchLinear(const SmallBatchLinearArgs& args, void* stream);

// Dense causal prefill attention (FlashAttention-2 style, tensor cores, fp32 online softmax).
// K/V hold the prompt's positions 0..n_kv-1; the n queries sit at positions n_kv-n..n_kv-1,
// so n_kv > n is a chunk of a longer prompt. Query head h reads KV head
// h / (num_heads / num_kv_heads). Scale 1/sqrt(head_dim). head_dim 64 or 128.
struct PrefillAttentionArgs {
  // Q rows 0..n-1 (query r at position n_kv - n + r), K/V rows 0..n_kv-1, output rows 0..n-1.
  AttentionOperands operands;
  int64_t n = 0;
  int64_t n_kv = 0;
};
absl::Status PrefillAttention(const PrefillAttentionArgs& args, void* stream);

// Decode attention over a paged KV cache: one query row per sequence. Sequence s attends to
// its positions 0..seq_lens[s]-1; position p lives in pool block
// block_tables[s * max_blocks_per_seq + p / block_tokens], row p % block_tokens. Pools are
// [num_blocks][block_tokens][num_kv_heads][head_dim] bf16. Long sequences are split over
// chunks of keys (flash-decoding) and reduced by a second kernel; `workspace` must hold
// PagedDecodeWorkspaceBytes(). head_dim 64 or 128.
struct PagedDecodeArgs {
  const uint16_t* q = nullptr;  // [num_seqs] rows of [num_heads][head_dim] at q_stride.
  int64_t q_stride = 0;
  const uint16_t* k_pool = nullptr;
  const uint16_t* v_pool = nullptr;
  const int32_t* block_tables = nullptr;  // Device, [num_seqs][max_blocks_per_seq].
  int64_t max_blocks_per_seq = 0;
  const int32_t* seq_lens = nullptr;  // Device, [num_seqs], each in [1, max_seq_len].
  int64_t num_seqs = 0;
  int64_t max_seq_len = 0;  // Sizes the split; longer seq_lens are clamped to it.
  int64_t block_tokens = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  void* workspace = nullptr;
  uint16_t* out = nullptr;  // [num_seqs] rows of [num_heads][head_dim] at out_stride.
  int64_t out_stride = 0;
};
// Workspace bytes for a call with the shape of `shape` (num_seqs, num_heads, num_kv_heads,
// head_dim, max_seq_len; the rest is not read) on the current device.
size_t PagedDecodeWorkspaceBytes(const PagedDecodeArgs& shape);
absl::Status PagedDecodeAttention(const PagedDecodeArgs& args, void* stream);

// Samples one token per row of fp32 logits [rows][vocab_size] exactly as SampleTokenCpu does
// (greedy with ties to the lowest id, temperature, top-k then top-p, the same counter-based
// draw keyed by (params[r].seed, steps[r])). params and steps are HOST arrays of `rows`
// entries (copied before the call returns); tokens is a device array of `rows` int32.
// `workspace` must hold SampleTokensWorkspaceBytes().
size_t SampleTokensWorkspaceBytes(int64_t rows, int64_t vocab_size);
absl::Status SampleTokens(const float* logits, int64_t rows, int64_t vocab_size,
                          const SamplingParams* params, const uint64_t* steps, void* workspace,
                          int32_t* tokens, void* stream);

}  // namespace cuda
}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_CUDA_CUDA_KERNELS_H_
