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

// Copies kRows rows of kHeadDim bf16 into a swizzled tile with cp.async, using all kThreads
// threads of the block: tile row r comes from src + source_row(r) * stride, or is zero-filled
// when source_row(r) < 0. Thread t copies the 16-byte chunk t % kChunksPerRow of rows
// t / kChunksPerRow + i * kRowsPerPass: the same swizzled column in every pass. The caller
// commits and waits.
template <int kHeadDim, int kRows, int kThreads, typename SourceRow>
__device__ __forceinline__ void LoadTileRows(__nv_bfloat16* tile, const uint16_t* src,
                                             int64_t stride, const SourceRow& source_row) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kRows % kRowsPerPass == 0 && kRowsPerPass % 8 == 0, "tile split");
  const int row0 = threadIdx.x / kChunksPerRow, col = (threadIdx.x % kChunksPerRow) * 8;
  __nv_bfloat16* dst = tile + SwizzledOffset<kHeadDim>(row0, col);
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const int64_t row = source_row(row0 + i * kRowsPerPass);
    CpAsync16(dst + i * kRowsPerPass * kHeadDim, src + (row < 0 ? 0 : row * stride + col),
              row >= 0);
  }
}

// Rows 0 .. valid_rows - 1 of src, then zeros.
template <int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void LoadTile(__nv_bfloat16* tile, const uint16_t* src, int64_t stride,
                                         int64_t valid_rows) {
  LoadTileRows<kHeadDim, kRows, kThreads>(
      tile, src, stride, [valid_rows](int r) -> int64_t { return r < valid_rows ? r : -1; });
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

  // s = Q K^T (raw, unscaled) for the tile: s[m][n][e] is row 16m + lane/4 + 8(e/2) of the
  // warp's, key 8n + 2(lane%4) + e%2 of the tile.
  __device__ __forceinline__ void Scores(const __nv_bfloat16* k_tile,
                                         float (&s)[kMTiles][kFlashKeys / 8][4]) const {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int n = 0; n < kFlashKeys / 8; ++n) {
        s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0;
      }
    }
    // K rows are the columns of B, so plain ldmatrix gives B fragments; one x4 covers two
    // 8-key tiles x 16 of head_dim.
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
  }

  // Folds one tile of kFlashKeys keys (swizzled K and V tiles in shared memory) in, every key
  // visible to every row. scale_log2 = log2(e) / sqrt(head_dim).
  __device__ __forceinline__ void AttendTile(const __nv_bfloat16* k_tile,
                                             const __nv_bfloat16* v_tile, float scale_log2) {
    AttendTileImpl<false>(k_tile, v_tile, scale_log2, [](int, int) { return false; });
  }

  // The same with some keys hidden: masked(row, key) is true when key `key` of the tile (0 ..
  // kFlashKeys - 1) is invisible to row `row` of the warp (0 .. 16 kMTiles - 1).
  template <typename Masked>
  __device__ __forceinline__ void AttendTileMasked(const __nv_bfloat16* k_tile,
                                                   const __nv_bfloat16* v_tile, float scale_log2,
                                                   const Masked& masked) {
    AttendTileImpl<true>(k_tile, v_tile, scale_log2, masked);
  }

  template <bool kMask, typename Masked>
  __device__ __forceinline__ void AttendTileImpl(const __nv_bfloat16* k_tile,
                                                 const __nv_bfloat16* v_tile, float scale_log2,
                                                 const Masked& masked) {
    const int lane = threadIdx.x % 32;
    float s[kMTiles][kFlashKeys / 8][4];
    Scores(k_tile, s);
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
          if (kMask && masked(m * 16 + lane / 4 + (e / 2) * 8, n * 8 + 2 * (lane % 4) + e % 2)) {
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

// One thread block of FlashAttention over a list of key tiles: kWarps warps own 16 kMTiles
// query rows each; the key tiles stream through shared memory in a kStages-deep cp.async
// pipeline (one barrier per tile). `Tiles` says which keys each tile holds:
//   int count() const;                                     // tiles for this block
//   void Load(int tile, __nv_bfloat16* k, __nv_bfloat16* v);  // LoadTileRows, all threads,
//                                                          // tiles 0, 1, 2, ... in order
//   void Attend(FlashWarpState<...>& state, int tile, const __nv_bfloat16* k,
//               const __nv_bfloat16* v, float scale_log2, int64_t warp_pos0) const;
// Attend folds the tile into one warp's state, masking keys after each row's position (rows
// at warp_pos0, warp_pos0 + 1, ...) or skipping the tile when no key is visible.
template <int kHeadDim, int kWarps, int kMTiles, int kKeys, int kStages>
struct FlashBlock {
  static constexpr int kTileKeys = kKeys;
  static constexpr int kPipelineStages = kStages;
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kQueryRows = kWarps * kWarpRows;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kSharedBytes = (kQueryRows + kStages * 2 * kKeys) * kHeadDim * 2;
  using WarpState = FlashWarpState<kHeadDim, kMTiles, kKeys>;

  // Query row r (r < valid_rows) is q + r * q_stride at position first_pos + r; its output row
  // goes to out + r * out_stride. `shared` holds kSharedBytes.
  template <typename Tiles>
  __device__ __forceinline__ static void Run(Tiles& tiles, unsigned char* shared,
                                             const uint16_t* q, int64_t q_stride,
                                             int64_t valid_rows, int64_t first_pos,
                                             float scale_log2, uint16_t* out,
                                             int64_t out_stride) {
    __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(shared);
    __nv_bfloat16* kv_tiles = q_tile + kQueryRows * kHeadDim;  // [stage][K, V][keys][dim]
    auto stage_k = [&](int stage) { return kv_tiles + stage * 2 * kKeys * kHeadDim; };
    const int num_tiles = tiles.count();
    LoadTile<kHeadDim, kQueryRows, kThreads>(q_tile, q, q_stride, valid_rows);
    // One cp.async group per key tile (the first also holds Q), kStages - 1 tiles ahead.
#pragma unroll
    for (int tile = 0; tile < kStages - 1; ++tile) {
      if (tile < num_tiles) tiles.Load(tile, stage_k(tile), stage_k(tile) + kKeys * kHeadDim);
      CpAsyncCommit();
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t warp_pos0 = first_pos + warp * kWarpRows;
    WarpState state;
    state.Init(q_tile, warp * kWarpRows);
    for (int tile = 0; tile < num_tiles; ++tile) {
      CpAsyncWait<kStages - 2>();  // This tile's group has landed (for this thread)...
      __syncthreads();  // ...for every thread; and all are done with the tile before it.
      // So the stage of tile - 1 can take tile + kStages - 1.
      const int next = tile + kStages - 1;
      if (next < num_tiles) {
        tiles.Load(next, stage_k(next % kStages), stage_k(next % kStages) + kKeys * kHeadDim);
      }
      CpAsyncCommit();
      const __nv_bfloat16* k_tile = stage_k(tile % kStages);
      tiles.Attend(state, tile, k_tile, k_tile + kKeys * kHeadDim, scale_log2, warp_pos0);
    }
    state.FinishRowSums();
    // Normalise and store: lane owns rows 16m + lane/4 (+8), columns 8j + 2(lane%4) + {0,1}.
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t row = warp * kWarpRows + m * 16 + lane / 4 + r * 8;
        if (row >= valid_rows) continue;
        const float inv_sum = 1.f / state.row_sum[m][r];
        uint16_t* dst = out + row * out_stride + 2 * (lane % 4);
#pragma unroll
        for (int j = 0; j < kHeadDim / 8; ++j) {
          *reinterpret_cast<uint32_t*>(dst + j * 8) =
              PackBf16(state.o[m][j][2 * r] * inv_sum, state.o[m][j][2 * r + 1] * inv_sum);
        }
      }
    }
  }
};

}  // namespace cuda
}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_CUDA_FLASH_TILE_CUH_
