// Decode attention over a paged KV cache (flash-decoding): block (split, kv_head, sequence)
// takes one chunk of the sequence's keys for all query heads that share the KV head, so each
// K/V row is read once per group. A K or V row of one head is head_dim bf16 = head_dim / 8
// lanes of 16 bytes: a warp reads 32 / (head_dim / 8) rows per load, and each lane has
// kLoadsPerStep K and V loads in flight before their first use, which is what keeps HBM busy
// (one decode step is a pure stream over the pool). Each row group of lanes keeps its own
// per-head online softmax in fp32; the groups, then the warps, then (in a second kernel) the
// chunks are merged as (max, sum, output) partials. The number of chunks fills whole waves of
// resident blocks (occupancy queried once per process): one decode step is short enough that a
// last, partly filled wave costs as much as a full one.

#include <algorithm>
#include <cmath>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace sparseaccel {
namespace cuda {
namespace {

constexpr int kDecodeWarps = 4;
constexpr int kLoadsPerStep = 4;       // 16-byte K and V loads per lane per step.
constexpr int64_t kMinChunk = 64;      // Fewer keys per split are not worth a partial.
constexpr int64_t kDefaultWave = 396;  // 3 blocks on each of 132 SMs, where occupancy is unknown.

// Splits of each (sequence, KV head) row over `wave` blocks running at once: the fewest waves
// of blocks that keep 90% of the wave's slots busy (a partial wave leaves SMs idle while the
// last blocks of a pure memory stream finish), as many splits as fill them, and no split
// under kMinChunk keys.
int64_t NumSplits(int64_t rows, int64_t max_seq_len, int64_t wave) {
  const int64_t most = std::max<int64_t>(CeilDiv(max_seq_len, kMinChunk), 1);
  rows = std::max<int64_t>(rows, 1);
  for (int64_t waves = 1;; ++waves) {
    const int64_t splits = std::min(most, waves * wave / rows);
    if (splits < 1) continue;
    if (splits == most || rows * splits * 10 >= waves * wave * 9) return splits;
  }
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

// Merges the online-softmax state (max, sum, o) of `other` into `mine`; an empty state has
// max -INFINITY and contributes nothing.
template <int kWidth>
__device__ __forceinline__ void MergeState(float& max, float& sum, float (&o)[kWidth],
                                           float other_max, float other_sum,
                                           const float (&other_o)[kWidth]) {
  const float merged = fmaxf(max, other_max);
  const float mine = max == -INFINITY ? 0.f : exp2f(max - merged);
  const float theirs = other_max == -INFINITY ? 0.f : exp2f(other_max - merged);
  max = merged;
  sum = sum * mine + other_sum * theirs;
#pragma unroll
  for (int i = 0; i < kWidth; ++i) o[i] = o[i] * mine + other_o[i] * theirs;
}

template <int kHeadDim, int kMaxGroup>
__global__ void __launch_bounds__(kDecodeWarps * 32)
    DecodeChunkKernel(PagedDecodeArgs args, int64_t chunk, int num_splits, float scale_log2) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  constexpr int kRowsPerLoad = 32 / kLanesPerRow;
  constexpr int kKeysPerStep = kRowsPerLoad * kLoadsPerStep;  // Per warp.
  const int split = blockIdx.x, kv_head = blockIdx.y;
  const int64_t seq = blockIdx.z;
  const int group = static_cast<int>(args.num_heads / args.num_kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_in_load = lane / kLanesPerRow, dim0 = (lane % kLanesPerRow) * 8;
  const int64_t len = min(static_cast<int64_t>(args.seq_lens[seq]), args.max_seq_len);
  const int64_t begin = split * chunk, end = min(begin + chunk, len);

  float q[kMaxGroup][8], o[kMaxGroup][8], row_max[kMaxGroup], row_sum[kMaxGroup];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h < group) {
      // q rows are 8-byte aligned (q_stride % 4 == 0): two loads of 4 values.
      const uint16_t* src = args.q + seq * args.q_stride + (kv_head * group + h) * kHeadDim + dim0;
      const uint2 lo = *reinterpret_cast<const uint2*>(src);
      const uint2 hi = *reinterpret_cast<const uint2*>(src + 4);
      Unpack8(make_uint4(lo.x, lo.y, hi.x, hi.y), q[h]);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      q[h][i] = h < group ? q[h][i] * scale_log2 : 0.f;
      o[h][i] = 0;
    }
    row_max[h] = -INFINITY;
    row_sum[h] = 0;
  }
  const int32_t* table = args.block_tables + seq * args.max_blocks_per_seq;
  const int64_t row_stride = args.num_kv_heads * kHeadDim;
  const uint32_t block_tokens = static_cast<uint32_t>(args.block_tokens);
  // Pool rows of this lane's keys in the step at `base` (keys past `end` repeat the last one
  // and are weighted 0).
  auto rows_of = [&](int64_t base, int64_t(&rows)[kLoadsPerStep]) {
#pragma unroll
    for (int u = 0; u < kLoadsPerStep; ++u) {
      const uint32_t pos =
          static_cast<uint32_t>(min(base + u * kRowsPerLoad + row_in_load, end - 1));
      rows[u] = int64_t{table[pos / block_tokens]} * block_tokens + pos % block_tokens;
    }
  };
  constexpr int64_t kBlockStep = int64_t{kDecodeWarps} * kKeysPerStep;
  int64_t rows[kLoadsPerStep];
  int64_t base = begin + warp * kKeysPerStep;
  if (base < end) rows_of(base, rows);
  for (; base < end; base += kBlockStep) {
    uint4 k_bits[kLoadsPerStep], v_bits[kLoadsPerStep];
#pragma unroll
    for (int u = 0; u < kLoadsPerStep; ++u) {
      const int64_t element = rows[u] * row_stride + kv_head * kHeadDim + dim0;
      k_bits[u] = __ldg(reinterpret_cast<const uint4*>(args.k_pool + element));
      v_bits[u] = __ldg(reinterpret_cast<const uint4*>(args.v_pool + element));
    }
    // The next step's table entries load while this step's K/V are in flight.
    if (base + kBlockStep < end) rows_of(base + kBlockStep, rows);
    bool valid[kLoadsPerStep];
#pragma unroll
    for (int u = 0; u < kLoadsPerStep; ++u) valid[u] = base + u * kRowsPerLoad + row_in_load < end;
    float dot[kMaxGroup][kLoadsPerStep];
#pragma unroll
    for (int u = 0; u < kLoadsPerStep; ++u) {
      float k[8];
      Unpack8(k_bits[u], k);
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        if (h >= group) break;
        dot[h][u] = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot[h][u] += q[h][i] * k[i];
      }
    }
    // Sums over the lanes of a row (all lanes take part: the shuffles need the whole warp).
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h >= group) break;
#pragma unroll
      for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
#pragma unroll
        for (int u = 0; u < kLoadsPerStep; ++u)
          dot[h][u] += __shfl_xor_sync(~0u, dot[h][u], offset);
      }
    }
    float v[kLoadsPerStep][8];
#pragma unroll
    for (int u = 0; u < kLoadsPerStep; ++u) Unpack8(v_bits[u], v[u]);
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h >= group) break;
      float step_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < kLoadsPerStep; ++u) {
        if (valid[u]) step_max = fmaxf(step_max, dot[h][u]);
      }
      const float new_max = fmaxf(row_max[h], step_max);
      // Before this row group's first key its state stays empty.
      if (new_max == -INFINITY) continue;
      const float correction = exp2f(row_max[h] - new_max);
      row_max[h] = new_max;
      row_sum[h] *= correction;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[h][i] *= correction;
#pragma unroll
      for (int u = 0; u < kLoadsPerStep; ++u) {
        const float p = valid[u] ? exp2f(dot[h][u] - new_max) : 0.f;
        row_sum[h] += p;
#pragma unroll
        for (int i = 0; i < 8; ++i) o[h][i] += p * v[u][i];
      }
    }
  }

  // The row groups of a warp hold the same dimensions of different keys: merge them by
  // shuffles, then the warps through shared memory, and write this split's partial.
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h >= group) break;
#pragma unroll
    for (int offset = kLanesPerRow; offset < 32; offset *= 2) {
      float other_o[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) other_o[i] = __shfl_xor_sync(~0u, o[h][i], offset);
      const float other_max = __shfl_xor_sync(~0u, row_max[h], offset);
      const float other_sum = __shfl_xor_sync(~0u, row_sum[h], offset);
      MergeState(row_max[h], row_sum[h], o[h], other_max, other_sum, other_o);
    }
  }
  __shared__ float shared_o[kDecodeWarps][kMaxGroup][kHeadDim];
  __shared__ float shared_max_sum[kDecodeWarps][kMaxGroup][2];
  if (row_in_load == 0) {
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h >= group) break;
#pragma unroll
      for (int i = 0; i < 8; ++i) shared_o[warp][h][dim0 + i] = o[h][i];
      if (lane == 0) {
        shared_max_sum[warp][h][0] = row_max[h];
        shared_max_sum[warp][h][1] = row_sum[h];
      }
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

// Online-softmax state of one output element: running max, sum of weights, weighted o.
struct MergeAccumulator {
  float max = -INFINITY, sum = 0.f, o[1] = {0.f};

  __device__ __forceinline__ void Add(float other_max, float other_sum, float other_o) {
    const float other[1] = {other_o};
    MergeState(max, sum, o, other_max, other_sum, other);
  }
};

constexpr int kMergeGroups = 4;  // Thread groups sharing the splits of one head.

// Block (head, sequence) of kHeadDim x kMergeGroups threads: group g merges splits g, g + 4, ...
// (independent loads in flight instead of one serial chain over all splits), then group 0
// combines the groups: out = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M).
template <int kHeadDim>
__global__ void DecodeMergeKernel(PagedDecodeArgs args, int num_splits) {
  const int64_t head = blockIdx.x, seq = blockIdx.y;
  const int d = threadIdx.x, group = threadIdx.y;
  const Partials partials =
      PartialsIn(args.workspace, args.num_seqs, args.num_heads, num_splits, kHeadDim);
  const int64_t slot0 = (seq * args.num_heads + head) * num_splits;
  MergeAccumulator acc;
#pragma unroll 4
  for (int s = group; s < num_splits; s += kMergeGroups) {
    const int64_t slot = slot0 + s;
    acc.Add(partials.max_sum[slot * 2], partials.max_sum[slot * 2 + 1],
            partials.o[slot * kHeadDim + d]);
  }
  __shared__ MergeAccumulator shared[kMergeGroups][kHeadDim];
  shared[group][d] = acc;
  __syncthreads();
  if (group != 0) return;
#pragma unroll
  for (int g = 1; g < kMergeGroups; ++g) {
    acc.Add(shared[g][d].max, shared[g][d].sum, shared[g][d].o[0]);
  }
  args.out[seq * args.out_stride + head * kHeadDim + d] =
      FloatToBf16Bits(acc.sum > 0 ? acc.o[0] / acc.sum : 0.f);
}

// Blocks of one DecodeChunkKernel variant resident at once on the current device, found once
// per process.
template <int kHeadDim, int kMaxGroup>
int64_t WaveBlocks() {
  static const int64_t wave = [] {
    int device = 0, sms = 0, per_sm = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, DecodeChunkKernel<kHeadDim, kMaxGroup>, kDecodeWarps * 32, 0) != cudaSuccess ||
        sms * per_sm == 0) {
      cudaGetLastError();
      return kDefaultWave;
    }
    return int64_t{sms} * per_sm;
  }();
  return wave;
}

template <int kHeadDim, int kMaxGroup>
int64_t Splits(const PagedDecodeArgs& args) {
  return NumSplits(args.num_seqs * args.num_kv_heads, args.max_seq_len,
                   WaveBlocks<kHeadDim, kMaxGroup>());
}

template <int kHeadDim, int kMaxGroup>
absl::Status LaunchDecode(const PagedDecodeArgs& args, cudaStream_t stream) {
  const int64_t splits = Splits<kHeadDim, kMaxGroup>(args);
  const int64_t chunk = CeilDiv(args.max_seq_len, splits);
  const float scale_log2 = static_cast<float>(M_LOG2E / std::sqrt(double{kHeadDim}));
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(args.num_kv_heads),
                  static_cast<unsigned>(args.num_seqs));
  DecodeChunkKernel<kHeadDim, kMaxGroup>
      <<<grid, kDecodeWarps * 32, 0, stream>>>(args, chunk, static_cast<int>(splits), scale_log2);
  RETURN_IF_LAUNCH_FAILED("DecodeChunkKernel");
  const dim3 merge_grid(static_cast<unsigned>(args.num_heads),
                        static_cast<unsigned>(args.num_seqs));
  DecodeMergeKernel<kHeadDim>
      <<<merge_grid, dim3(kHeadDim, kMergeGroups), 0, stream>>>(args, static_cast<int>(splits));
  return LaunchStatus("DecodeMergeKernel");
}

// Calls `run.template operator()<kHeadDim, kMaxGroup>()` for the kernel variant of the shape.
template <typename Run>
auto DispatchShape(const PagedDecodeArgs& args, const Run& run) {
  const int64_t group = args.num_heads / std::max<int64_t>(args.num_kv_heads, 1);
  if (args.head_dim == 64) {
    if (group <= 4) return run.template operator()<64, 4>();
    if (group <= 8) return run.template operator()<64, 8>();
    return run.template operator()<64, 16>();
  }
  if (group <= 4) return run.template operator()<128, 4>();
  if (group <= 8) return run.template operator()<128, 8>();
  return run.template operator()<128, 16>();
}

struct SplitsOf {
  const PagedDecodeArgs& args;
  template <int kHeadDim, int kMaxGroup>
  int64_t operator()() const {
    return Splits<kHeadDim, kMaxGroup>(args);
  }
};

struct Launch {
  const PagedDecodeArgs& args;
  cudaStream_t stream;
  template <int kHeadDim, int kMaxGroup>
  absl::Status operator()() const {
    return LaunchDecode<kHeadDim, kMaxGroup>(args, stream);
  }
};

}  // namespace

size_t PagedDecodeWorkspaceBytes(const PagedDecodeArgs& shape) {
  const int64_t splits = DispatchShape(shape, SplitsOf{shape});
  return static_cast<size_t>(shape.num_seqs * shape.num_heads * splits * (shape.head_dim + 2)) *
         sizeof(float);
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
  return DispatchShape(args, Launch{args, AsStream(stream)});
}

}  // namespace cuda
}  // namespace sparseaccel
