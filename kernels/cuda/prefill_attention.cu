// Dense causal prefill attention, FlashAttention-2 style: a block of 4 warps takes 128 query
// rows of one head (32 per warp), streams the key tiles 0..(its last position) through shared
// memory with a 3-stage cp.async pipeline (one barrier per tile), and runs
// FlashWarpState::AttendTile on each; only tiles that cross the diagonal are masked.

#include <cmath>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/flash_tile.cuh"

namespace sparseaccel {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMTiles = 2;  // 32 query rows per warp.
constexpr int kWarpRows = 16 * kMTiles;
constexpr int kQueryRows = kWarpRows * kWarps;  // Queries per block.

// Keys per tile: 32 at head_dim 128 keeps the accumulators within the register file.
template <int kHeadDim>
constexpr int kTileKeys = kHeadDim == 128 ? 32 : 64;

constexpr int kStages = 3;  // K/V tiles in flight: one being read, two loading.

template <int kHeadDim>
constexpr int PrefillSharedBytes() {
  // Q tile + kStages x (K tile, V tile).
  return (kQueryRows + kStages * 2 * kTileKeys<kHeadDim>)*kHeadDim * 2;
}

template <int kHeadDim>
__global__ void __launch_bounds__(kWarps * 32)
    PrefillAttentionKernel(PrefillAttentionArgs args, float scale_log2) {
  constexpr int kKeys = kTileKeys<kHeadDim>;
  extern __shared__ __align__(128) unsigned char shared[];
  __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(shared);
  __nv_bfloat16* kv_tiles = q_tile + kQueryRows * kHeadDim;  // [stage][K, V][keys][dim]
  const int head = blockIdx.x;
  const int kv_head = head / (args.num_heads / args.num_kv_heads);
  // Heaviest query blocks (most keys) first.
  const int64_t q_block = gridDim.y - 1 - blockIdx.y;
  const int64_t q0 = q_block * kQueryRows;
  const int64_t offset = args.n_kv - args.n;  // Position of query row 0.
  const int64_t last_pos = min(offset + q0 + kQueryRows - 1, args.n_kv - 1);
  const int num_tiles = static_cast<int>(last_pos / kKeys + 1);
  const int64_t first_pos = offset + q0;

  const uint16_t* k_src = args.k + kv_head * kHeadDim;
  const uint16_t* v_src = args.v + kv_head * kHeadDim;
  auto load_kv = [&](int tile, int stage) {
    const int64_t key0 = int64_t{tile} * kKeys;
    __nv_bfloat16* k_dst = kv_tiles + stage * 2 * kKeys * kHeadDim;
    LoadTile<kHeadDim, kKeys, kWarps * 32>(k_dst, k_src + key0 * args.kv_stride, args.kv_stride,
                                           args.n_kv - key0);
    LoadTile<kHeadDim, kKeys, kWarps * 32>(k_dst + kKeys * kHeadDim, v_src + key0 * args.kv_stride,
                                           args.kv_stride, args.n_kv - key0);
  };
  LoadTile<kHeadDim, kQueryRows, kWarps * 32>(q_tile, args.q + q0 * args.q_stride + head * kHeadDim,
                                              args.q_stride, args.n - q0);
  // One cp.async group per key tile (the first also holds Q), kStages - 1 tiles ahead.
#pragma unroll
  for (int tile = 0; tile < kStages - 1; ++tile) {
    if (tile < num_tiles) load_kv(tile, tile);
    CpAsyncCommit();
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t warp_pos0 = first_pos + warp * kWarpRows;
  FlashWarpState<kHeadDim, kMTiles, kKeys> state;
  state.Init(q_tile, warp * kWarpRows);
  for (int tile = 0; tile < num_tiles; ++tile) {
    CpAsyncWait<kStages - 2>();  // This tile's group has landed (for this thread)...
    __syncthreads();             // ...for every thread; and all are done with the tile before it.
    // So the stage of tile - 1 can take tile + kStages - 1.
    const int next = tile + kStages - 1;
    if (next < num_tiles) load_kv(next, next % kStages);
    CpAsyncCommit();
    const int64_t key0 = int64_t{tile} * kKeys;
    // Tiles entirely after this warp's last row contribute nothing.
    if (key0 <= warp_pos0 + kWarpRows - 1) {
      const __nv_bfloat16* k_tile = kv_tiles + (tile % kStages) * 2 * kKeys * kHeadDim;
      state.AttendTile(k_tile, k_tile + kKeys * kHeadDim, scale_log2, key0 + kKeys - 1 > warp_pos0,
                       key0, warp_pos0);
    }
  }
  state.FinishRowSums();

  // Normalise and store: lane owns rows 16m + lane/4 (+8), columns 8j + 2(lane%4) + {0,1}.
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = q0 + warp * kWarpRows + m * 16 + lane / 4 + r * 8;
      if (row >= args.n) continue;
      const float inv_sum = 1.f / state.row_sum[m][r];
      uint16_t* dst = args.out + row * args.out_stride + head * kHeadDim + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) {
        *reinterpret_cast<uint32_t*>(dst + j * 8) =
            PackBf16(state.o[m][j][2 * r] * inv_sum, state.o[m][j][2 * r + 1] * inv_sum);
      }
    }
  }
}

template <int kHeadDim>
absl::Status LaunchPrefill(const PrefillAttentionArgs& args, cudaStream_t stream) {
  constexpr int kShared = PrefillSharedBytes<kHeadDim>();
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(PrefillAttentionKernel<kHeadDim>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, kShared));
  const dim3 grid(static_cast<unsigned>(args.num_heads),
                  static_cast<unsigned>(CeilDiv(args.n, kQueryRows)));
  const float scale_log2 = static_cast<float>(M_LOG2E / std::sqrt(double{kHeadDim}));
  PrefillAttentionKernel<kHeadDim><<<grid, kWarps * 32, kShared, stream>>>(args, scale_log2);
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
      CeilDiv(args.n, kQueryRows) > 65535 || args.n_kv > (int64_t{1} << 31)) {
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
