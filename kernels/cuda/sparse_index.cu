// Building a layer's DeviceSparseIndex on the GPU, the twin of kernels/sparse/sparse_index.cc:
//
// vertical-slash heads
//   1. LastQueryKernel<pass 0>: the last `last_q` queries' scores against every key chunk on
//      tensor cores; per chunk and query, the running max and exp-sum (online softmax).
//   2. CombineStatsKernel: each query's softmax max and denominator over all chunks.
//   3. LastQueryKernel<pass 1>: the scores again, now as probabilities; column sums per key
//      and diagonal sums per offset (query - key), in a fixed order per chunk.
//   4. ForceKernel: the first 4 columns and offsets 0..63 get +inf (always kept).
//   5. Top-k by radix select, per (head, columns or offsets) segment: four 8-bit digit
//      histograms (DigitHistogramKernel, SelectDigitKernel) find the k-th largest score T;
//      CountKeptKernel and WriteKeptKernel then keep every score above T and the first ones
//      equal to T, written in ascending index order. That is the CPU rule (larger first, ties
//      to the smaller index) without sorting.
//   6. ConvertKernel: one warp per (head, query block) runs Algorithm 2 over the kept offsets
//      (far first) and columns, as ConvertVerticalSlash does.
// block-sparse heads: PoolKernel (block means of Q and K), then BlockSparseKernel: one thread
//   block per (head, query block) scores the causal key blocks, sorts them (bitonic, the
//   diagonal forced first, ties to the smaller block) and keeps the top k in ascending order.
// A-shape and dense heads: ConvertKernel writes their fixed ranges.

#include <algorithm>
#include <climits>
#include <cmath>
#include <cub/block/block_scan.cuh>

#include "common/status_macros.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/flash_tile.cuh"
#include "kernels/cuda/sparse_attention.h"

namespace sparseaccel {
namespace cuda {
namespace {

constexpr int kDense = static_cast<int>(HeadPattern::Kind::kDense);
constexpr int kAShape = static_cast<int>(HeadPattern::Kind::kAShape);
constexpr int kVerticalSlash = static_cast<int>(HeadPattern::Kind::kVerticalSlash);
constexpr int kBlockSparse = static_cast<int>(HeadPattern::Kind::kBlockSparse);

constexpr int kMaxLastQ = 64;  // One 64-row query tile: 4 warps x 16 rows.
constexpr int kEstimateThreads = 128;
constexpr int kEstimateKeys = 64;   // Keys per tile.
constexpr int kChunkKeys = 1024;    // Keys per thread block.
constexpr int kForcedColumns = 4;   // As VerticalSlashIndex.
constexpr int kForcedSlashes = 64;  // kBlockSize offsets.
constexpr int kMaxBlockSparseBlocks =
    8192;                         // 512K tokens: the bitonic sort lives in shared memory.
constexpr int kConvertWarps = 4;  // Warps per thread block of ConvertKernel.
// Radix select: 4 passes of 8-bit digits, most significant first; chunks of 4096 scores.
constexpr int kDigitBits = 8, kDigits = 1 << kDigitBits, kSelectPasses = 32 / kDigitBits;
constexpr int kSelectThreads = 256, kSelectPerThread = 16;
constexpr int kSelectChunk = kSelectThreads * kSelectPerThread;

int64_t NumBlocks(int64_t n) { return CeilDiv(n, kBlockSize); }

// Where everything lives in the workspace (offsets from its start, 256-byte aligned).
struct Layout {
  int64_t n = 0, heads = 0, kv_heads = 0, head_dim = 0, blocks = 0, chunks = 0;
  int64_t max_columns = 0;
  bool vertical_slash = false, block_sparse = false;
  size_t range_count = 0, range_start = 0, column_count = 0, column_index = 0;
  size_t pair_range_count = 0, pair_ranges = 0, pair_column_count = 0, pair_columns = 0,
         pair_column_flags = 0;
  // Vertical-slash scratch.
  int64_t select_chunks = 0;
  size_t partial_stats = 0, stats = 0, scores = 0, kept = 0, select_state = 0, digit_histogram = 0,
         chunk_counts = 0;
  // Block-sparse scratch.
  size_t pooled_q = 0, pooled_k = 0;
  size_t total = 0;
};

size_t Take(size_t* cursor, size_t bytes) {
  const size_t at = *cursor;
  *cursor += (bytes + 255) / 256 * 256;
  return at;
}

Layout MakeLayout(const SparseIndexArgs& args) {
  Layout l;
  l.n = args.num_tokens;
  l.heads = args.num_heads;
  l.kv_heads = args.num_kv_heads;
  l.head_dim = args.head_dim;
  l.blocks = NumBlocks(l.n);
  l.chunks = CeilDiv(l.n, kChunkKeys);
  for (const DeviceHeadPattern& p : *args.host_patterns) {
    if (p.kind == kVerticalSlash) {
      l.vertical_slash = true;
      l.max_columns = std::max<int64_t>(l.max_columns, std::min<int64_t>(p.vertical, l.n));
    }
    l.block_sparse |= p.kind == kBlockSparse;
  }
  const size_t rows = static_cast<size_t>(l.heads * l.blocks);
  size_t at = 0;
  l.range_count = Take(&at, rows * 4);
  l.range_start = Take(&at, static_cast<size_t>(l.heads) * (l.blocks * (l.blocks + 1) / 2) * 4);
  l.column_count = Take(&at, rows * 4);
  l.column_index = Take(&at, rows * l.max_columns * 4);
  const size_t pairs = static_cast<size_t>(l.heads * CeilDiv(l.blocks, 2));
  l.pair_range_count = Take(&at, pairs * 4);
  l.pair_ranges = Take(&at, static_cast<size_t>(l.heads) *
                                DeviceSparseIndex::PairRangeOffset(CeilDiv(l.blocks, 2)) * 4);
  l.pair_column_count = Take(&at, pairs * 4);
  l.pair_columns = Take(&at, pairs * 2 * l.max_columns * 4);
  l.pair_column_flags =
      Take(&at, pairs * CeilDiv(2 * l.max_columns, DeviceSparseIndex::kColumnFlagSpan));
  if (l.vertical_slash) {
    const size_t segments = static_cast<size_t>(2 * l.heads);
    l.select_chunks = CeilDiv(l.n, kSelectChunk);
    l.partial_stats = Take(&at, static_cast<size_t>(l.heads * l.chunks) * kMaxLastQ * 8);
    l.stats = Take(&at, static_cast<size_t>(l.heads) * kMaxLastQ * 8);
    l.scores = Take(&at, segments * l.n * 4);
    l.kept = Take(&at, segments * l.n * 4);
    l.select_state = Take(&at, segments * 8);
    l.digit_histogram = Take(&at, kSelectPasses * segments * kDigits * 4);
    l.chunk_counts = Take(&at, segments * l.select_chunks * 4);
  }
  if (l.block_sparse) {
    l.pooled_q = Take(&at, static_cast<size_t>(l.heads * l.blocks * l.head_dim) * 4);
    l.pooled_k = Take(&at, static_cast<size_t>(l.kv_heads * l.blocks * l.head_dim) * 4);
  }
  l.total = at;
  return l;
}

template <typename T>
T* At(void* base, size_t offset) {
  return reinterpret_cast<T*>(static_cast<unsigned char*>(base) + offset);
}

// ---- Vertical-slash estimation ----

// Order-preserving map of a float to an unsigned integer (larger float, larger integer).
__device__ __forceinline__ uint32_t OrderedBits(float x) {
  const uint32_t bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// Segment s < heads holds head s's column scores, segment heads + s its diagonal scores.
struct VerticalSlashScratch {
  float2* partial_stats;      // [heads][chunks][64]: (max, sum of exp(score - max)).
  float2* stats;              // [heads][64]: (max, sum) over all keys.
  float* scores;              // [2 heads][n]
  int32_t* kept;              // [2 heads][n]: the first k entries, the kept indices ascending.
  uint2* select_state;        // [2 heads]: (digits of T found so far, how many equal to them
                              // are still to keep); k = 0 for heads of other patterns.
  uint32_t* digit_histogram;  // [passes][2 heads][256]
  uint32_t* chunk_counts;     // [2 heads][select chunks]: above T << 16 | equal to T.
};

__global__ void PrepareKernel(const DeviceHeadPattern* patterns, int heads, int n,
                              VerticalSlashScratch s) {
  const int segment = blockIdx.x;
  const int kind = segment / heads, head = segment % heads;
  const DeviceHeadPattern p = patterns[head];
  const bool active = p.kind == kVerticalSlash;
  if (threadIdx.x == 0) {
    const int budget = kind == 0 ? p.vertical : p.slash;
    s.select_state[segment] = make_uint2(0, active ? min(budget, n) : 0);
  }
  for (int i = threadIdx.x; i < kSelectPasses * kDigits; i += blockDim.x) {
    const int pass = i / kDigits;
    s.digit_histogram[(int64_t{pass} * 2 * heads + segment) * kDigits + i % kDigits] = 0;
  }
  if (!active || kind == 0) return;
  // Diagonal sums accumulate; column sums are set.
  for (int j = threadIdx.x; j < n; j += blockDim.x) s.scores[int64_t{segment} * n + j] = 0;
}

// Pass 0: per chunk of keys and estimating query, (max, exp-sum) of the scaled scores.
// Pass 1: probabilities exp(score - max) / sum, summed into columns and diagonals.
template <int kHeadDim, int kPass>
__global__ void __launch_bounds__(kEstimateThreads)
    LastQueryKernel(SparseIndexArgs args, VerticalSlashScratch s, float scale) {
  const int head = blockIdx.y;
  const DeviceHeadPattern p = args.patterns[head];
  if (p.kind != kVerticalSlash) return;
  const int n = static_cast<int>(args.num_tokens);
  const int last_q = min(p.last_q, n);
  const int q_pos0 = n - last_q;  // Position of estimating row 0.
  const int kv_head = head / static_cast<int>(args.num_heads / args.num_kv_heads);
  const int chunk = blockIdx.x;
  const int c0 = chunk * kChunkKeys, c1 = min(n, c0 + kChunkKeys);

  extern __shared__ __align__(128) unsigned char shared[];
  __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(shared);
  __nv_bfloat16* k_tile = q_tile + kMaxLastQ * kHeadDim;
  // Pass 1: probabilities of the tile [row][key] (padded row) and this chunk's diagonal sums,
  // offset o at o - o_min.
  constexpr int kProbStride = kEstimateKeys + 1;
  float* probs = reinterpret_cast<float*>(k_tile + kEstimateKeys * kHeadDim);
  float* diagonal_sums = probs + kMaxLastQ * kProbStride;
  const int o_min = q_pos0 - (c0 + kChunkKeys - 1);

  LoadTileRows<kHeadDim, kMaxLastQ, kEstimateThreads>(
      q_tile, args.q + head * kHeadDim, args.q_stride,
      [&](int r) -> int64_t { return r < last_q ? q_pos0 + r : -1; });
  if (kPass == 1) {
    for (int i = threadIdx.x; i < kChunkKeys + kMaxLastQ - 1; i += kEstimateThreads) {
      diagonal_sums[i] = 0;
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  FlashWarpState<kHeadDim, 1, kEstimateKeys> state;
  state.Init(q_tile, warp * 16);
  // This lane's two rows of the warp: r = 16 warp + lane/4 + 8 i.
  float row_max[2], row_sum[2];
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + lane / 4 + 8 * i;
    if (kPass == 0 || r >= last_q) {
      row_max[i] = -INFINITY;
      row_sum[i] = 0;
    } else {
      const float2 st = s.stats[head * kMaxLastQ + r];
      row_max[i] = st.x;
      row_sum[i] = st.y;
    }
  }
  for (int j0 = c0; j0 < c1; j0 += kEstimateKeys) {
    LoadTile<kHeadDim, kEstimateKeys, kEstimateThreads>(
        k_tile, args.k + int64_t{j0} * args.k_stride + kv_head * kHeadDim, args.k_stride, n - j0);
    CpAsyncCommit();
    CpAsyncWait<0>();
    __syncthreads();
    float sc[1][kEstimateKeys / 8][4];
    state.Scores(k_tile, sc);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int t = 0; t < kEstimateKeys / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = warp * 16 + lane / 4 + 8 * (e / 2);
        const int key = j0 + t * 8 + 2 * (lane % 4) + e % 2;
        const bool visible = r < last_q && key < n && key <= q_pos0 + r;
        sc[0][t][e] = visible ? sc[0][t][e] * scale : -INFINITY;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], sc[0][t][e]);
      }
    }
    if (kPass == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float new_max = fmaxf(row_max[i], tile_max[i]);
        if (new_max == -INFINITY) continue;
        float sum = row_sum[i] * expf(row_max[i] - new_max);
#pragma unroll
        for (int t = 0; t < kEstimateKeys / 8; ++t) {
          sum += expf(sc[0][t][2 * i] - new_max) + expf(sc[0][t][2 * i + 1] - new_max);
        }
        row_max[i] = new_max;
        row_sum[i] = sum;
      }
    } else {
#pragma unroll
      for (int t = 0; t < kEstimateKeys / 8; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp * 16 + lane / 4 + 8 * (e / 2);
          const float x = sc[0][t][e];
          probs[r * kProbStride + t * 8 + 2 * (lane % 4) + e % 2] =
              x == -INFINITY ? 0.f : expf(x - row_max[e / 2]) / row_sum[e / 2];
        }
      }
      __syncthreads();
      const int t = threadIdx.x;
      if (t < kEstimateKeys && j0 + t < n) {
        float column = 0;
        for (int r = 0; r < last_q; ++r) column += probs[r * kProbStride + t];
        s.scores[int64_t{head} * n + j0 + t] = column;
      }
      // Diagonal d = r - key_in_tile (-63 .. 63) is offset q_pos0 + d - j0.
      if (t < 2 * kEstimateKeys - 1) {
        const int d = t - (kEstimateKeys - 1);
        float diagonal = 0;
        for (int r = max(0, d); r < min(last_q, kEstimateKeys + d); ++r) {
          diagonal += probs[r * kProbStride + r - d];
        }
        diagonal_sums[q_pos0 + d - j0 - o_min] += diagonal;
      }
    }
    __syncthreads();  // The K tile and the probabilities are free again.
  }
  if (kPass == 0) {
    // Merge the 4 lanes of each row, then one lane per row writes.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      for (int mask = 1; mask <= 2; mask <<= 1) {
        const float other_max = __shfl_xor_sync(~0u, row_max[i], mask);
        const float other_sum = __shfl_xor_sync(~0u, row_sum[i], mask);
        const float new_max = fmaxf(row_max[i], other_max);
        if (new_max != -INFINITY) {
          row_sum[i] =
              row_sum[i] * expf(row_max[i] - new_max) + other_sum * expf(other_max - new_max);
          row_max[i] = new_max;
        }
      }
      const int r = warp * 16 + lane / 4 + 8 * i;
      if (lane % 4 == 0 && r < last_q) {
        s.partial_stats[(int64_t{head} * gridDim.x + chunk) * kMaxLastQ + r] =
            make_float2(row_max[i], row_sum[i]);
      }
    }
  } else {
    // Chunks overlap in at most kMaxLastQ - 1 offsets, so each sum gets at most two additions
    // onto zero: the result does not depend on their order.
    float* diagonal_out = s.scores + (int64_t{args.num_heads} + head) * n;
    for (int i = threadIdx.x; i < kChunkKeys + kMaxLastQ - 1; i += kEstimateThreads) {
      const int o = o_min + i;
      if (o >= 0 && o < n && diagonal_sums[i] != 0) atomicAdd(&diagonal_out[o], diagonal_sums[i]);
    }
  }
}

__global__ void CombineStatsKernel(const DeviceHeadPattern* patterns, int n, int chunks,
                                   VerticalSlashScratch s) {
  const int head = blockIdx.x, r = threadIdx.x;
  const DeviceHeadPattern p = patterns[head];
  if (p.kind != kVerticalSlash || r >= min(p.last_q, n)) return;
  const float2* partial = s.partial_stats + int64_t{head} * chunks * kMaxLastQ + r;
  float row_max = -INFINITY;
  for (int c = 0; c < chunks; ++c) row_max = fmaxf(row_max, partial[c * kMaxLastQ].x);
  float sum = 0;
  for (int c = 0; c < chunks; ++c) {
    const float2 st = partial[c * kMaxLastQ];
    if (st.x != -INFINITY) sum += st.y * expf(st.x - row_max);
  }
  s.stats[head * kMaxLastQ + r] = make_float2(row_max, sum);
}

__global__ void ForceKernel(const DeviceHeadPattern* patterns, int heads, int n,
                            VerticalSlashScratch s) {
  const int head = blockIdx.x;
  if (patterns[head].kind != kVerticalSlash) return;
  const int t = threadIdx.x;
  if (t < min(kForcedColumns, n)) s.scores[int64_t{head} * n + t] = INFINITY;
  if (t < min(kForcedSlashes, n)) s.scores[(int64_t{heads} + head) * n + t] = INFINITY;
}

// ---- Top-k of each segment by radix select ----

// Pass `pass` counts, per 8-bit digit, the scores whose higher digits equal those of T found
// so far. One thread block per (chunk of 4096 scores, segment).
__global__ void __launch_bounds__(kSelectThreads)
    DigitHistogramKernel(int n, int pass, VerticalSlashScratch s) {
  const int segment = blockIdx.y, segments = gridDim.y;
  const uint2 state = s.select_state[segment];
  if (state.y == 0) return;
  __shared__ uint32_t bins[kDigits];
  for (int i = threadIdx.x; i < kDigits; i += kSelectThreads) bins[i] = 0;
  __syncthreads();
  const int shift = 32 - kDigitBits * (pass + 1);
  const float* scores = s.scores + int64_t{segment} * n;
  const int begin = blockIdx.x * kSelectChunk, end = min(n, begin + kSelectChunk);
  // Uniform trip count, so that the whole warp meets in __match_any_sync.
  for (int j0 = begin; j0 < end; j0 += kSelectThreads) {
    const int j = j0 + threadIdx.x;
    int digit = kDigits;  // None.
    if (j < end) {
      const uint32_t key = OrderedBits(scores[j]);
      // pass 0 has no decided digits (and a shift by 32 would be undefined).
      if (pass == 0 || (key >> (shift + kDigitBits)) == state.x) digit = (key >> shift) & 0xff;
    }
    // Scores cluster in few digits: one shared atomic per distinct digit of the warp.
    const uint32_t same = __match_any_sync(~0u, digit);
    if (digit < kDigits && threadIdx.x % 32 == __ffs(same) - 1)
      atomicAdd(&bins[digit], __popc(same));
  }
  __syncthreads();
  uint32_t* histogram = s.digit_histogram + (int64_t{pass} * segments + segment) * kDigits;
  for (int i = threadIdx.x; i < kDigits; i += kSelectThreads) {
    if (bins[i] != 0) atomicAdd(&histogram[i], bins[i]);
  }
}

// One warp per segment: the digit of T at this pass, the largest digit d with at least k
// scores at or above it, and how many scores equal to T's digits so far remain to be kept.
__global__ void SelectDigitKernel(int pass, VerticalSlashScratch s) {
  const int segment = blockIdx.x, segments = gridDim.x, lane = threadIdx.x;
  uint2 state = s.select_state[segment];
  if (state.y == 0) return;
  const uint32_t* histogram = s.digit_histogram + (int64_t{pass} * segments + segment) * kDigits;
  constexpr int kPerLane = kDigits / 32;
  uint32_t bins[kPerLane], mine = 0;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    bins[e] = histogram[lane * kPerLane + e];
    mine += bins[e];
  }
  // Scores in this lane's digits and all higher lanes' digits.
  uint32_t at_or_above = mine;
#pragma unroll
  for (int delta = 1; delta < 32; delta <<= 1) {
    const uint32_t other = __shfl_down_sync(~0u, at_or_above, delta);
    if (lane + delta < 32) at_or_above += other;
  }
  uint32_t above = at_or_above - mine;
  if (!(above < state.y && state.y <= at_or_above)) return;  // One lane holds T's digit.
  int e = kPerLane - 1;
  for (; e > 0 && above + bins[e] < state.y; --e) above += bins[e];
  state.x = state.x << kDigitBits | static_cast<uint32_t>(lane * kPerLane + e);
  state.y -= above;
  s.select_state[segment] = state;
}

// Per thread, its kSelectPerThread consecutive scores of the chunk: above T << 16 | equal to T.
__device__ __forceinline__ uint32_t CountAgainst(const float* scores, int j0, int end, uint32_t t) {
  uint32_t counts = 0;
  for (int j = j0; j < min(end, j0 + kSelectPerThread); ++j) {
    const uint32_t key = OrderedBits(scores[j]);
    counts += key > t ? 1u << 16 : key == t ? 1u : 0u;
  }
  return counts;
}

using SelectScan = cub::BlockScan<uint32_t, kSelectThreads>;

// Per chunk: how many of its scores are above T and how many equal to it.
__global__ void __launch_bounds__(kSelectThreads) CountKeptKernel(int n, VerticalSlashScratch s) {
  const int segment = blockIdx.y, chunk = blockIdx.x;
  const uint2 state = s.select_state[segment];
  if (state.y == 0) return;
  const int begin = chunk * kSelectChunk, end = min(n, begin + kSelectChunk);
  const uint32_t counts = CountAgainst(s.scores + int64_t{segment} * n,
                                       begin + threadIdx.x * kSelectPerThread, end, state.x);
  __shared__ typename SelectScan::TempStorage scan;
  uint32_t prefix, chunk_counts;
  SelectScan(scan).ExclusiveSum(counts, prefix, chunk_counts);
  if (threadIdx.x == 0) s.chunk_counts[int64_t{segment} * gridDim.x + chunk] = chunk_counts;
}

// Writes the kept indices of a chunk at their ranks: every score above T, and those equal to T
// while fewer than state.y equal ones come before them in the segment.
__global__ void __launch_bounds__(kSelectThreads) WriteKeptKernel(int n, VerticalSlashScratch s) {
  const int segment = blockIdx.y, chunk = blockIdx.x;
  const uint2 state = s.select_state[segment];
  if (state.y == 0) return;
  __shared__ uint32_t earlier[2];  // Earlier chunks' scores above T and equal to T.
  if (threadIdx.x < 32) {
    uint32_t above = 0, equal = 0;
    for (int c = threadIdx.x; c < chunk; c += 32) {
      const uint32_t counts = s.chunk_counts[int64_t{segment} * gridDim.x + c];
      above += counts >> 16;
      equal += counts & 0xffff;
    }
    for (int mask = 16; mask > 0; mask >>= 1) {
      above += __shfl_xor_sync(~0u, above, mask);
      equal += __shfl_xor_sync(~0u, equal, mask);
    }
    if (threadIdx.x == 0) {
      earlier[0] = above;
      earlier[1] = equal;
    }
  }
  const float* scores = s.scores + int64_t{segment} * n;
  const int begin = chunk * kSelectChunk, end = min(n, begin + kSelectChunk);
  const int j0 = begin + threadIdx.x * kSelectPerThread;
  __shared__ typename SelectScan::TempStorage scan;
  uint32_t prefix;
  SelectScan(scan).ExclusiveSum(CountAgainst(scores, j0, end, state.x), prefix);
  __syncthreads();  // earlier[]
  uint32_t above = earlier[0] + (prefix >> 16), equal = earlier[1] + (prefix & 0xffff);
  int32_t* kept = s.kept + int64_t{segment} * n;
  for (int j = j0; j < min(end, j0 + kSelectPerThread); ++j) {
    const uint32_t key = OrderedBits(scores[j]);
    if (key > state.x) {
      kept[above++ + min(equal, state.y)] = j;
    } else if (key == state.x) {
      if (equal < state.y) kept[above + equal] = j;
      ++equal;
    }
  }
}

// ---- Index conversion: one warp per (head, query block) ----

struct IndexOut {
  int32_t* range_count;
  int32_t* range_start;
  int32_t* column_count;
  int32_t* column_index;
  int64_t max_columns;
};

// A warp's ranges of one query block, appended in ascending order.
struct RangeWriter {
  int32_t* ranges;
  int count = 0;
  int covered_until = 0;  // Keys below this are already in a range.

  // Tiles keys [lo, hi] minus those already covered with 64-key ranges (warp-uniform).
  __device__ void Cover(int lo, int hi, int lane) {
    const int start = max(lo, covered_until);
    if (start > hi) return;
    const int num = (hi - start) / static_cast<int>(kBlockSize) + 1;
    for (int i = lane; i < num; i += 32) {
      ranges[count + i] = start + i * static_cast<int>(kBlockSize);
    }
    count += num;
    covered_until = start + num * static_cast<int>(kBlockSize);
  }
};

// Appends the lanes' values whose `take` is set to out[count...], in lane order; returns the new
// count (warp-uniform call).
__device__ int WarpAppend(int32_t* out, int count, bool take, int32_t value, int lane) {
  const uint32_t ballot = __ballot_sync(~0u, take);
  if (take) out[count + __popc(ballot & ((1u << lane) - 1))] = value;
  return count + __popc(ballot);
}

// First index in ascending a[0, size) whose value exceeds x.
__device__ int UpperBound(const int32_t* a, int size, int x) {
  int lo = 0, hi = size;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (a[mid] <= x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void __launch_bounds__(32 * kConvertWarps)
    ConvertKernel(const DeviceHeadPattern* patterns, int heads, int n, const int32_t* kept,
                  IndexOut out) {
  constexpr int kBlock = static_cast<int>(kBlockSize);
  const int blocks = (n + kBlock - 1) / kBlock;
  const int64_t id = int64_t{blockIdx.x} * kConvertWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (id >= int64_t{heads} * blocks) return;
  const int head = static_cast<int>(id / blocks);
  const int b = blocks - 1 - static_cast<int>(id % blocks);  // Long rows first.
  const int64_t row = int64_t{head} * blocks + b;
  const DeviceHeadPattern p = patterns[head];
  if (p.kind == kBlockSparse) return;
  RangeWriter writer{out.range_start + int64_t{head} * (int64_t{blocks} * (blocks + 1) / 2) +
                     int64_t{b} * (b + 1) / 2};
  int columns = 0;
  if (p.kind == kDense || p.kind == kAShape) {
    for (int kb0 = 0; kb0 <= b; kb0 += 32) {
      const int kb = kb0 + lane;
      const bool take =
          kb <= b && (p.kind == kDense || kb < p.sink_blocks || kb > b - p.window_blocks);
      writer.count = WarpAppend(writer.ranges, writer.count, take, kb * kBlock, lane);
    }
  } else {
    const int q0 = b * kBlock, q1 = min(n, q0 + kBlock);
    const int32_t* verticals = kept + int64_t{head} * n;          // Ascending.
    const int32_t* slashes = kept + (int64_t{heads} + head) * n;  // Ascending: walked backwards.
    // Offsets far to near give intervals [q0 - o, q1 - 1 - o] (clipped at 0) with ascending
    // starts and ends. Offsets above q1 - 1 see no key. An offset opens a new merged interval
    // when it is more than q1 - q0 below the one before it (with the clip at 0 that never
    // happens: both then see key 0).
    int walked = UpperBound(slashes, min(p.slash, n), q1 - 1);
    int lo = 0, last = 0;  // The open interval's start; the previous offset walked.
    bool open = false;
    while (walked > 0) {
      const int i = walked - 1 - lane;
      const int o = i >= 0 ? slashes[i] : 0;
      int before = __shfl_up_sync(~0u, o, 1);
      if (lane == 0) before = last;
      uint32_t starts =
          __ballot_sync(~0u, i >= 0 && ((!open && lane == 0) || before - o > q1 - q0));
      while (starts != 0) {
        const int at = __ffs(starts) - 1;
        starts &= starts - 1;
        const int end_offset = at == 0 ? last : __shfl_sync(~0u, o, at - 1);
        if (open) writer.Cover(lo, q1 - 1 - end_offset, lane);
        lo = max(0, q0 - __shfl_sync(~0u, o, at));
        open = true;
      }
      last = __shfl_sync(~0u, o, min(31, walked - 1));
      walked -= 32;
    }
    if (open) writer.Cover(lo, q1 - 1 - last, lane);
    __syncwarp();  // The ranges, read back below.
    // Columns inside a range are dropped (the range computes them).
    int32_t* column_out = out.column_index + row * out.max_columns;
    const int num_verticals = min(p.vertical, n);
    for (int i0 = 0; i0 < num_verticals; i0 += 32) {
      const int i = i0 + lane;
      const int col = i < num_verticals ? verticals[i] : INT_MAX;
      bool take = col < q1;
      if (take) {
        const int r = UpperBound(writer.ranges, writer.count, col) - 1;  // Last start <= col.
        take = r < 0 || writer.ranges[r] + kBlock <= col;
      }
      columns = WarpAppend(column_out, columns, take, col, lane);
      if (__any_sync(~0u, col >= q1)) break;  // Ascending: the rest lie past the block.
    }
  }
  if (lane == 0) {
    out.range_count[row] = writer.count;
    out.column_count[row] = columns;
  }
}

// ---- Pairs of query blocks for the attention kernel: one thread per (head, pair) ----

// Walks two ascending lists in order: emit(value, owners) once per distinct value, owners
// bit 0 if `a` has it, bit 1 if `b` has it.
template <typename Emit>
__device__ void MergeAscending(const int32_t* a, int a_count, const int32_t* b, int b_count,
                               const Emit& emit) {
  int i = 0, j = 0;
  while (i < a_count || j < b_count) {
    const int32_t front_a = i < a_count ? a[i] : INT_MAX;
    const int32_t front_b = j < b_count ? b[j] : INT_MAX;
    const int32_t value = min(front_a, front_b);
    const uint32_t owners = (front_a == value ? 1u : 0u) | (front_b == value ? 2u : 0u);
    i += owners & 1;
    j += owners >> 1;
    emit(value, owners);
  }
}

// Owner bits 0/1 as DeviceSparseIndex's entry bits.
__device__ uint32_t OwnerBits(uint32_t owners) {
  return (owners & 1 ? DeviceSparseIndex::kFirstBlockColumn : 0) |
         (owners & 2 ? DeviceSparseIndex::kSecondBlockColumn : 0);
}

// Per (head, pair c): the union of the two blocks' range starts and of their column lists,
// each entry with owner bits, and the columns' span flags (DeviceSparseIndex). The last pair
// of an odd count is block 2c alone.
__global__ void PairKernel(int heads, int blocks, DeviceSparseIndex index) {
  using Index = DeviceSparseIndex;
  const int pairs = (blocks + 1) / 2;
  const int64_t id = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (id >= int64_t{heads} * pairs) return;
  const int head = static_cast<int>(id / pairs), b = 2 * static_cast<int>(id % pairs);
  const bool single = b + 1 == blocks;
  const int64_t row = int64_t{head} * blocks + b;
  const int32_t* slots = index.range_start + head * (int64_t{blocks} * (blocks + 1) / 2);
  const int32_t* first = slots + int64_t{b} * (b + 1) / 2;
  const int32_t* second = slots + int64_t{b + 1} * (b + 2) / 2;
  const int first_count = index.range_count[row];
  const int second_count = single ? 0 : index.range_count[row + 1];
  uint32_t* merged =
      index.pair_ranges + head * index.PairRangeSlotsPerHead() + Index::PairRangeOffset(b / 2);
  int written_ranges = 0;
  MergeAscending(first, first_count, second, second_count, [&](int32_t start, uint32_t owners) {
    merged[written_ranges++] = static_cast<uint32_t>(start) | OwnerBits(owners);
  });
  index.pair_range_count[id] = written_ranges;

  const int32_t* columns[2] = {index.column_index + row * index.max_columns,
                               index.column_index + (row + 1) * index.max_columns};
  const int counts[2] = {index.column_count[row], single ? 0 : index.column_count[row + 1]};
  uint32_t* out = index.pair_columns + id * index.PairColumnSlots();
  uint8_t* flags = index.pair_column_flags + id * index.PairColumnFlagSlots();
  int written = 0;
  uint32_t span_all = 3, span_any = 0;
  MergeAscending(columns[0], counts[0], columns[1], counts[1], [&](int32_t key, uint32_t owners) {
    out[written] = static_cast<uint32_t>(key) | OwnerBits(owners);
    span_all &= owners;
    span_any |= owners;
    ++written;
    if (written % Index::kColumnFlagSpan == 0) {
      flags[written / Index::kColumnFlagSpan - 1] = static_cast<uint8_t>(span_all | span_any << 2);
      span_all = 3;
      span_any = 0;
    }
  });
  if (written % Index::kColumnFlagSpan != 0) {
    flags[written / Index::kColumnFlagSpan] = static_cast<uint8_t>(span_all | span_any << 2);
  }
  index.pair_column_count[id] = written;
}

// ---- Block-sparse ----

__global__ void PoolKernel(SparseIndexArgs args, float* pooled_q, float* pooled_k) {
  const int b = blockIdx.x, which = blockIdx.y, d = threadIdx.x;
  const int n = static_cast<int>(args.num_tokens), heads = static_cast<int>(args.num_heads);
  const int blocks = gridDim.x;
  const bool is_q = which < heads;
  if (is_q && args.patterns[which].kind != kBlockSparse) return;
  const uint16_t* src =
      is_q ? args.q + which * args.head_dim : args.k + (which - heads) * args.head_dim;
  const int64_t stride = is_q ? args.q_stride : args.k_stride;
  const int r0 = b * static_cast<int>(kBlockSize), r1 = min(n, r0 + static_cast<int>(kBlockSize));
  float sum = 0;
  for (int r = r0; r < r1; ++r) sum += Bf16BitsToFloat(src[r * stride + d]);
  float* dst = is_q ? pooled_q + (int64_t{which} * blocks + b) * args.head_dim
                    : pooled_k + (int64_t{which - heads} * blocks + b) * args.head_dim;
  dst[d] = sum / static_cast<float>(r1 - r0);
}

__global__ void BlockSparseKernel(SparseIndexArgs args, const float* pooled_q,
                                  const float* pooled_k, float scale, IndexOut out) {
  const int head = blockIdx.y;
  const DeviceHeadPattern p = args.patterns[head];
  if (p.kind != kBlockSparse) return;
  const int blocks = gridDim.x;
  const int b = blocks - 1 - blockIdx.x;
  const int candidates = b + 1;
  int padded = 1;
  while (padded < candidates) padded <<= 1;
  extern __shared__ __align__(128) unsigned char shared[];
  // Sort keys: ordered score in the high half, ~block in the low half, so a descending sort
  // puts higher scores first and, among equal scores, the smaller block first.
  uint64_t* keys = reinterpret_cast<uint64_t*>(shared);
  unsigned char* chosen = reinterpret_cast<unsigned char*>(keys + padded);
  const int d = static_cast<int>(args.head_dim);
  const int kv_head = head / static_cast<int>(args.num_heads / args.num_kv_heads);
  const float* q = pooled_q + (int64_t{head} * blocks + b) * d;
  for (int kb = threadIdx.x; kb < padded; kb += blockDim.x) {
    uint64_t key = 0;
    if (kb < candidates) {
      const float* k = pooled_k + (int64_t{kv_head} * blocks + kb) * d;
      float dot = 0;
      for (int t = 0; t < d; ++t) dot += q[t] * k[t];
      const float score = kb == b ? INFINITY : dot * scale;  // The diagonal block is forced.
      key = (uint64_t{OrderedBits(score)} << 32) | (0xffffffffu - static_cast<uint32_t>(kb));
      chosen[kb] = 0;
    }
    keys[kb] = key;
  }
  __syncthreads();
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int i = threadIdx.x; i < padded; i += blockDim.x) {
        const int partner = i ^ stride;
        if (partner > i) {
          const uint64_t a = keys[i], c = keys[partner];
          const bool descending = (i & size) == 0;
          if ((a < c) == descending) {
            keys[i] = c;
            keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  const int keep = min(p.top_k, candidates);
  for (int i = threadIdx.x; i < keep; i += blockDim.x) {
    chosen[0xffffffffu - static_cast<uint32_t>(keys[i] & 0xffffffffu)] = 1;
  }
  __syncthreads();
  if (threadIdx.x >= 32) return;
  // Ascending compaction by one warp.
  const int64_t row = int64_t{head} * blocks + b;
  int32_t* ranges = out.range_start + int64_t{head} * (int64_t{blocks} * (blocks + 1) / 2) +
                    int64_t{b} * (b + 1) / 2;
  int count = 0;
  for (int base = 0; base < candidates; base += 32) {
    const int kb = base + threadIdx.x;
    const bool take = kb < candidates && chosen[kb];
    count = WarpAppend(ranges, count, take, kb * static_cast<int>(kBlockSize), threadIdx.x);
  }
  if (threadIdx.x == 0) {
    out.range_count[row] = count;
    out.column_count[row] = 0;
  }
}

template <int kHeadDim>
absl::Status LaunchVerticalSlash(const SparseIndexArgs& args, const Layout& l,
                                 VerticalSlashScratch s, cudaStream_t stream) {
  const int heads = static_cast<int>(l.heads), n = static_cast<int>(l.n);
  PrepareKernel<<<2 * heads, 256, 0, stream>>>(args.patterns, heads, n, s);
  RETURN_IF_LAUNCH_FAILED("PrepareKernel");
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(kHeadDim)));
  const dim3 grid(static_cast<unsigned>(l.chunks), static_cast<unsigned>(heads));
  constexpr int kShared = (kMaxLastQ + kEstimateKeys) * kHeadDim * 2 +
                          (kMaxLastQ * (kEstimateKeys + 1) + kChunkKeys + kMaxLastQ) * 4;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(LastQueryKernel<kHeadDim, 0>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, kShared));
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(LastQueryKernel<kHeadDim, 1>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, kShared));
  LastQueryKernel<kHeadDim, 0><<<grid, kEstimateThreads, kShared, stream>>>(args, s, scale);
  RETURN_IF_LAUNCH_FAILED("LastQueryKernel<0>");
  CombineStatsKernel<<<heads, kMaxLastQ, 0, stream>>>(args.patterns, n, static_cast<int>(l.chunks),
                                                      s);
  RETURN_IF_LAUNCH_FAILED("CombineStatsKernel");
  LastQueryKernel<kHeadDim, 1><<<grid, kEstimateThreads, kShared, stream>>>(args, s, scale);
  RETURN_IF_LAUNCH_FAILED("LastQueryKernel<1>");
  ForceKernel<<<heads, kForcedSlashes, 0, stream>>>(args.patterns, heads, n, s);
  RETURN_IF_LAUNCH_FAILED("ForceKernel");
  const dim3 select_grid(static_cast<unsigned>(l.select_chunks), static_cast<unsigned>(2 * heads));
  for (int pass = 0; pass < kSelectPasses; ++pass) {
    DigitHistogramKernel<<<select_grid, kSelectThreads, 0, stream>>>(n, pass, s);
    RETURN_IF_LAUNCH_FAILED("DigitHistogramKernel");
    SelectDigitKernel<<<2 * heads, 32, 0, stream>>>(pass, s);
    RETURN_IF_LAUNCH_FAILED("SelectDigitKernel");
  }
  CountKeptKernel<<<select_grid, kSelectThreads, 0, stream>>>(n, s);
  RETURN_IF_LAUNCH_FAILED("CountKeptKernel");
  WriteKeptKernel<<<select_grid, kSelectThreads, 0, stream>>>(n, s);
  RETURN_IF_LAUNCH_FAILED("WriteKeptKernel");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DeviceHeadPattern> ToDevicePattern(const HeadPattern& pattern) {
  DeviceHeadPattern p;
  p.kind = static_cast<int32_t>(pattern.kind);
  const VerticalSlashBudget& vs = pattern.vertical_slash;
  if (pattern.sink < 0 || pattern.window < 0 || vs.vertical < 0 || vs.slash < 0 || vs.last_q < 0 ||
      vs.last_q > kMaxLastQ || pattern.top_k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparse pattern ", PatternName(pattern.kind),
                     ": budgets must be >= 0 and last_q <= ", kMaxLastQ));
  }
  constexpr int64_t kCap = int64_t{1} << 30;
  p.sink_blocks = static_cast<int32_t>(std::min(kCap, NumBlocks(pattern.sink)));
  p.window_blocks =
      static_cast<int32_t>(std::min(kCap, std::max<int64_t>(1, NumBlocks(pattern.window))));
  p.vertical = static_cast<int32_t>(std::min(kCap, std::max<int64_t>(vs.vertical, kForcedColumns)));
  p.slash = static_cast<int32_t>(std::min(kCap, std::max<int64_t>(vs.slash, kForcedSlashes)));
  p.last_q = static_cast<int32_t>(std::max<int64_t>(1, vs.last_q));
  p.top_k = static_cast<int32_t>(std::min(kCap, std::max<int64_t>(1, pattern.top_k)));
  return p;
}

size_t SparseIndexWorkspaceBytes(const SparseIndexArgs& args) {
  if (args.host_patterns == nullptr) return 0;
  return MakeLayout(args).total;
}

absl::Status BuildSparseIndex(const SparseIndexArgs& args, void* workspace, size_t workspace_bytes,
                              DeviceSparseIndex* index, void* stream_ptr) {
  if (args.head_dim != 64 && args.head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("BuildSparseIndex: head_dim ", args.head_dim, " (supported: 64, 128)"));
  }
  if (args.host_patterns == nullptr || args.patterns == nullptr ||
      static_cast<int64_t>(args.host_patterns->size()) != args.num_heads) {
    return absl::InvalidArgumentError("BuildSparseIndex: one pattern per head needed");
  }
  if (args.num_tokens <= 0 || args.num_tokens > (int64_t{1} << 30) || args.num_heads <= 0 ||
      args.num_kv_heads <= 0 || args.num_heads % args.num_kv_heads != 0 || args.num_heads > 65535 ||
      args.q_stride < args.num_heads * args.head_dim ||
      args.k_stride < args.num_kv_heads * args.head_dim || args.q_stride % 8 != 0 ||
      args.k_stride % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("BuildSparseIndex: bad shape tokens=", args.num_tokens,
                     " heads=", args.num_heads, " kv_heads=", args.num_kv_heads));
  }
  const Layout l = MakeLayout(args);
  if (l.block_sparse && l.blocks > kMaxBlockSparseBlocks) {
    return absl::InvalidArgumentError(
        absl::StrCat("BuildSparseIndex: block-sparse heads support up to ",
                     kMaxBlockSparseBlocks * kBlockSize, " tokens"));
  }
  if (workspace_bytes < l.total) {
    return absl::InvalidArgumentError(absl::StrCat(
        "BuildSparseIndex: workspace of ", workspace_bytes, " bytes, ", l.total, " needed"));
  }
  cudaStream_t stream = AsStream(stream_ptr);
  IndexOut out{At<int32_t>(workspace, l.range_count), At<int32_t>(workspace, l.range_start),
               At<int32_t>(workspace, l.column_count), At<int32_t>(workspace, l.column_index),
               l.max_columns};
  const int heads = static_cast<int>(l.heads), n = static_cast<int>(l.n);
  if (l.vertical_slash) {
    VerticalSlashScratch s{
        At<float2>(workspace, l.partial_stats), At<float2>(workspace, l.stats),
        At<float>(workspace, l.scores),         At<int32_t>(workspace, l.kept),
        At<uint2>(workspace, l.select_state),   At<uint32_t>(workspace, l.digit_histogram),
        At<uint32_t>(workspace, l.chunk_counts)};
    RETURN_IF_ERROR(args.head_dim == 64 ? LaunchVerticalSlash<64>(args, l, s, stream)
                                        : LaunchVerticalSlash<128>(args, l, s, stream));
  }
  const int64_t rows = l.heads * l.blocks;
  ConvertKernel<<<static_cast<unsigned>(CeilDiv(rows, kConvertWarps)), 32 * kConvertWarps, 0,
                  stream>>>(args.patterns, heads, n, At<int32_t>(workspace, l.kept), out);
  RETURN_IF_LAUNCH_FAILED("ConvertKernel");
  if (l.block_sparse) {
    float* pooled_q = At<float>(workspace, l.pooled_q);
    float* pooled_k = At<float>(workspace, l.pooled_k);
    PoolKernel<<<dim3(static_cast<unsigned>(l.blocks), static_cast<unsigned>(l.heads + l.kv_heads)),
                 static_cast<unsigned>(l.head_dim), 0, stream>>>(args, pooled_q, pooled_k);
    RETURN_IF_LAUNCH_FAILED("PoolKernel");
    int padded = 1;
    while (padded < l.blocks) padded <<= 1;
    const int shared = padded * 8 + static_cast<int>(l.blocks);
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(BlockSparseKernel,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(l.head_dim)));
    BlockSparseKernel<<<dim3(static_cast<unsigned>(l.blocks), static_cast<unsigned>(l.heads)), 128,
                        shared, stream>>>(args, pooled_q, pooled_k, scale, out);
    RETURN_IF_LAUNCH_FAILED("BlockSparseKernel");
  }
  index->num_heads = l.heads;
  index->num_tokens = l.n;
  index->num_query_blocks = l.blocks;
  index->max_columns = l.max_columns;
  index->range_count = out.range_count;
  index->range_start = out.range_start;
  index->column_count = out.column_count;
  index->column_index = out.column_index;
  index->pair_range_count = At<int32_t>(workspace, l.pair_range_count);
  index->pair_ranges = At<uint32_t>(workspace, l.pair_ranges);
  index->pair_column_count = At<int32_t>(workspace, l.pair_column_count);
  index->pair_columns = At<uint32_t>(workspace, l.pair_columns);
  index->pair_column_flags = At<uint8_t>(workspace, l.pair_column_flags);
  const int64_t pairs = l.heads * CeilDiv(l.blocks, 2);
  PairKernel<<<static_cast<unsigned>(CeilDiv(pairs, 128)), 128, 0, stream>>>(
      heads, static_cast<int>(l.blocks), *index);
  RETURN_IF_LAUNCH_FAILED("PairKernel");
  return absl::OkStatus();
}

absl::StatusOr<std::vector<SparseIndex>> CopyIndexToHost(const DeviceSparseIndex& index,
                                                         void* stream_ptr) {
  cudaStream_t stream = AsStream(stream_ptr);
  const int64_t heads = index.num_heads, blocks = index.num_query_blocks;
  const int64_t slots = index.RangeSlotsPerHead();
  std::vector<int32_t> range_count(heads * blocks), column_count(heads * blocks);
  std::vector<int32_t> range_start(heads * slots), column_index(heads * blocks * index.max_columns);
  auto copy = [&](std::vector<int32_t>& dst, const int32_t* src) -> absl::Status {
    if (dst.empty()) return absl::OkStatus();
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dst.data(), src, dst.size() * 4, cudaMemcpyDeviceToHost, stream));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(copy(range_count, index.range_count));
  RETURN_IF_ERROR(copy(column_count, index.column_count));
  RETURN_IF_ERROR(copy(range_start, index.range_start));
  RETURN_IF_ERROR(copy(column_index, index.column_index));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  std::vector<SparseIndex> out(heads);
  for (int64_t h = 0; h < heads; ++h) {
    SparseIndex& s = out[h];
    s.num_tokens = index.num_tokens;
    s.num_query_blocks = blocks;
    for (int64_t b = 0; b < blocks; ++b) {
      s.max_ranges = std::max<int64_t>(s.max_ranges, range_count[h * blocks + b]);
      s.max_columns = std::max<int64_t>(s.max_columns, column_count[h * blocks + b]);
    }
    s.range_count.assign(&range_count[h * blocks], &range_count[h * blocks] + blocks);
    s.column_count.assign(&column_count[h * blocks], &column_count[h * blocks] + blocks);
    s.range_start.assign(blocks * s.max_ranges, -1);
    s.column_index.assign(blocks * s.max_columns, -1);
    for (int64_t b = 0; b < blocks; ++b) {
      std::copy_n(&range_start[h * slots + b * (b + 1) / 2], s.range_count[b],
                  &s.range_start[b * s.max_ranges]);
      std::copy_n(&column_index[(h * blocks + b) * index.max_columns], s.column_count[b],
                  &s.column_index[b * s.max_columns]);
    }
  }
  return out;
}

}  // namespace cuda
}  // namespace sparseaccel
