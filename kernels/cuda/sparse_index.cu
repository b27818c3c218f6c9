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
//   6. SlashRunsKernel: per head, where the kept offsets (ascending) break into runs: an offset
//      more than 64 above the one before it starts a run. Every full query block's merged
//      slash intervals are these runs (those of its visible offsets).
//   7. ConvertKernel: one warp per (head, query block) runs Algorithm 2, as ConvertVerticalSlash
//      does: a full block covers its visible runs (far first), the last partial block walks
//      its offsets; then the columns outside the ranges.
// block-sparse heads: PoolKernel (block means of Q and K), then BlockSparseKernel: one thread
//   block per (head, 4 query blocks) scores the causal key blocks (the diagonal forced to
//   +inf) and keeps each query block's top k by radix select in shared memory (ties to the
//   smaller block), in ascending order.
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
// Block-sparse: query blocks per thread block (each pooled K row read serves all of them), and
// the most blocks: their scores live in shared memory (4 x 8192 x 4 bytes, 512K tokens).
constexpr int kBlockSparseRows = 4;
constexpr int kBlockSparseWarps = 8;
constexpr int kBlockSparseThreads = 32 * kBlockSparseWarps;
constexpr int kMaxBlockSparseBlocks = 8192;
constexpr int kConvertWarps = 4;    // Warps per thread block of ConvertKernel...
constexpr int kConvertBatches = 4;  // ...and batches of 32 entries each warp reads at once.
constexpr int kPairWarps = 4;       // Warps per thread block of PairKernel.
constexpr int kRunThreads = 256, kRunItems = 8;  // SlashRunsKernel: offsets per thread, per pass.
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
         chunk_counts = 0, run_starts = 0, run_count = 0;
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
    l.run_starts = Take(&at, static_cast<size_t>(l.heads * l.n) * 4);
    l.run_count = Take(&at, static_cast<size_t>(l.heads) * 4);
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

// Sums 2 kHalf values over lane pairs that differ in lane bit `bit`, halving what each keeps:
// the lower lane keeps the sums of values[0, kHalf), the upper those of values[kHalf, 2 kHalf),
// both into values[0, kHalf). Each fold halves the values a lane holds while it halves the
// lanes still to add: a warp's transposed reduction in fewer shuffles than reducing each.
template <int kHalf>
__device__ __forceinline__ void FoldAcrossLanes(float* values, int bit, int lane) {
  const bool upper = (lane >> bit) & 1;
#pragma unroll
  for (int j = 0; j < kHalf; ++j) {
    const float other = __shfl_xor_sync(~0u, upper ? values[j] : values[j + kHalf], 1 << bit);
    values[j] = (upper ? values[j + kHalf] : values[j]) + other;
  }
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
  int32_t* run_starts;        // [heads][n]: SlashRunsKernel's run starts (indices into the kept
  int32_t* run_count;         // offsets, ascending), and [heads] how many.
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

// Pass 0: per chunk of keys and estimating query, (max, exp-sum) of the scaled scores, in
// base 2 (scale_log2 = log2(e) / sqrt(head_dim): exp2 of these is the softmax's exp).
// Pass 1: probabilities exp2(score - max) / sum, summed into columns and diagonals.
template <int kHeadDim, int kPass>
__global__ void __launch_bounds__(kEstimateThreads)
    LastQueryKernel(SparseIndexArgs args, VerticalSlashScratch s, float scale_log2) {
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
  constexpr int kWarps = kEstimateThreads / 32;
  float* probs = reinterpret_cast<float*>(k_tile + kEstimateKeys * kHeadDim);
  float* diagonal_sums = probs + kMaxLastQ * kProbStride;
  float2* column_parts = reinterpret_cast<float2*>(diagonal_sums + kChunkKeys + kMaxLastQ);
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
  float row_max[2], row_sum[2];  // Pass 1: the row's max and 1 / sum.
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + lane / 4 + 8 * i;
    if (kPass == 0 || r >= last_q) {
      row_max[i] = -INFINITY;
      row_sum[i] = 0;
    } else {
      const float2 st = s.stats[head * kMaxLastQ + r];
      row_max[i] = st.x;
      row_sum[i] = 1.f / st.y;
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
#pragma unroll
    for (int t = 0; t < kEstimateKeys / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[0][t][e] *= scale_log2;
    }
    // Only tiles with keys past the first estimating query or past n, or unused rows, mask.
    if (last_q < kMaxLastQ || j0 + kEstimateKeys - 1 > q_pos0 || j0 + kEstimateKeys > n) {
#pragma unroll
      for (int t = 0; t < kEstimateKeys / 8; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp * 16 + lane / 4 + 8 * (e / 2);
          const int key = j0 + t * 8 + 2 * (lane % 4) + e % 2;
          if (r >= last_q || key >= n || key > q_pos0 + r) sc[0][t][e] = -INFINITY;
        }
      }
    }
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int t = 0; t < kEstimateKeys / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) tile_max[e / 2] = fmaxf(tile_max[e / 2], sc[0][t][e]);
    }
    if (kPass == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float new_max = fmaxf(row_max[i], tile_max[i]);
        if (new_max == -INFINITY) continue;
        float sum = row_sum[i] * exp2f(row_max[i] - new_max);
#pragma unroll
        for (int t = 0; t < kEstimateKeys / 8; ++t) {
          sum += exp2f(sc[0][t][2 * i] - new_max) + exp2f(sc[0][t][2 * i + 1] - new_max);
        }
        row_max[i] = new_max;
        row_sum[i] = sum;
      }
    } else {
      // Column c = 8 t + 2 (lane % 4) + e % 2 of the tile: this lane's two rows' sum, q = 2 t +
      // e % 2 of its 16.
      float column[16];
#pragma unroll
      for (int t = 0; t < kEstimateKeys / 8; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp * 16 + lane / 4 + 8 * (e / 2);
          const float x = sc[0][t][e];
          sc[0][t][e] = x == -INFINITY ? 0.f : exp2f(x - row_max[e / 2]) * row_sum[e / 2];
          probs[r * kProbStride + t * 8 + 2 * (lane % 4) + e % 2] = sc[0][t][e];
        }
        column[2 * t] = sc[0][t][0] + sc[0][t][2];
        column[2 * t + 1] = sc[0][t][1] + sc[0][t][3];
      }
      // The 8 lanes of equal lane % 4 hold the same columns: folds over lane bits 4, 3, 2
      // leave this lane the warp's sums of columns 2 lane and 2 lane + 1 (q = 2 (lane / 4) +
      // {0, 1}), in a fixed order.
      FoldAcrossLanes<8>(column, 4, lane);
      FoldAcrossLanes<4>(column, 3, lane);
      FoldAcrossLanes<2>(column, 2, lane);
      column_parts[warp * 32 + lane] = make_float2(column[0], column[1]);
      __syncthreads();
      const int t = threadIdx.x;
      if (t < kEstimateKeys && j0 + t < n) {
        const float* parts = reinterpret_cast<const float*>(column_parts);
        float sum = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += parts[w * kEstimateKeys + t];
        s.scores[int64_t{head} * n + j0 + t] = sum;
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
              row_sum[i] * exp2f(row_max[i] - new_max) + other_sum * exp2f(other_max - new_max);
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
    if (st.x != -INFINITY) sum += st.y * exp2f(st.x - row_max);
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

// One warp, one top-k select: from the 256-bin `histogram` of this pass (global or shared
// memory) and `state` (the digits of T found so far, how many scores equal to them remain to
// be kept; y > 0), the next state, in every lane: T's digit at this pass (the largest digit d
// with at least y scores at or above it) appended, and y less the scores above that digit.
__device__ uint2 SelectDigit(const uint32_t* histogram, uint2 state, int lane) {
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
  const bool holds = above < state.y && state.y <= at_or_above;  // Exactly one lane does.
  uint32_t digit = 0;
  if (holds) {
    int e = kPerLane - 1;
    for (; e > 0 && above + bins[e] < state.y; --e) above += bins[e];
    digit = static_cast<uint32_t>(lane * kPerLane + e);
  }
  const int holder = __ffs(__ballot_sync(~0u, holds)) - 1;
  digit = __shfl_sync(~0u, digit, holder);
  above = __shfl_sync(~0u, above, holder);
  return make_uint2(state.x << kDigitBits | digit, state.y - above);
}

// One warp per segment: SelectDigit on the segment's histogram of this pass.
__global__ void SelectDigitKernel(int pass, VerticalSlashScratch s) {
  const int segment = blockIdx.x, segments = gridDim.x;
  const uint2 state = s.select_state[segment];
  if (state.y == 0) return;
  const uint2 next = SelectDigit(s.digit_histogram + (int64_t{pass} * segments + segment) * kDigits,
                                 state, threadIdx.x);
  if (threadIdx.x == 0) s.select_state[segment] = next;
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

// ---- Runs of kept offsets: one thread block per head ----

// An offset more than kBlockSize above the previous kept one starts a run. For a full query
// block, offsets within kBlockSize of each other give overlapping or touching key intervals,
// so its merged intervals are exactly the runs of the offsets it sees.
__global__ void __launch_bounds__(kRunThreads)
    SlashRunsKernel(const DeviceHeadPattern* patterns, int heads, int n, VerticalSlashScratch s) {
  const int head = blockIdx.x;
  const DeviceHeadPattern p = patterns[head];
  if (p.kind != kVerticalSlash) return;
  const int32_t* slashes = s.kept + (int64_t{heads} + head) * n;
  int32_t* starts = s.run_starts + int64_t{head} * n;
  const int count = min(p.slash, n);
  using RunScan = cub::BlockScan<int, kRunThreads>;
  __shared__ typename RunScan::TempStorage scan;
  int runs = 0;
  for (int i0 = 0; i0 < count; i0 += kRunThreads * kRunItems) {
    const int first = i0 + threadIdx.x * kRunItems;
    int starts_here[kRunItems], rank[kRunItems];
#pragma unroll
    for (int j = 0; j < kRunItems; ++j) {
      const int i = first + j;
      starts_here[j] =
          i < count && (i == 0 || slashes[i] - slashes[i - 1] > static_cast<int>(kBlockSize));
    }
    int total;
    RunScan(scan).ExclusiveSum(starts_here, rank, total);
#pragma unroll
    for (int j = 0; j < kRunItems; ++j) {
      if (starts_here[j]) starts[runs + rank[j]] = first + j;
    }
    runs += total;
    __syncthreads();  // The scan's storage is reused.
  }
  if (threadIdx.x == 0) s.run_count[head] = runs;
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

// Offsets far to near give a query block [q0, q1) the key intervals [q0 - o, q1 - 1 - o]
// (clipped at 0), with ascending starts and ends; offsets above q1 - 1 see no key. An offset
// opens a new merged interval when it is more than q1 - q0 below the one before it (with the
// clip at 0 that never happens: both then see key 0). These cover the merged intervals of the
// `visible` first kept offsets (ascending), far first, each with RangeWriter::Cover.

// A full block's merged intervals are the runs (SlashRunsKernel) that start among the visible
// offsets, the farthest of them ending at the last visible offset. 32 runs read at once.
__device__ void CoverSlashRuns(const int32_t* slashes, int visible, const int32_t* run_starts,
                               int run_count, int q0, int q1, RangeWriter* writer, int lane) {
  const int runs = UpperBound(run_starts, run_count, visible - 1);
  for (int k0 = runs - 1; k0 >= 0; k0 -= 32) {
    const int k = k0 - lane;
    int lo = 0, hi = 0;
    if (k >= 0) {
      lo = max(0, q0 - slashes[k == runs - 1 ? visible - 1 : run_starts[k + 1] - 1]);
      hi = q1 - 1 - slashes[run_starts[k]];
    }
    for (int j = 0; j < min(32, k0 + 1); ++j) {
      writer->Cover(__shfl_sync(~0u, lo, j), __shfl_sync(~0u, hi, j), lane);
    }
  }
}

// Any block (the last may be partial): walks the offsets, kConvertBatches batches of 32 read
// at once so that their loads overlap.
__device__ void CoverSlashOffsets(const int32_t* slashes, int visible, int q0, int q1,
                                  RangeWriter* writer, int lane) {
  int walked = visible;
  int lo = 0, last = 0;  // The open interval's start; the previous offset walked.
  bool open = false;
  while (walked > 0) {
    int offsets[kConvertBatches];
#pragma unroll
    for (int j = 0; j < kConvertBatches; ++j) {
      const int i = walked - 1 - lane - 32 * j;
      offsets[j] = i >= 0 ? slashes[i] : 0;
    }
#pragma unroll
    for (int j = 0; j < kConvertBatches; ++j) {
      if (walked <= 0) break;
      const int i = walked - 1 - lane;
      const int o = offsets[j];
      int before = __shfl_up_sync(~0u, o, 1);
      if (lane == 0) before = last;
      uint32_t starts =
          __ballot_sync(~0u, i >= 0 && ((!open && lane == 0) || before - o > q1 - q0));
      while (starts != 0) {
        const int at = __ffs(starts) - 1;
        starts &= starts - 1;
        const int end_offset = at == 0 ? last : __shfl_sync(~0u, o, at - 1);
        if (open) writer->Cover(lo, q1 - 1 - end_offset, lane);
        lo = max(0, q0 - __shfl_sync(~0u, o, at));
        open = true;
      }
      last = __shfl_sync(~0u, o, min(31, walked - 1));
      walked -= 32;
    }
  }
  if (open) writer->Cover(lo, q1 - 1 - last, lane);
}

__global__ void __launch_bounds__(32 * kConvertWarps)
    ConvertKernel(const DeviceHeadPattern* patterns, int heads, int n, const int32_t* kept,
                  const int32_t* run_starts, const int32_t* run_count, IndexOut out) {
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
    const int visible = UpperBound(slashes, min(p.slash, n), q1 - 1);  // Offsets <= q1 - 1.
    if (q1 - q0 == kBlock) {
      CoverSlashRuns(slashes, visible, run_starts + int64_t{head} * n, run_count[head], q0, q1,
                     &writer, lane);
    } else {
      CoverSlashOffsets(slashes, visible, q0, q1, &writer, lane);
    }
    __syncwarp();  // The ranges, read back below.
    // Columns inside a range are dropped (the range computes them). A block whose ranges alone
    // keep nearly every tile takes all of them (NearlyEveryTileKernel) whatever its columns.
    int32_t* column_out = out.column_index + row * out.max_columns;
    const int num_verticals = KeepsNearlyEveryTile(writer.count, b + 1) ? 0 : min(p.vertical, n);
    // Binary lifting over the ranges, kConvertBatches batches of columns interleaved so that
    // their loads overlap (one search per lane and batch: the number of starts <= the column).
    const int top_step = writer.count > 0 ? 1 << (31 - __clz(writer.count)) : 0;
    for (int i0 = 0; i0 < num_verticals; i0 += 32 * kConvertBatches) {
      int cols[kConvertBatches], at_or_below[kConvertBatches];
#pragma unroll
      for (int j = 0; j < kConvertBatches; ++j) {
        const int i = i0 + 32 * j + lane;
        cols[j] = i < num_verticals ? verticals[i] : INT_MAX;
        at_or_below[j] = 0;
      }
      for (int step = top_step; step > 0; step >>= 1) {
#pragma unroll
        for (int j = 0; j < kConvertBatches; ++j) {
          const int probe = at_or_below[j] + step;
          if (probe <= writer.count && writer.ranges[probe - 1] <= cols[j]) at_or_below[j] = probe;
        }
      }
#pragma unroll
      for (int j = 0; j < kConvertBatches; ++j) {
        const int r = at_or_below[j] - 1;  // Last start <= the column.
        const bool take = cols[j] < q1 && (r < 0 || writer.ranges[r] + kBlock <= cols[j]);
        columns = WarpAppend(column_out, columns, take, cols[j], lane);
      }
      // Ascending: the rest lie past the block.
      if (__any_sync(~0u, cols[kConvertBatches - 1] >= q1)) break;
    }
  }
  if (lane == 0) {
    out.range_count[row] = writer.count;
    out.column_count[row] = columns;
  }
}

// ---- Blocks that keep nearly every tile take them all (KeepsNearlyEveryTile) ----

// One warp per (head, query block), after every pattern's conversion.
__global__ void __launch_bounds__(32 * kConvertWarps)
    NearlyEveryTileKernel(int heads, int blocks, IndexOut out) {
  const int64_t row = int64_t{blockIdx.x} * kConvertWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= int64_t{heads} * blocks) return;
  const int head = static_cast<int>(row / blocks), b = static_cast<int>(row % blocks);
  const int64_t tiles =
      out.range_count[row] + (out.column_count[row] + kBlockSize - 1) / kBlockSize;
  if (!KeepsNearlyEveryTile(tiles, b + 1)) return;
  int32_t* ranges = out.range_start + int64_t{head} * (int64_t{blocks} * (blocks + 1) / 2) +
                    int64_t{b} * (b + 1) / 2;
  for (int kb = lane; kb <= b; kb += 32) ranges[kb] = kb * static_cast<int>(kBlockSize);
  if (lane == 0) {
    out.range_count[row] = b + 1;
    out.column_count[row] = 0;
  }
}

// ---- Pairs of query blocks for the attention kernel: one warp per (head, pair) ----

// One warp: for each value of ascending `list` (no repeats), place(position, value, in_other)
// with `position` its place in the ascending union with `other` if taken from `list`: after
// list's smaller values and other's smaller values that list lacks (those it has are list's
// earlier values found in other). Returns how many values both lists have.
template <typename Place>
__device__ int PlaceInUnion(const int32_t* list, int count, const int32_t* other, int other_count,
                            int lane, const Place& place) {
  const uint32_t below_lane = (1u << lane) - 1;
  int common = 0;
  for (int i0 = 0; i0 < count; i0 += 32) {
    const int i = i0 + lane;
    const int32_t value = i < count ? list[i] : 0;
    const int rank = i < count ? UpperBound(other, other_count, value - 1) : 0;  // Those below.
    const bool in_other = i < count && rank < other_count && other[rank] == value;
    const uint32_t ballot = __ballot_sync(~0u, in_other);
    if (i < count) place(i + rank - common - __popc(ballot & below_lane), value, in_other);
    common += __popc(ballot);
  }
  return common;
}

// The union of two ascending lists without repeats, each value once at its place in the
// ascending union: emit(position, value, owners), owners bit 0 if `a` has it, bit 1 if `b`
// has it; returns the union's size. One warp: each value is placed by a binary search in the
// other list (a serial merge per pair, one thread each, left most of the GPU idle).
template <typename Emit>
__device__ int WarpMergeAscending(const int32_t* a, int a_count, const int32_t* b, int b_count,
                                  int lane, const Emit& emit) {
  const int common =
      PlaceInUnion(a, a_count, b, b_count, lane,
                   [&](int at, int32_t value, bool in_b) { emit(at, value, in_b ? 3u : 1u); });
  PlaceInUnion(b, b_count, a, a_count, lane, [&](int at, int32_t value, bool in_a) {
    if (!in_a) emit(at, value, 2u);
  });
  return a_count + b_count - common;
}

// Owner bits 0/1 as DeviceSparseIndex's entry bits.
__device__ uint32_t OwnerBits(uint32_t owners) {
  return (owners & 1 ? DeviceSparseIndex::kFirstBlockColumn : 0) |
         (owners & 2 ? DeviceSparseIndex::kSecondBlockColumn : 0);
}

// Per (head, pair c): the union of the two blocks' range starts and of their column lists,
// each entry with owner bits, and the columns' span flags (DeviceSparseIndex). The last pair
// of an odd count is block 2c alone.
__global__ void __launch_bounds__(32 * kPairWarps)
    PairKernel(int heads, int blocks, DeviceSparseIndex index) {
  using Index = DeviceSparseIndex;
  static_assert(Index::kColumnFlagSpan == 32, "a warp reads one span at a time");
  const int pairs = (blocks + 1) / 2;
  const int64_t id = int64_t{blockIdx.x} * kPairWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
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
  const int num_ranges = WarpMergeAscending(
      first, first_count, second, second_count, lane, [&](int at, int32_t start, uint32_t owners) {
        merged[at] = static_cast<uint32_t>(start) | OwnerBits(owners);
      });

  const int32_t* columns[2] = {index.column_index + row * index.max_columns,
                               index.column_index + (row + 1) * index.max_columns};
  const int counts[2] = {index.column_count[row], single ? 0 : index.column_count[row + 1]};
  uint32_t* out = index.pair_columns + id * index.PairColumnSlots();
  uint8_t* flags = index.pair_column_flags + id * index.PairColumnFlagSlots();
  const int num_columns = WarpMergeAscending(columns[0], counts[0], columns[1], counts[1], lane,
                                             [&](int at, int32_t key, uint32_t owners) {
                                               out[at] =
                                                   static_cast<uint32_t>(key) | OwnerBits(owners);
                                             });
  __syncwarp();  // The merged columns, read back for their spans' flags.
  for (int span0 = 0; span0 < num_columns; span0 += Index::kColumnFlagSpan) {
    const int at = span0 + lane;
    const uint32_t entry = at < num_columns ? out[at] : 0;
    const uint32_t present = __ballot_sync(~0u, at < num_columns);
    const uint32_t first_keeps = __ballot_sync(~0u, (entry & Index::kFirstBlockColumn) != 0);
    const uint32_t second_keeps = __ballot_sync(~0u, (entry & Index::kSecondBlockColumn) != 0);
    if (lane == 0) {
      const uint32_t all = (first_keeps == present ? 1u : 0u) | (second_keeps == present ? 2u : 0u);
      const uint32_t some = (first_keeps != 0 ? 1u : 0u) | (second_keeps != 0 ? 2u : 0u);
      flags[span0 / Index::kColumnFlagSpan] = static_cast<uint8_t>(all | some << 2);
    }
  }
  if (lane == 0) {
    index.pair_range_count[id] = num_ranges;
    index.pair_column_count[id] = num_columns;
  }
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

// One thread block per (head, kBlockSparseRows consecutive query blocks). Scores: one warp per
// candidate key block at a time reads its pooled K row once (coalesced) for all the thread
// block's query blocks (with one thread per candidate reading whole rows, the kernel took 59 ms
// at 128K). Then per query block the top k by radix select in shared memory, the rule of the
// vertical-slash select (every score above the k-th largest T, then the first ones equal to
// it: ties to the smaller block); the diagonal block scores +inf, so it is always kept.
template <int kHeadDim>
__global__ void __launch_bounds__(kBlockSparseThreads)
    BlockSparseKernel(SparseIndexArgs args, const float* pooled_q, const float* pooled_k,
                      float scale, IndexOut out) {
  static_assert(kBlockSparseRows == 4 && kBlockSparseWarps == 2 * kBlockSparseRows,
                "the reduction below hands one query block to each 8 lanes; two warps select "
                "for each query block");
  constexpr int kPerLane = kHeadDim / 32;
  const int head = blockIdx.y;
  const DeviceHeadPattern p = args.patterns[head];
  if (p.kind != kBlockSparse) return;
  const int blocks = static_cast<int>((args.num_tokens + kBlockSize - 1) / kBlockSize);
  const int first_block = (gridDim.x - 1 - blockIdx.x) * kBlockSparseRows;  // Long rows first.
  const int rows = min(kBlockSparseRows, blocks - first_block);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  extern __shared__ __align__(16) uint32_t keys[];  // [kBlockSparseRows][blocks]: OrderedBits.
  __shared__ uint32_t histogram[kBlockSparseRows][kDigits];
  __shared__ uint2 state[kBlockSparseRows];

  // Lane l holds dimensions l + 32 e of each query block's pooled Q.
  float q[kBlockSparseRows][kPerLane];
#pragma unroll
  for (int r = 0; r < kBlockSparseRows; ++r) {
    const float* row =
        pooled_q + (int64_t{head} * blocks + first_block + min(r, rows - 1)) * kHeadDim;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) q[r][e] = row[lane + 32 * e];
  }
  const int kv_head = head / static_cast<int>(args.num_heads / args.num_kv_heads);
  const float* k_rows = pooled_k + int64_t{kv_head} * blocks * kHeadDim;
  // After the reduction lane l holds query block l / 8's score.
  const int my_row = lane / 8, my_block = first_block + my_row;
  for (int kb = warp; kb < first_block + rows; kb += kBlockSparseWarps) {
    float dot[kBlockSparseRows] = {};
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const float k = k_rows[int64_t{kb} * kHeadDim + lane + 32 * e];
#pragma unroll
      for (int r = 0; r < kBlockSparseRows; ++r) dot[r] += q[r][e] * k;
    }
    // Sum the four partial dots over the warp with 7 shuffles instead of 20.
    FoldAcrossLanes<2>(dot, 4, lane);
    FoldAcrossLanes<1>(dot, 3, lane);
    float sum = dot[0] + __shfl_xor_sync(~0u, dot[0], 4);
    sum += __shfl_xor_sync(~0u, sum, 2);
    sum += __shfl_xor_sync(~0u, sum, 1);
    if (lane % 8 == 0 && my_row < rows && kb <= my_block) {
      keys[my_row * blocks + kb] = OrderedBits(kb == my_block ? INFINITY : sum * scale);
    }
  }

  // Warps 2r and 2r + 1 select for query block r (every warp runs every pass: the barriers).
  const int r = warp / 2, t = threadIdx.x % 64;
  const int b = first_block + r;
  const int candidates = r < rows ? b + 1 : 0;
  const uint32_t* row_keys = keys + r * blocks;
  if (t == 0) state[r] = make_uint2(0, min(p.top_k, candidates));
  for (int pass = 0; pass < kSelectPasses; ++pass) {
    for (int i = t; i < kDigits; i += 64) histogram[r][i] = 0;
    __syncthreads();  // The keys (pass 0), the zeroed bins and state.
    const uint2 found = state[r];
    const int shift = 32 - kDigitBits * (pass + 1);
    for (int j = t; j < candidates; j += 64) {
      const uint32_t key = row_keys[j];
      // pass 0 has no decided digits (and a shift by 32 would be undefined).
      if (pass == 0 || (key >> (shift + kDigitBits)) == found.x) {
        atomicAdd(&histogram[r][(key >> shift) & 0xff], 1u);
      }
    }
    __syncthreads();
    if (warp % 2 == 0 && found.y > 0) {
      const uint2 next = SelectDigit(histogram[r], found, lane);
      if (lane == 0) state[r] = next;
    }
    __syncthreads();  // state; and the bins are read before the next pass zeroes them.
  }
  if (warp % 2 != 0 || candidates == 0) return;
  // One warp writes the kept blocks ascending.
  const uint2 threshold = state[r];
  const int64_t row = int64_t{head} * blocks + b;
  int32_t* ranges = out.range_start + int64_t{head} * (int64_t{blocks} * (blocks + 1) / 2) +
                    int64_t{b} * (b + 1) / 2;
  int count = 0;
  uint32_t equal_before = 0;  // Scores equal to T in earlier chunks.
  for (int base = 0; base < candidates; base += 32) {
    const int kb = base + lane;
    const uint32_t key = kb < candidates ? row_keys[kb] : 0;
    const bool equal = kb < candidates && key == threshold.x;
    const uint32_t equal_ballot = __ballot_sync(~0u, equal);
    const uint32_t equal_rank = equal_before + __popc(equal_ballot & ((1u << lane) - 1));
    const bool take = kb < candidates && (key > threshold.x || (equal && equal_rank < threshold.y));
    count = WarpAppend(ranges, count, take, kb * static_cast<int>(kBlockSize), lane);
    equal_before += __popc(equal_ballot);
  }
  if (lane == 0) {
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
  const float scale_log2 = static_cast<float>(M_LOG2E / std::sqrt(static_cast<double>(kHeadDim)));
  const dim3 grid(static_cast<unsigned>(l.chunks), static_cast<unsigned>(heads));
  constexpr int kShared =
      (kMaxLastQ + kEstimateKeys) * kHeadDim * 2 +
      (kMaxLastQ * (kEstimateKeys + 1) + kChunkKeys + kMaxLastQ + kEstimateThreads / 32 * 64) * 4;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(LastQueryKernel<kHeadDim, 0>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, kShared));
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(LastQueryKernel<kHeadDim, 1>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, kShared));
  LastQueryKernel<kHeadDim, 0><<<grid, kEstimateThreads, kShared, stream>>>(args, s, scale_log2);
  RETURN_IF_LAUNCH_FAILED("LastQueryKernel<0>");
  CombineStatsKernel<<<heads, kMaxLastQ, 0, stream>>>(args.patterns, n, static_cast<int>(l.chunks),
                                                      s);
  RETURN_IF_LAUNCH_FAILED("CombineStatsKernel");
  LastQueryKernel<kHeadDim, 1><<<grid, kEstimateThreads, kShared, stream>>>(args, s, scale_log2);
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
  SlashRunsKernel<<<heads, kRunThreads, 0, stream>>>(args.patterns, heads, n, s);
  RETURN_IF_LAUNCH_FAILED("SlashRunsKernel");
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
        At<float2>(workspace, l.partial_stats),  At<float2>(workspace, l.stats),
        At<float>(workspace, l.scores),          At<int32_t>(workspace, l.kept),
        At<uint2>(workspace, l.select_state),    At<uint32_t>(workspace, l.digit_histogram),
        At<uint32_t>(workspace, l.chunk_counts), At<int32_t>(workspace, l.run_starts),
        At<int32_t>(workspace, l.run_count)};
    RETURN_IF_ERROR(args.head_dim == 64 ? LaunchVerticalSlash<64>(args, l, s, stream)
                                        : LaunchVerticalSlash<128>(args, l, s, stream));
  }
  const int64_t rows = l.heads * l.blocks;
  ConvertKernel<<<static_cast<unsigned>(CeilDiv(rows, kConvertWarps)), 32 * kConvertWarps, 0,
                  stream>>>(args.patterns, heads, n, At<int32_t>(workspace, l.kept),
                            At<int32_t>(workspace, l.run_starts),
                            At<int32_t>(workspace, l.run_count), out);
  RETURN_IF_LAUNCH_FAILED("ConvertKernel");
  if (l.block_sparse) {
    float* pooled_q = At<float>(workspace, l.pooled_q);
    float* pooled_k = At<float>(workspace, l.pooled_k);
    PoolKernel<<<dim3(static_cast<unsigned>(l.blocks), static_cast<unsigned>(l.heads + l.kv_heads)),
                 static_cast<unsigned>(l.head_dim), 0, stream>>>(args, pooled_q, pooled_k);
    RETURN_IF_LAUNCH_FAILED("PoolKernel");
    const int shared = static_cast<int>(kBlockSparseRows * l.blocks * 4);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(l.head_dim)));
    const dim3 grid(static_cast<unsigned>(CeilDiv(l.blocks, kBlockSparseRows)),
                    static_cast<unsigned>(l.heads));
    if (l.head_dim == 64) {
      CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
          BlockSparseKernel<64>, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
      BlockSparseKernel<64>
          <<<grid, kBlockSparseThreads, shared, stream>>>(args, pooled_q, pooled_k, scale, out);
    } else {
      CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
          BlockSparseKernel<128>, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
      BlockSparseKernel<128>
          <<<grid, kBlockSparseThreads, shared, stream>>>(args, pooled_q, pooled_k, scale, out);
    }
    RETURN_IF_LAUNCH_FAILED("BlockSparseKernel");
  }
  NearlyEveryTileKernel<<<static_cast<unsigned>(CeilDiv(rows, kConvertWarps)), 32 * kConvertWarps,
                          0, stream>>>(heads, static_cast<int>(l.blocks), out);
  RETURN_IF_LAUNCH_FAILED("NearlyEveryTileKernel");
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
  PairKernel<<<static_cast<unsigned>(CeilDiv(pairs, kPairWarps)), 32 * kPairWarps, 0, stream>>>(
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
