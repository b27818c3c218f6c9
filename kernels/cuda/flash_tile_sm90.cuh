#ifndef SPARSEACCEL_KERNELS_CUDA_FLASH_TILE_SM90_CUH_
#define SPARSEACCEL_KERNELS_CUDA_FLASH_TILE_SM90_CUH_

// The FlashAttention inner step on Hopper's warpgroup MMA (wgmma.mma_async, sm_90a): a
// warpgroup of 4 warps owns 64 query rows and folds tiles of 64 keys into its output. S = Q K^T
// reads Q and K straight from shared memory through matrix descriptors; P = exp(S - max) stays
// in registers (the accumulator layout of S is the A-fragment layout of P V) and P V reads V
// from shared memory as an MN-major operand. Same interface as FlashWarpState
// (flash_tile.cuh), so FlashBlock and the dense and sparse tile lists run on either; the
// shared-memory tiles already have wgmma's 128-byte-swizzled layout (SwizzledOffset).
//
// Compiled for every target; the instructions exist only on sm_90a, where the host selects
// this state (UseWgmma); elsewhere the kernels that use it trap.
//
// Each fence .. issue .. commit .. wait sequence stays inside one branch: with a wgmma still in
// flight across a branch ptxas cannot prove warp-uniform, it serialises every wgmma of the
// kernel (advisory C7518) or waits early for it (C7517). `nvcc -Xptxas -v` shows both.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "absl/status/statusor.h"
#include "kernels/cuda/attention_inner_loop.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/flash_tile.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SPARSEACCEL_WGMMA 1
#endif

namespace sparseaccel {
namespace cuda {

// Whether the attention kernels run the wgmma inner loop for `choice` on the current device:
// kAuto picks it on compute capability 9.0 (the sm_90a code of this build); asking for wgmma
// elsewhere is an error.
inline absl::StatusOr<bool> UseWgmma(AttentionInnerLoop choice) {
  if (choice == AttentionInnerLoop::kMmaSync) return false;
  int device = 0, major = 0, minor = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const bool available = major == 9 && minor == 0;
  if (choice == AttentionInnerLoop::kWgmma && !available) {
    return absl::FailedPreconditionError(absl::StrCat(
        "wgmma attention needs compute capability 9.0; this device has ", major, ".", minor));
  }
  return available;
}

// Shared-memory matrix descriptor of a 128-byte-swizzled operand: start address, leading and
// stride byte offsets (each encoded >> 4), swizzle mode 1 in bits 62-63.
__device__ __forceinline__ uint64_t MatrixDescriptor(uint32_t address, uint32_t leading_bytes,
                                                     uint32_t stride_bytes) {
  return uint64_t{(address & 0x3FFFF) >> 4} | uint64_t{(leading_bytes & 0x3FFFF) >> 4} << 16 |
         uint64_t{(stride_bytes & 0x3FFFF) >> 4} << 32 | uint64_t{1} << 62;
}

// The descriptor of the operand `bytes` further on in shared memory. The start address field
// (bits 0-13) cannot carry into the next: shared memory ends below 2^18 bytes. So the add is a
// 32-bit one on the low word (a 64-bit add took three instructions per wgmma).
__device__ __forceinline__ uint64_t MovedBy(uint64_t descriptor, uint32_t bytes) {
  const uint32_t low = static_cast<uint32_t>(descriptor) + (bytes >> 4);
  return (descriptor & 0xFFFFFFFF00000000ull) | low;
}

__device__ __forceinline__ void WgmmaFence() {
#ifdef SPARSEACCEL_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaCommit() {
#ifdef SPARSEACCEL_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaWaitAll() {
#ifdef SPARSEACCEL_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}

// Keeps the compiler from moving reads or writes of wgmma accumulators across the fence and
// wait instructions (it does not know that wgmma writes them asynchronously).
template <int kCount>
__device__ __forceinline__ void PinRegisters(float (&d)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (+)= A B for a 64 x 64 x 16 step, A (64 x 16, K-major) and B (16 x 64 as 64 rows of 16,
// K-major) in shared memory; d is overwritten when `accumulate` is false.
__device__ __forceinline__ void WgmmaSharedShared(float (&d)[32], uint64_t a, uint64_t b,
                                                  bool accumulate) {
#ifdef SPARSEACCEL_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
#else
  __trap();
#endif
}

// d += A B for a 64 x 64 x 16 step, A (64 x 16) in registers (the mma.sync A-fragment layout
// per warp) and B (16 x 64) in shared memory, MN-major (rows of B contiguous).
__device__ __forceinline__ void WgmmaRegisterShared(float (&d)[32], const uint32_t (&a)[4],
                                                    uint64_t b) {
#ifdef SPARSEACCEL_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
#else
  __trap();
#endif
}

// The same with B 16 x 128 (two 64-column atoms, 1024 bytes apart): head_dim 128 in one step.
__device__ __forceinline__ void WgmmaRegisterShared(float (&d)[64], const uint32_t (&a)[4],
                                                    uint64_t b) {
#ifdef SPARSEACCEL_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
#else
  __trap();
#endif
}

// Per-warpgroup state of 64 query rows against tiles of 64 keys. Warp w of the group owns rows
// 16w .. 16w + 15; in S and in the output, lane l holds rows 16w + l/4 (+8) and the columns
// 8j + 2(l%4) + {0,1} of each 8-wide column tile j, as in FlashWarpState. The output is one
// 64 x head_dim wgmma accumulator. Each Step issues
// S = Q K^T, waits, does the online softmax and issues O += P V, and waits: the two
// warpgroups of a block and the blocks' other work overlap one group's softmax with the
// other's matrix products. (Pipelining S of the next tile against this tile's softmax inside
// a group measured no faster with one block an SM, and two blocks leave no registers for it.)
template <int kHeadDim>
struct FlashWarpgroupState {
  static constexpr int kHeadDimension = kHeadDim;
  static constexpr int kKeys = 64;
  static constexpr int kGroupRows = 64;
  static constexpr int kGroupThreads = 128;
  static constexpr bool kReadsThroughAsyncProxy = true;
  // Bytes between atoms of consecutive 8-row groups, and between a row group's column halves.
  static constexpr uint32_t kRowGroupBytes = 16 * kHeadDim;
  static constexpr uint32_t kHalfBytes = 1024;

  uint32_t q_address;     // Shared address of the group's Q rows.
  float o[kHeadDim / 2];  // Unnormalised output: one m64 x n(head_dim) wgmma accumulator.
  float row_max[2];       // Running max of the raw scores of this lane's two rows.
  float row_sum[2];       // Running sum of exp2((score - row_max) * scale), this lane's columns.

  __device__ __forceinline__ void Init(const __nv_bfloat16* q_tile, int row0) {
    q_address = SharedAddress(q_tile + SwizzledOffset<kHeadDim>(row0, 0));
#pragma unroll
    for (int i = 0; i < kHeadDim / 2; ++i) o[i] = 0;
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0;
  }

  // Descriptor of 64 K-major rows starting at `address` (8-row aligned), and the same moved
  // to the 16 columns from `col`: 32 bytes per 16 columns inside an atom, the next half 1024
  // bytes on (added to the start-address field, which holds address >> 4).
  __device__ __forceinline__ static uint64_t KMajor(uint32_t address) {
    return MatrixDescriptor(address, 16, kRowGroupBytes);
  }
  __device__ __forceinline__ static uint64_t AtColumn(uint64_t descriptor, int col) {
    return MovedBy(descriptor, (col / 64) * kHalfBytes + (col % 64) * 2);
  }

  __device__ __forceinline__ void Step(const __nv_bfloat16* k_tile, const __nv_bfloat16* v_tile,
                                       float scale_log2, const TileMask& mask) {
    const int lane = threadIdx.x % 32, warp = (threadIdx.x / 32) % 4;
    // S = Q K^T over head_dim in 16-column steps.
    float s[32];
    const uint64_t q_desc = KMajor(q_address), k_desc = KMajor(SharedAddress(k_tile));
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      WgmmaSharedShared(s, AtColumn(q_desc, kk * 16), AtColumn(k_desc, kk * 16), kk > 0);
    }
    WgmmaCommit();
    WgmmaWaitAll();
    PinRegisters(s);

    // Online softmax: s[4j + e] is row lane/4 + 8(e/2) of the warp's, key 8j + 2(lane%4) + e%2.
    if (!mask.all_visible) {
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (mask.Hidden(warp * 16 + lane / 4 + (e / 2) * 8, j * 8 + 2 * (lane % 4) + e % 2)) {
            s[4 * j + e] = -INFINITY;
          }
        }
      }
    }
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) tile_max[e / 2] = fmaxf(tile_max[e / 2], s[4 * j + e]);
    }
    float correction[2], neg_base[2];
    bool rescale = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      rescale |= FoldRowMax(tile_max[r], scale_log2, &row_max[r], &row_sum[r], &correction[r],
                            &neg_base[r]);
    }
    uint32_t p[kKeys / 16][4];
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) {
      float e[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) e[i] = FastExp2(fmaf(s[4 * j + i], scale_log2, neg_base[i / 2]));
      row_sum[0] += e[0] + e[1];
      row_sum[1] += e[2] + e[3];
      p[j / 2][(j % 2) * 2] = PackBf16(e[0], e[1]);
      p[j / 2][(j % 2) * 2 + 1] = PackBf16(e[2], e[3]);
    }
    // Once the running maxima settle (most tiles), no row of the warp needs its output scaled.
    if (__any_sync(~0u, rescale)) {
#pragma unroll
      for (int i = 0; i < kHeadDim / 2; ++i) o[i] *= correction[(i / 2) % 2];
    }

    // O += P V, 16 keys a step over all of head_dim: V rows are keys, read MN-major (two
    // 8-key atoms a step, the column halves' atoms kHalfBytes apart).
    const uint64_t v_desc = MatrixDescriptor(SharedAddress(v_tile), kHalfBytes, kRowGroupBytes);
    PinRegisters(o);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      WgmmaRegisterShared(o, p[kk], MovedBy(v_desc, 2 * kk * kRowGroupBytes));
    }
    WgmmaCommit();
    // Done before the block's next barrier lets the loader overwrite this V tile.
    WgmmaWaitAll();
    PinRegisters(o);
  }

  // Normalises the group's rows and stores them as bf16: row r (r < valid_rows) of the group
  // to out + r * out_stride.
  __device__ __forceinline__ void Store(uint16_t* out, int64_t out_stride, int64_t valid_rows) {
    const int lane = threadIdx.x % 32, warp = (threadIdx.x / 32) % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      StoreLaneRow<kHeadDim>(out, out_stride, warp * 16 + lane / 4 + r * 8, valid_rows, row_sum[r],
                             [&](int j, int e) { return o[4 * j + 2 * r + e]; });
    }
  }
};

// The thread block of the dense and sparse attention kernels: 128 query rows, as 4 warps of 32
// rows (mma.sync; 32 keys a tile at head_dim 128 keep the accumulators in registers; 3
// pipeline stages) or as 2 warpgroups of 64 (wgmma; 2 stages and at most 128 registers a
// thread, so that two blocks share an SM: 440 TFLOP/s at 32K against 383 with one block of 3
// stages, on an H200).
template <int kHeadDim, bool kWgmma>
using AttentionBlock =
    std::conditional_t<kWgmma, FlashBlock<FlashWarpgroupState<kHeadDim>, 2, 2, 2>,
                       FlashBlock<FlashWarpState<kHeadDim, 2, kHeadDim == 128 ? 32 : 64>, 4, 3>>;

}  // namespace cuda
}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_CUDA_FLASH_TILE_SM90_CUH_
