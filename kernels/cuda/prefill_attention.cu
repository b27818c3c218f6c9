// Dense causal prefill attention, FlashAttention-2 style: a block of 4 warps takes 128 query
// rows of one head (32 per warp) and streams the key tiles 0..(its last position) through
// FlashBlock (flash_tile.cuh); only tiles that cross the diagonal are masked.

#include <cmath>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/flash_tile.cuh"

namespace sparseaccel {
namespace cuda {
namespace {

// Keys per tile: 32 at head_dim 128 keeps the accumulators within the register file.
template <int kHeadDim>
using DenseBlock = FlashBlock<kHeadDim, /*kWarps=*/4, /*kMTiles=*/2,
                              /*kKeys=*/kHeadDim == 128 ? 32 : 64, /*kStages=*/3>;

// Key tiles 0 .. count - 1 of one KV head, contiguous.
template <int kHeadDim>
struct DenseTiles {
  static constexpr int kKeys = DenseBlock<kHeadDim>::kTileKeys;
  static constexpr int kWarpRows = DenseBlock<kHeadDim>::kWarpRows;
  const uint16_t* k;  // KV head's column, row 0.
  const uint16_t* v;
  int64_t stride;
  int64_t n_kv;
  int num_tiles;

  __device__ __forceinline__ int count() const { return num_tiles; }
  __device__ __forceinline__ void Load(int tile, __nv_bfloat16* k_dst,
                                       __nv_bfloat16* v_dst) const {
    constexpr int kThreads = DenseBlock<kHeadDim>::kThreads;
    const int64_t key0 = int64_t{tile} * kKeys;
    LoadTile<kHeadDim, kKeys, kThreads>(k_dst, k + key0 * stride, stride, n_kv - key0);
    LoadTile<kHeadDim, kKeys, kThreads>(v_dst, v + key0 * stride, stride, n_kv - key0);
  }
  __device__ __forceinline__ void Attend(typename DenseBlock<kHeadDim>::WarpState& state, int tile,
                                         const __nv_bfloat16* k_tile,
                                         const __nv_bfloat16* v_tile, float scale_log2,
                                         int64_t warp_pos0) const {
    const int64_t key0 = int64_t{tile} * kKeys;
    // Tiles entirely after this warp's last row contribute nothing.
    if (key0 > warp_pos0 + kWarpRows - 1) return;
    if (key0 + kKeys - 1 <= warp_pos0) {
      state.AttendTile(k_tile, v_tile, scale_log2);
    } else {
      // The tile straddles the diagonal: key and row compare as int32 offsets from key0.
      const int diagonal = static_cast<int>(warp_pos0 - key0);
      state.AttendTileMasked(k_tile, v_tile, scale_log2,
                             [diagonal](int row, int key) { return key > diagonal + row; });
    }
  }
};

template <int kHeadDim>
__global__ void __launch_bounds__(DenseBlock<kHeadDim>::kThreads)
    PrefillAttentionKernel(PrefillAttentionArgs args, float scale_log2) {
  using Block = DenseBlock<kHeadDim>;
  extern __shared__ __align__(128) unsigned char shared[];
  const int head = blockIdx.x;
  const int kv_head = head / (args.num_heads / args.num_kv_heads);
  // Heaviest query blocks (most keys) first.
  const int64_t q0 = (gridDim.y - 1 - blockIdx.y) * int64_t{Block::kQueryRows};
  const int64_t offset = args.n_kv - args.n;  // Position of query row 0.
  const int64_t last_pos = min(offset + q0 + Block::kQueryRows - 1, args.n_kv - 1);
  DenseTiles<kHeadDim> tiles{args.k + kv_head * kHeadDim, args.v + kv_head * kHeadDim,
                             args.kv_stride, args.n_kv,
                             static_cast<int>(last_pos / Block::kTileKeys + 1)};
  Block::Run(tiles, shared, args.q + q0 * args.q_stride + head * kHeadDim, args.q_stride,
             args.n - q0, offset + q0, scale_log2, args.out + q0 * args.out_stride + head * kHeadDim,
             args.out_stride);
}

template <int kHeadDim>
absl::Status LaunchPrefill(const PrefillAttentionArgs& args, cudaStream_t stream) {
  constexpr int kShared = DenseBlock<kHeadDim>::kSharedBytes;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(PrefillAttentionKernel<kHeadDim>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, kShared));
  const dim3 grid(static_cast<unsigned>(args.num_heads),
                  static_cast<unsigned>(CeilDiv(args.n, DenseBlock<kHeadDim>::kQueryRows)));
  const float scale_log2 = static_cast<float>(M_LOG2E / std::sqrt(double{kHeadDim}));
  PrefillAttentionKernel<kHeadDim>
      <<<grid, DenseBlock<kHeadDim>::kThreads, kShared, stream>>>(args, scale_log2);
  return LaunchStatus("PrefillAttentionKernel");
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

absl::Status PrefillAttention(const PrefillAttentionArgs& args, void* stream) {
  if (args.head_dim != 64 && args.head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("PrefillAttention: head_dim ", args.head_dim, " (supported: 64, 128)"));
  }
  if (args.n < 0 || args.n_kv < args.n || args.num_heads <= 0 || args.num_kv_heads <= 0 ||
      args.num_heads % args.num_kv_heads != 0 || args.num_heads > 65535 ||
      CeilDiv(args.n, DenseBlock<128>::kQueryRows) > 65535 || args.n_kv > (int64_t{1} << 31)) {
    return absl::InvalidArgumentError(absl::StrCat("PrefillAttention: bad shape n=", args.n,
                                                   " n_kv=", args.n_kv, " heads=", args.num_heads,
                                                   " kv_heads=", args.num_kv_heads));
  }
  if (args.q_stride < args.num_heads * args.head_dim ||
      args.kv_stride < args.num_kv_heads * args.head_dim ||
      args.out_stride < args.num_heads * args.head_dim || args.q_stride % 8 != 0 ||
      args.kv_stride % 8 != 0 || args.out_stride % 8 != 0 || !Aligned16(args.q) ||
      !Aligned16(args.k) || !Aligned16(args.v) || !Aligned16(args.out)) {
    return absl::InvalidArgumentError(
        "PrefillAttention: strides must cover a row and be multiples of 8 elements, pointers "
        "16-byte aligned");
  }
  if (args.n == 0) return absl::OkStatus();
  if (args.head_dim == 64) return LaunchPrefill<64>(args, AsStream(stream));
  return LaunchPrefill<128>(args, AsStream(stream));
}

}  // namespace cuda
}  // namespace sparseaccel
