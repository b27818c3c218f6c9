// Dense causal prefill attention, FlashAttention-2 style: a thread block takes 128 query rows
// of one head (4 warps on mma.sync, or 2 warpgroups on wgmma where the device has it) and
// streams the key tiles 0..(its last position) through FlashBlock (flash_tile.cuh); only tiles
// that cross the diagonal are masked.

#include <cmath>

#include "common/status_macros.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/flash_tile_sm90.cuh"

namespace sparseaccel {
namespace cuda {
namespace {

template <int kHeadDim, bool kWgmma>
using DenseBlock = AttentionBlock<kHeadDim, kWgmma>;

template <int kHeadDim, bool kWgmma>
__global__ void __launch_bounds__(DenseBlock<kHeadDim, kWgmma>::kThreads,
                                  DenseBlock<kHeadDim, kWgmma>::kMinBlocksPerSm)
    PrefillAttentionKernel(PrefillAttentionArgs args, float scale_log2) {
  const AttentionOperands x = args.operands;  // In registers, not the parameter space.
  using Block = DenseBlock<kHeadDim, kWgmma>;
  extern __shared__ __align__(128) unsigned char shared[];
  const int head = blockIdx.x;
  const int kv_head = head / (x.num_heads / x.num_kv_heads);
  // Heaviest query blocks (most keys) first.
  const int64_t q0 = (gridDim.y - 1 - blockIdx.y) * int64_t{Block::kQueryRows};
  const int64_t offset = args.n_kv - args.n;  // Position of query row 0.
  const int64_t last_pos = min(offset + q0 + Block::kQueryRows - 1, args.n_kv - 1);
  CausalTiles<Block> tiles{x.k + kv_head * kHeadDim, x.v + kv_head * kHeadDim, x.kv_stride,
                           args.n_kv, static_cast<int>(last_pos / Block::kTileKeys + 1)};
  Block::Run(tiles, shared, x.q + q0 * x.q_stride + head * kHeadDim, x.q_stride, args.n - q0,
             offset + q0, scale_log2, x.out + q0 * x.out_stride + head * kHeadDim, x.out_stride);
}

template <int kHeadDim, bool kWgmma>
absl::Status LaunchPrefill(const PrefillAttentionArgs& args, cudaStream_t stream) {
  using Block = DenseBlock<kHeadDim, kWgmma>;
  constexpr int kShared = Block::kSharedBytes;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(PrefillAttentionKernel<kHeadDim, kWgmma>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, kShared));
  const dim3 grid(static_cast<unsigned>(args.operands.num_heads),
                  static_cast<unsigned>(CeilDiv(args.n, Block::kQueryRows)));
  const float scale_log2 = static_cast<float>(M_LOG2E / std::sqrt(double{kHeadDim}));
  PrefillAttentionKernel<kHeadDim, kWgmma>
      <<<grid, Block::kThreads, kShared, stream>>>(args, scale_log2);
  return LaunchStatus("PrefillAttentionKernel");
}

}  // namespace

absl::Status PrefillAttention(const PrefillAttentionArgs& args, void* stream) {
  const AttentionOperands& x = args.operands;
  RETURN_IF_ERROR(CheckAttentionOperands(x, "PrefillAttention"));
  if (args.n < 0 || args.n_kv < args.n ||
      CeilDiv(args.n, AttentionBlock<128, false>::kQueryRows) > 65535 ||
      args.n_kv > (int64_t{1} << 31)) {
    return absl::InvalidArgumentError(
        absl::StrCat("PrefillAttention: bad shape n=", args.n, " n_kv=", args.n_kv));
  }
  ASSIGN_OR_RETURN(const bool wgmma, UseWgmma(x.inner_loop));
  if (args.n == 0) return absl::OkStatus();
  const cudaStream_t s = AsStream(stream);
  if (x.head_dim == 64) {
    return wgmma ? LaunchPrefill<64, true>(args, s) : LaunchPrefill<64, false>(args, s);
  }
  return wgmma ? LaunchPrefill<128, true>(args, s) : LaunchPrefill<128, false>(args, s);
}

}  // namespace cuda
}  // namespace sparseaccel
