// Sparse prefill attention over a DeviceSparseIndex: one thread block of 4 warps per (head,
// query block of 64 rows), 16 rows per warp. Its key tiles are the block's ranges (64
// contiguous keys each, loaded like a dense tile) followed by its columns, gathered 64 at a
// time; both go through the dense kernel's FlashBlock pipeline and inner loop.

#include <climits>
#include <cmath>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/flash_tile.cuh"
#include "kernels/cuda/sparse_attention.h"

namespace sparseaccel {
namespace cuda {
namespace {

static_assert(kBlockSize == 64, "one key range is one 64-key tile");

template <int kHeadDim>
using SparseBlock = FlashBlock<kHeadDim, /*kWarps=*/4, /*kMTiles=*/1, /*kKeys=*/64, /*kStages=*/3>;

template <int kHeadDim>
struct SparseTiles {
  using Block = SparseBlock<kHeadDim>;
  static constexpr int kKeys = Block::kTileKeys;
  const uint16_t* k;  // KV head's column, row 0.
  const uint16_t* v;
  int64_t stride;
  int num_tokens;
  const int32_t* ranges;  // Ascending starts.
  int num_ranges;
  const int32_t* columns;  // Ascending keys.
  int num_columns;

  __device__ __forceinline__ int count() const {
    return num_ranges + (num_columns + kKeys - 1) / kKeys;
  }

  // The key in row `row` of tile `tile`, or -1 past the end of a range or the column list.
  __device__ __forceinline__ int Key(int tile, int row) const {
    if (tile < num_ranges) {
      const int key = ranges[tile] + row;
      return key < num_tokens ? key : -1;
    }
    const int i = (tile - num_ranges) * kKeys + row;
    return i < num_columns ? columns[i] : -1;
  }

  __device__ __forceinline__ void Load(int tile, __nv_bfloat16* k_dst,
                                       __nv_bfloat16* v_dst) const {
    auto source_row = [&](int row) -> int64_t { return Key(tile, row); };
    LoadTileRows<kHeadDim, kKeys, Block::kThreads>(k_dst, k, stride, source_row);
    LoadTileRows<kHeadDim, kKeys, Block::kThreads>(v_dst, v, stride, source_row);
  }

  __device__ __forceinline__ void Attend(typename Block::WarpState& state, int tile,
                                         const __nv_bfloat16* k_tile,
                                         const __nv_bfloat16* v_tile, float scale_log2,
                                         int64_t warp_pos0) const {
    const int first = static_cast<int>(warp_pos0);
    const int last = first + Block::kWarpRows - 1;
    if (tile < num_ranges) {
      const int key0 = ranges[tile];
      if (key0 > last) return;  // Every key after every row of the warp.
      if (key0 + kKeys - 1 <= first) {
        state.AttendTile(k_tile, v_tile, scale_log2);
      } else {
        const int diagonal = first - key0;
        state.AttendTileMasked(k_tile, v_tile, scale_log2,
                               [diagonal](int row, int key) { return key > diagonal + row; });
      }
      return;
    }
    const int* keys = columns + (tile - num_ranges) * kKeys;
    const int valid = min(kKeys, num_columns - (tile - num_ranges) * kKeys);
    if (keys[0] > last) return;  // Columns ascend: the first is the smallest.
    state.AttendTileMasked(k_tile, v_tile, scale_log2, [=](int row, int key) {
      return key >= valid || keys[key] > first + row;
    });
  }
};

template <int kHeadDim>
__global__ void __launch_bounds__(SparseBlock<kHeadDim>::kThreads)
    SparseAttentionKernel(SparseAttentionArgs args, float scale_log2) {
  extern __shared__ __align__(128) unsigned char shared[];
  const DeviceSparseIndex& index = args.index;
  const int head = blockIdx.x;
  const int kv_head = head / (args.num_heads / args.num_kv_heads);
  // Late query blocks (most keys) first.
  const int64_t local_block = gridDim.y - 1 - blockIdx.y;
  const int64_t block = args.first_query_block + local_block;
  const int64_t row = head * index.num_query_blocks + block;
  SparseTiles<kHeadDim> tiles{
      args.k + kv_head * kHeadDim,
      args.v + kv_head * kHeadDim,
      args.kv_stride,
      static_cast<int>(index.num_tokens),
      index.range_start + head * (index.num_query_blocks * (index.num_query_blocks + 1) / 2) +
          block * (block + 1) / 2,
      index.range_count[row],
      index.column_index + row * index.max_columns,
      index.column_count[row]};
  const int64_t q0 = block * kBlockSize;
  SparseBlock<kHeadDim>::Run(tiles, shared, args.q + q0 * args.q_stride + head * kHeadDim,
                             args.q_stride, index.num_tokens - q0, q0, scale_log2,
                             args.out + local_block * kBlockSize * args.out_stride +
                                 head * kHeadDim,
                             args.out_stride);
}

template <int kHeadDim>
absl::Status Launch(const SparseAttentionArgs& args, cudaStream_t stream) {
  constexpr int kShared = SparseBlock<kHeadDim>::kSharedBytes;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(SparseAttentionKernel<kHeadDim>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, kShared));
  const dim3 grid(static_cast<unsigned>(args.num_heads),
                  static_cast<unsigned>(args.num_query_blocks));
  const float scale_log2 = static_cast<float>(M_LOG2E / std::sqrt(double{kHeadDim}));
  SparseAttentionKernel<kHeadDim>
      <<<grid, SparseBlock<kHeadDim>::kThreads, kShared, stream>>>(args, scale_log2);
  return LaunchStatus("SparseAttentionKernel");
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

absl::Status SparseAttention(const SparseAttentionArgs& args, void* stream) {
  const DeviceSparseIndex& index = args.index;
  if (args.head_dim != 64 && args.head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("SparseAttention: head_dim ", args.head_dim, " (supported: 64, 128)"));
  }
  if (args.num_heads <= 0 || args.num_kv_heads <= 0 || args.num_heads % args.num_kv_heads != 0 ||
      args.num_heads != index.num_heads || args.num_heads > 65535 ||
      index.num_tokens > (int64_t{1} << 30) || args.first_query_block < 0 ||
      args.num_query_blocks < 0 || args.num_query_blocks > 65535 ||
      args.first_query_block + args.num_query_blocks > index.num_query_blocks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SparseAttention: bad shape: heads=", args.num_heads, " kv_heads=", args.num_kv_heads,
        " index heads=", index.num_heads, " query blocks [", args.first_query_block, ", ",
        args.first_query_block + args.num_query_blocks, ") of ", index.num_query_blocks));
  }
  if (args.q_stride < args.num_heads * args.head_dim ||
      args.kv_stride < args.num_kv_heads * args.head_dim ||
      args.out_stride < args.num_heads * args.head_dim || args.q_stride % 8 != 0 ||
      args.kv_stride % 8 != 0 || args.out_stride % 8 != 0 || !Aligned16(args.q) ||
      !Aligned16(args.k) || !Aligned16(args.v) || !Aligned16(args.out)) {
    return absl::InvalidArgumentError(
        "SparseAttention: strides must cover a row and be multiples of 8 elements, pointers "
        "16-byte aligned");
  }
  if (args.num_query_blocks == 0) return absl::OkStatus();
  if (args.head_dim == 64) return Launch<64>(args, AsStream(stream));
  return Launch<128>(args, AsStream(stream));
}

}  // namespace cuda
}  // namespace sparseaccel
