// Decode attention over a paged KV cache (flash-decoding): block (split, kv_head, sequence)
// takes one chunk of the sequence's keys for all query heads that share the KV head, so each
// K/V row is read once per group. Its 4 warps stride over the chunk's keys, 4 keys per warp
// at a time (lane l holds head_dim/32 elements of the row), with a per-head online softmax in
// fp32; a second kernel merges the chunks' (max, sum, output) partials.

#include <algorithm>
#include <cmath>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace sparseaccel {
namespace cuda {
namespace {

constexpr int kDecodeWarps = 4;
constexpr int kKeysPerStep = 4;
constexpr int64_t kMinChunk = 256;      // Fewer keys per split are not worth a partial.
constexpr int64_t kTargetBlocks = 264;  // About two blocks per SM on an H100 (132 SMs).

int64_t NumSplits(int64_t num_seqs, int64_t num_kv_heads, int64_t max_seq_len) {
  const int64_t wanted = CeilDiv(kTargetBlocks, std::max<int64_t>(num_seqs * num_kv_heads, 1));
  return std::clamp<int64_t>(wanted, 1, std::max<int64_t>(CeilDiv(max_seq_len, kMinChunk), 1));
}

// Partials: o [seq][head][split][head_dim] then (max, sum) [seq][head][split][2].
struct Partials {
  float* o;
  float* max_sum;
};

__host__ __device__ Partials PartialsIn(void* workspace, int64_t num_seqs, int64_t num_heads,
                                        int64_t splits, int64_t head_dim) {
  float* base = static_cast<float*>(workspace);
  return {base, base + num_seqs * num_heads * splits * head_dim};
}

template <int kPerLane>
__device__ __forceinline__ void LoadRow(const uint16_t* src, float (&dst)[kPerLane]) {
  if constexpr (kPerLane == 4) {
    const uint2 bits = *reinterpret_cast<const uint2*>(src);
    dst[0] = __uint_as_float(bits.x << 16);
    dst[1] = __uint_as_float(bits.x & 0xffff0000u);
    dst[2] = __uint_as_float(bits.y << 16);
    dst[3] = __uint_as_float(bits.y & 0xffff0000u);
  } else {
    static_assert(kPerLane == 2, "head_dim 64 or 128");
    const uint32_t bits = *reinterpret_cast<const uint32_t*>(src);
    dst[0] = __uint_as_float(bits << 16);
    dst[1] = __uint_as_float(bits & 0xffff0000u);
  }
}

template <int kHeadDim, int kMaxGroup>
__global__ void __launch_bounds__(kDecodeWarps * 32)
    DecodeChunkKernel(PagedDecodeArgs args, int64_t chunk, int num_splits, float scale_log2) {
  constexpr int kPerLane = kHeadDim / 32;
  const int split = blockIdx.x, kv_head = blockIdx.y;
  const int64_t seq = blockIdx.z;
  const int group = static_cast<int>(args.num_heads / args.num_kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t len = min(static_cast<int64_t>(args.seq_lens[seq]), args.max_seq_len);
  const int64_t begin = split * chunk, end = min(begin + chunk, len);

  float q[kMaxGroup][kPerLane], o[kMaxGroup][kPerLane], row_max[kMaxGroup], row_sum[kMaxGroup];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h < group) {
      LoadRow<kPerLane>(
          args.q + seq * args.q_stride + (kv_head * group + h) * kHeadDim + lane * kPerLane, q[h]);
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (h < group) q[h][i] *= scale_log2;
      o[h][i] = 0;
    }
    row_max[h] = -INFINITY;
    row_sum[h] = 0;
  }
  const int32_t* table = args.block_tables + seq * args.max_blocks_per_seq;
  const int64_t row_stride = args.num_kv_heads * kHeadDim;
  // Each warp takes kKeysPerStep consecutive keys per step: their K and V loads are all in
  // flight before the first use, and one softmax update covers them.
  for (int64_t pos0 = begin + warp * kKeysPerStep; pos0 < end;
       pos0 += kDecodeWarps * kKeysPerStep) {
    float k[kKeysPerStep][kPerLane], v[kKeysPerStep][kPerLane];
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const int64_t pos = min(pos0 + u, end - 1);  // Past the end: a repeat, weighted 0 below.
      const int64_t row =
          int64_t{table[pos / args.block_tokens]} * args.block_tokens + pos % args.block_tokens;
      const int64_t element = row * row_stride + kv_head * kHeadDim + lane * kPerLane;
      LoadRow<kPerLane>(args.k_pool + element, k[u]);
      LoadRow<kPerLane>(args.v_pool + element, v[u]);
    }
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h >= group) break;
      float dot[kKeysPerStep];
#pragma unroll
      for (int u = 0; u < kKeysPerStep; ++u) {
        dot[u] = 0;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) dot[u] += q[h][i] * k[u][i];
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
        for (int u = 0; u < kKeysPerStep; ++u) dot[u] += __shfl_xor_sync(~0u, dot[u], offset);
      }
      float step_max = dot[0];  // pos0 < end: key 0 of the step is always real.
#pragma unroll
      for (int u = 1; u < kKeysPerStep; ++u) {
        if (pos0 + u < end) step_max = fmaxf(step_max, dot[u]);
      }
      const float new_max = fmaxf(row_max[h], step_max);
      const float correction = exp2f(row_max[h] - new_max);
      row_max[h] = new_max;
      row_sum[h] *= correction;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) o[h][i] *= correction;
#pragma unroll
      for (int u = 0; u < kKeysPerStep; ++u) {
        const float p = pos0 + u < end ? exp2f(dot[u] - new_max) : 0.f;
        row_sum[h] += p;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) o[h][i] += p * v[u][i];
      }
    }
  }

  // Merge the warps through shared memory, then write this split's partial.
  __shared__ float shared_o[kDecodeWarps][kMaxGroup][kHeadDim];
  __shared__ float shared_max_sum[kDecodeWarps][kMaxGroup][2];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) shared_o[warp][h][lane * kPerLane + i] = o[h][i];
    if (lane == 0) {
      shared_max_sum[warp][h][0] = row_max[h];
      shared_max_sum[warp][h][1] = row_sum[h];
    }
  }
  __syncthreads();
  const Partials partials =
      PartialsIn(args.workspace, args.num_seqs, args.num_heads, num_splits, kHeadDim);
  for (int e = threadIdx.x; e < group * kHeadDim; e += blockDim.x) {
    const int h = e / kHeadDim, d = e % kHeadDim;
    float merged_max = -INFINITY;
    for (int w = 0; w < kDecodeWarps; ++w) merged_max = fmaxf(merged_max, shared_max_sum[w][h][0]);
    float sum = 0, acc = 0;
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float m = shared_max_sum[w][h][0];
      const float weight = m == -INFINITY ? 0.f : exp2f(m - merged_max);
      sum += shared_max_sum[w][h][1] * weight;
      acc += shared_o[w][h][d] * weight;
    }
    const int64_t slot = (seq * args.num_heads + kv_head * group + h) * num_splits + split;
    partials.o[slot * kHeadDim + d] = acc;
    if (d == 0) {
      partials.max_sum[slot * 2] = merged_max;
      partials.max_sum[slot * 2 + 1] = sum;
    }
  }
}

// Block (head, sequence), head_dim threads: out = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M).
__global__ void DecodeMergeKernel(PagedDecodeArgs args, int num_splits) {
  const int64_t head = blockIdx.x, seq = blockIdx.y;
  const int d = threadIdx.x;
  const Partials partials =
      PartialsIn(args.workspace, args.num_seqs, args.num_heads, num_splits, args.head_dim);
  const int64_t slot0 = (seq * args.num_heads + head) * num_splits;
  float merged_max = -INFINITY;
  for (int s = 0; s < num_splits; ++s) {
    merged_max = fmaxf(merged_max, partials.max_sum[(slot0 + s) * 2]);
  }
  float sum = 0, acc = 0;
  for (int s = 0; s < num_splits; ++s) {
    const float m = partials.max_sum[(slot0 + s) * 2];
    if (m == -INFINITY) continue;
    const float weight = exp2f(m - merged_max);
    sum += partials.max_sum[(slot0 + s) * 2 + 1] * weight;
    acc += partials.o[(slot0 + s) * args.head_dim + d] * weight;
  }
  args.out[seq * args.out_stride + head * args.head_dim + d] =
      FloatToBf16Bits(sum > 0 ? acc / sum : 0.f);
}

template <int kHeadDim, int kMaxGroup>
absl::Status LaunchDecode(const PagedDecodeArgs& args, cudaStream_t stream) {
  const int64_t splits = NumSplits(args.num_seqs, args.num_kv_heads, args.max_seq_len);
  const int64_t chunk = CeilDiv(args.max_seq_len, splits);
  const float scale_log2 = static_cast<float>(M_LOG2E / std::sqrt(double{kHeadDim}));
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(args.num_kv_heads),
                  static_cast<unsigned>(args.num_seqs));
  DecodeChunkKernel<kHeadDim, kMaxGroup>
      <<<grid, kDecodeWarps * 32, 0, stream>>>(args, chunk, static_cast<int>(splits), scale_log2);
  RETURN_IF_LAUNCH_FAILED("DecodeChunkKernel");
  const dim3 merge_grid(static_cast<unsigned>(args.num_heads),
                        static_cast<unsigned>(args.num_seqs));
  DecodeMergeKernel<<<merge_grid, kHeadDim, 0, stream>>>(args, static_cast<int>(splits));
  return LaunchStatus("DecodeMergeKernel");
}

template <int kHeadDim>
absl::Status DispatchGroup(const PagedDecodeArgs& args, cudaStream_t stream) {
  const int64_t group = args.num_heads / args.num_kv_heads;
  if (group <= 4) return LaunchDecode<kHeadDim, 4>(args, stream);
  if (group <= 8) return LaunchDecode<kHeadDim, 8>(args, stream);
  return LaunchDecode<kHeadDim, 16>(args, stream);
}

}  // namespace

size_t PagedDecodeWorkspaceBytes(int64_t num_seqs, int64_t num_heads, int64_t head_dim,
                                 int64_t max_seq_len) {
  // One KV head gives the most splits: an upper bound for any num_kv_heads.
  const int64_t splits = NumSplits(num_seqs, 1, max_seq_len);
  return static_cast<size_t>(num_seqs * num_heads * splits * (head_dim + 2)) * sizeof(float);
}

absl::Status PagedDecodeAttention(const PagedDecodeArgs& args, void* stream) {
  if (args.head_dim != 64 && args.head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("PagedDecodeAttention: head_dim ", args.head_dim, " (supported: 64, 128)"));
  }
  if (args.num_seqs < 0 || args.num_seqs > 65535 || args.num_heads <= 0 || args.num_kv_heads <= 0 ||
      args.num_heads % args.num_kv_heads != 0 || args.num_heads / args.num_kv_heads > 16 ||
      args.num_kv_heads > 65535 || args.block_tokens <= 0 || args.max_seq_len <= 0 ||
      args.max_blocks_per_seq < CeilDiv(args.max_seq_len, args.block_tokens)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PagedDecodeAttention: bad shape seqs=", args.num_seqs, " heads=", args.num_heads,
        " kv_heads=", args.num_kv_heads, " block_tokens=", args.block_tokens,
        " max_seq_len=", args.max_seq_len, " max_blocks_per_seq=", args.max_blocks_per_seq,
        " (query heads per KV head at most 16)"));
  }
  if (args.q_stride < args.num_heads * args.head_dim ||
      args.out_stride < args.num_heads * args.head_dim || args.q_stride % 4 != 0 ||
      args.workspace == nullptr) {
    return absl::InvalidArgumentError(
        "PagedDecodeAttention: q/out strides must cover a row (q_stride a multiple of 4), "
        "workspace must be set");
  }
  if (args.num_seqs == 0) return absl::OkStatus();
  if (args.head_dim == 64) return DispatchGroup<64>(args, AsStream(stream));
  return DispatchGroup<128>(args, AsStream(stream));
}

}  // namespace cuda
}  // namespace sparseaccel
