#ifndef SPARSEACCEL_KERNELS_CUDA_FLASH_TILE_CUH_
#define SPARSEACCEL_KERNELS_CUDA_FLASH_TILE_CUH_

// The inner step of FlashAttention-2 on tensor cores (mma.sync m16n8k16 bf16, fp32
// accumulators), shared by the dense prefill kernel and the sparse kernels: one warp owns
// 16 x kMTiles query rows (Q in shared memory) and folds one tile of kFlashKeys keys (K and V
// in shared memory) into its running output with an online softmax.
//
// Shared-memory tiles are rows of kHeadDim bf16, 16-byte chunks XOR-swizzled by (row % 8) so
// that the 8 rows an ldmatrix reads hit 8 different bank groups: see SwizzledOffset().

#include <cuda_bf16.h>

#include <cstdint>

namespace sparseaccel {
namespace cuda {

// Element offset of (row, col) in a swizzled tile of rows of `kHeadDim` bf16.
template <int kHeadDim>
__device__ __forceinline__ int SwizzledOffset(int row, int col) {
  const int chunk = (col / 8) ^ (row % 8);
  return row * kHeadDim + chunk * 8 + col % 8;
}

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* global, bool valid) {
  // src-size 0 zero-fills the 16 bytes: rows past the end read as zeros.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SharedAddress(smem)),
               "l"(global), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Copies kRows rows of kHeadDim bf16 (row r at src + r * stride) into a swizzled tile with
// cp.async, using all kThreads threads of the block; rows >= valid_rows are zero-filled.
// Thread t copies the 16-byte chunk t % kChunksPerRow of rows t / kChunksPerRow +
// i * kRowsPerPass: the same swizzled column in every pass. The caller commits and waits.
template <int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void LoadTile(__nv_bfloat16* tile, const uint16_t* src, int64_t stride,
                                         int64_t valid_rows) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kRows % kRowsPerPass == 0 && kRowsPerPass % 8 == 0, "tile split");
  const int row0 = threadIdx.x / kChunksPerRow, col = (threadIdx.x % kChunksPerRow) * 8;
  __nv_bfloat16* dst = tile + SwizzledOffset<kHeadDim>(row0, col);
  const uint16_t* from = src + row0 * stride + col;
  const int64_t pass_stride = kRowsPerPass * stride;
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const bool valid = row0 + i * kRowsPerPass < valid_rows;
    CpAsync16(dst + i * kRowsPerPass * kHeadDim, valid ? from + i * pass_stride : src, valid);
  }
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(smem)));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(smem)));
}

// d += a * b for one m16n8k16 tile (row-major A, column-major B).
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x on the special-function unit (-inf gives 0).
__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Per-warp state of kMTiles x 16 query rows against tiles of kFlashKeys keys (m-tile m: rows 16m ..
// 16m + 15 of the warp's). Lane l owns rows 16m + l/4 and 16m + l/4 + 8 of each m-tile, and in the
// output the columns 8j + 2(l%4) + {0,1} of each 8-wide column tile j. Q fragments are re-read from
// shared memory for each key tile (registers go to the accumulators); each K/V fragment loaded
// feeds all kMTiles m-tiles, which halves shared-memory traffic per mma at kMTiles = 2.
template <int kHeadDim, int kMTiles, int kFlashKeys>
struct FlashWarpState {
  const __nv_bfloat16* q_rows;        // Swizzled Q tile, offset to the warp's first row.
  int q_row0;                         // That row's index in the tile (for the swizzle).
  float o[kMTiles][kHeadDim / 8][4];  // Unnormalised output accumulators.
  float row_max[kMTiles][2];          // Running max of the scaled scores (log2 domain).
  float row_sum[kMTiles][2];          // Running sum of exp2(score - row_max), this lane's columns.

  // Rows [row0, row0 + 16 kMTiles) of a swizzled Q tile in shared memory; resets the state.
  __device__ __forceinline__ void Init(const __nv_bfloat16* q_tile, int row0) {
    q_rows = q_tile;
    q_row0 = row0;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) o[m][j][0] = o[m][j][1] = o[m][j][2] = o[m][j][3] = 0;
      row_max[m][0] = row_max[m][1] = -INFINITY;
      row_sum[m][0] = row_sum[m][1] = 0;
    }
  }

  // Folds one tile of kFlashKeys keys (swizzled K and V tiles in shared memory) in.
  // scale_log2 = log2(e) / sqrt(head_dim). If `mask`, key i of the tile (at position
  // key_pos0 + i) is dropped for the query row at position q_pos0 + (row within the warp)
  // when key_pos0 + i > that position.
  __device__ __forceinline__ void AttendTile(const __nv_bfloat16* k_tile,
                                             const __nv_bfloat16* v_tile, float scale_log2,
                                             bool mask, int64_t key_pos0, int64_t q_pos0) {
    if (mask) {
      AttendTileImpl<true>(k_tile, v_tile, scale_log2, static_cast<int>(q_pos0 - key_pos0));
    } else {
      AttendTileImpl<false>(k_tile, v_tile, scale_log2, 0);
    }
  }

  // kMask: the tile straddles the diagonal; `diagonal` = q_pos0 - key_pos0 is then within a
  // tile's span, so keys and queries compare as int32 offsets from key_pos0.
  template <bool kMask>
  __device__ __forceinline__ void AttendTileImpl(const __nv_bfloat16* k_tile,
                                                 const __nv_bfloat16* v_tile, float scale_log2,
                                                 int diagonal) {
    const int lane = threadIdx.x % 32;
    float s[kMTiles][kFlashKeys / 8][4];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int n = 0; n < kFlashKeys / 8; ++n) {
        s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0;
      }
    }
    // S = Q K^T: K rows are the columns of B, so plain ldmatrix gives B fragments; one x4
    // covers two 8-key tiles x 16 of head_dim.
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t q[kMTiles][4];
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        LdMatrixX4(q[m], q_rows + SwizzledOffset<kHeadDim>(q_row0 + m * 16 + lane % 16,
                                                           kk * 16 + (lane / 16) * 8));
      }
#pragma unroll
      for (int n2 = 0; n2 < kFlashKeys / 16; ++n2) {
        uint32_t b[4];
        LdMatrixX4(b, k_tile + SwizzledOffset<kHeadDim>(n2 * 16 + (lane / 16) * 8 + lane % 8,
                                                        kk * 16 + ((lane / 8) % 2) * 8));
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) {
          MmaBf16(s[m][2 * n2], q[m], b[0], b[1]);
          MmaBf16(s[m][2 * n2 + 1], q[m], b[2], b[3]);
        }
      }
    }
    uint32_t p[kMTiles][kFlashKeys / 16][4];
    float correction[kMTiles][2];
    bool rescale = false;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      // Online softmax: maxima of the raw scores, exp2((s - max) * scale_log2) as one FFMA.
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kFlashKeys / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (kMask &&
              n * 8 + 2 * (lane % 4) + e % 2 > diagonal + m * 16 + lane / 4 + (e / 2) * 8) {
            s[m][n][e] = -INFINITY;
          }
          tile_max[e / 2] = fmaxf(tile_max[e / 2], s[m][n][e]);
        }
      }
      float neg_base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(~0u, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(~0u, tile_max[r], 2));
        const float new_max = fmaxf(row_max[m][r], tile_max[r]);
        // A row with every key so far masked keeps max -inf: use 0 so exp2 gives 0, not NaN.
        const float base = new_max == -INFINITY ? 0.f : new_max;
        correction[m][r] = FastExp2((row_max[m][r] - base) * scale_log2);
        rescale |= row_max[m][r] != new_max;
        row_max[m][r] = new_max;
        neg_base[r] = -base * scale_log2;
        row_sum[m][r] *= correction[m][r];
      }
      // P = exp2(S - max) becomes the A operand of P V, 16 keys per mma k-step.
#pragma unroll
      for (int n = 0; n < kFlashKeys / 8; ++n) {
        float e[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) e[i] = FastExp2(fmaf(s[m][n][i], scale_log2, neg_base[i / 2]));
        row_sum[m][0] += e[0] + e[1];
        row_sum[m][1] += e[2] + e[3];
        p[m][n / 2][(n % 2) * 2] = PackBf16(e[0], e[1]);
        p[m][n / 2][(n % 2) * 2 + 1] = PackBf16(e[2], e[3]);
      }
    }
    // Once the running maxima settle (most tiles), no row of the warp needs its output scaled.
    if (__any_sync(~0u, rescale)) {
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int j = 0; j < kHeadDim / 8; ++j) {
          o[m][j][0] *= correction[m][0];
          o[m][j][1] *= correction[m][0];
          o[m][j][2] *= correction[m][1];
          o[m][j][3] *= correction[m][1];
        }
      }
    }
    // O += P V: V rows are keys (the k dimension), so ldmatrix.trans gives B fragments; one
    // x4 covers 16 keys x two 8-wide column tiles.
#pragma unroll
    for (int kk = 0; kk < kFlashKeys / 16; ++kk) {
#pragma unroll
      for (int j2 = 0; j2 < kHeadDim / 16; ++j2) {
        uint32_t b[4];
        LdMatrixX4Trans(
            b, v_tile + SwizzledOffset<kHeadDim>(kk * 16 + lane % 16, j2 * 16 + (lane / 16) * 8));
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) {
          MmaBf16(o[m][2 * j2], p[m][kk], b[0], b[1]);
          MmaBf16(o[m][2 * j2 + 1], p[m][kk], b[2], b[3]);
        }
      }
    }
  }

  // The row sums across the 4 lanes of a row, ready for normalising: call once at the end.
  __device__ __forceinline__ void FinishRowSums() {
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_sum[m][r] += __shfl_xor_sync(~0u, row_sum[m][r], 1);
        row_sum[m][r] += __shfl_xor_sync(~0u, row_sum[m][r], 2);
      }
    }
  }
};

}  // namespace cuda
}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_CUDA_FLASH_TILE_CUH_
