// Linear layers of decode steps (a few rows of x against a whole weight matrix): a pure stream
// over the weights, which are 95% of what a decode step reads. Each warp owns two weight rows
// (two output columns, or a gate row and its up row) and reads them once with 16-byte
// streaming loads, kUnroll of them per row in flight per lane before their first use; the rows
// of x come from L1/L2. Lane sums are reduced over the warp and lane 0 applies the epilogue.
// A lane sums the same k indices in the same order for every m, so results are
// batch-invariant. Tried on an H100 and slower for decode steps of 1-3 rows (bench/README.md):
// slicing k over more warps (3-10%), and launching it to overlap the kernel before it
// (programmatic dependent launch, the first weight loads issued before the wait: 1-5%).

#include <cstdint>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace sparseaccel {
namespace cuda {
namespace {

constexpr int kWarps = 4;   // Per block; each warp streams two weight rows.
constexpr int kUnroll = 4;  // 16-byte loads per lane and weight row in flight.

// Row pairs of a launch: one per output column pair, or per gate/up row pair for SwiGLU.
__host__ __device__ __forceinline__ int64_t PairsOf(const SmallBatchLinearArgs& a) {
  return a.epilogue == LinearEpilogue::kSwiGluBf16 ? a.n / 2 : (a.n + 1) / 2;
}

// The two weight rows of `pair`, and the output columns they give.
struct RowPair {
  int64_t first, second;  // second == -1: no second row (odd n).
};

template <LinearEpilogue kEpilogue>
__device__ __forceinline__ RowPair RowsOf(int64_t pair, int64_t n) {
  if constexpr (kEpilogue == LinearEpilogue::kSwiGluBf16) return {pair, pair + n / 2};
  return {2 * pair, 2 * pair + 1 < n ? 2 * pair + 1 : -1};
}

template <LinearEpilogue kEpilogue>
__device__ __forceinline__ void Finish(const SmallBatchLinearArgs& a, int64_t row, int64_t pair,
                                       RowPair rows, float first, float second) {
  if constexpr (kEpilogue == LinearEpilogue::kSwiGluBf16) {
    const float gate = Bf16BitsToFloat(FloatToBf16Bits(first));
    const float up = Bf16BitsToFloat(FloatToBf16Bits(second));
    static_cast<uint16_t*>(a.out)[row * (a.n / 2) + pair] =
        FloatToBf16Bits(gate / (1.0f + expf(-gate)) * up);
  } else {
    const float sums[2] = {first, second};
    const int64_t cols[2] = {rows.first, rows.second};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (cols[i] < 0) break;
      const int64_t at = row * a.n + cols[i];
      if constexpr (kEpilogue == LinearEpilogue::kStoreF32) {
        static_cast<float*>(a.out)[at] = sums[i];
      } else {
        uint16_t* out = static_cast<uint16_t*>(a.out);
        const float base =
            kEpilogue == LinearEpilogue::kAccumulateBf16 ? Bf16BitsToFloat(out[at]) : 0.f;
        out[at] = FloatToBf16Bits(base + sums[i]);
      }
    }
  }
}

template <int kRows, LinearEpilogue kEpilogue>
__global__ void __launch_bounds__(kWarps * 32) SmallBatchLinearKernel(SmallBatchLinearArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t pair = blockIdx.x * int64_t{kWarps} + threadIdx.x / 32;
  if (pair >= PairsOf(a)) return;
  const RowPair rows = RowsOf<kEpilogue>(pair, a.n);
  const int64_t chunks = a.k / 8;  // 16-byte chunks per row.
  const uint4* w[2] = {
      reinterpret_cast<const uint4*>(a.w + rows.first * a.k),
      reinterpret_cast<const uint4*>(a.w + (rows.second < 0 ? rows.first : rows.second) * a.k)};
  const uint4* x = reinterpret_cast<const uint4*>(a.x);
  float sum[kRows][2] = {};
  for (int64_t c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
    uint4 loaded[2][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + 32 * u;
#pragma unroll
      for (int i = 0; i < 2; ++i) loaded[i][u] = c < chunks ? __ldcs(w[i] + c) : uint4{};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c >= chunks) break;
      float wf[2][8];
      Unpack8(loaded[0][u], wf[0]);
      Unpack8(loaded[1][u], wf[1]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float xf[8];
        Unpack8(__ldg(x + r * chunks + c), xf);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          sum[r][0] = fmaf(xf[e], wf[0][e], sum[r][0]);
          sum[r][1] = fmaf(xf[e], wf[1][e], sum[r][1]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      sum[r][0] += __shfl_xor_sync(~0u, sum[r][0], offset);
      sum[r][1] += __shfl_xor_sync(~0u, sum[r][1], offset);
    }
  }
  if (lane != 0) return;
#pragma unroll
  for (int r = 0; r < kRows; ++r) Finish<kEpilogue>(a, r, pair, rows, sum[r][0], sum[r][1]);
}

template <int kRows>
absl::Status LaunchRows(const SmallBatchLinearArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(CeilDiv(PairsOf(a), kWarps)));
  switch (a.epilogue) {
    case LinearEpilogue::kStoreBf16:
      SmallBatchLinearKernel<kRows, LinearEpilogue::kStoreBf16>
          <<<grid, kWarps * 32, 0, stream>>>(a);
      break;
    case LinearEpilogue::kStoreF32:
      SmallBatchLinearKernel<kRows, LinearEpilogue::kStoreF32><<<grid, kWarps * 32, 0, stream>>>(a);
      break;
    case LinearEpilogue::kAccumulateBf16:
      SmallBatchLinearKernel<kRows, LinearEpilogue::kAccumulateBf16>
          <<<grid, kWarps * 32, 0, stream>>>(a);
      break;
    case LinearEpilogue::kSwiGluBf16:
      SmallBatchLinearKernel<kRows, LinearEpilogue::kSwiGluBf16>
          <<<grid, kWarps * 32, 0, stream>>>(a);
      break;
  }
  return LaunchStatus("SmallBatchLinearKernel");
}

}  // namespace

bool SmallBatchLinearFits(const SmallBatchLinearArgs& a) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return a.m >= 1 && a.m <= kSmallBatchLinearRows && a.n >= 1 && a.k >= 8 && a.k % 8 == 0 &&
         (a.epilogue != LinearEpilogue::kSwiGluBf16 || a.n % 2 == 0) && aligned(a.x) &&
         aligned(a.w) && a.out != nullptr;
}

absl::Status SmallBatchLinear(const SmallBatchLinearArgs& args, void* stream) {
  if (!SmallBatchLinearFits(args)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SmallBatchLinear: m ", args.m, " (1..", kSmallBatchLinearRows, "), n ", args.n, ", k ",
        args.k, " (a multiple of 8), 16-byte aligned x and w, n even for SwiGLU"));
  }
  const cudaStream_t s = AsStream(stream);
  static_assert(kSmallBatchLinearRows == 8, "one case per row count");
  switch (args.m) {
    case 1:
      return LaunchRows<1>(args, s);
    case 2:
      return LaunchRows<2>(args, s);
    case 3:
      return LaunchRows<3>(args, s);
    case 4:
      return LaunchRows<4>(args, s);
    case 5:
      return LaunchRows<5>(args, s);
    case 6:
      return LaunchRows<6>(args, s);
    case 7:
      return LaunchRows<7>(args, s);
    default:
      return LaunchRows<8>(args, s);
  }
}

}  // namespace cuda
}  // namespace sparseaccel
