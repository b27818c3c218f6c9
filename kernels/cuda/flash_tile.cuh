#ifndef SPARSEACCEL_KERNELS_CUDA_FLASH_TILE_CUH_
#define SPARSEACCEL_KERNELS_CUDA_FLASH_TILE_CUH_

// The inner step of FlashAttention-2 on tensor cores (mma.sync m16n8k16 bf16, fp32
// accumulators), shared by the dense prefill kernel and the sparse kernels: one warp owns
// 16 x kMTiles query rows (Q in shared memory) and folds one tile of kFlashKeys keys (K and V
// in shared memory) into its running output with an online softmax. FlashBlock runs the key
// tiles of a thread block through a cp.async pipeline for any such per-group state; the
// warpgroup (wgmma) state of sm_90a is in flash_tile_sm90.cuh.
//
// Shared-memory tiles are rows of kHeadDim bf16 in the layout of the 128-byte swizzle that
// wgmma reads: see SwizzledOffset().

#include <cuda_bf16.h>

#include <cstdint>

namespace sparseaccel {
namespace cuda {

// Element offset of (row, col) in a tile of rows of `kHeadDim` bf16: 8 rows x 64 columns form
// a 1024-byte atom (each row 128 bytes, its 16-byte chunks XOR-swizzled by row % 8, so the 8
// rows an ldmatrix reads hit 8 different bank groups); the atoms of a row group's column halves
// are adjacent, then the next 8 rows follow. This is the canonical 128-byte-swizzled layout of
// wgmma, K-major for Q and K and MN-major for V, with 8 rows' atoms 16 kHeadDim bytes apart.
template <int kHeadDim>
__device__ __forceinline__ int SwizzledOffset(int row, int col) {
  static_assert(kHeadDim % 64 == 0, "rows are whole 64-column atoms");
  const int chunk = ((col % 64) / 8) ^ (row % 8);
  return (row / 8) * 8 * kHeadDim + (col / 64) * 512 + (row % 8) * 64 + chunk * 8 + col % 8;
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

// Rows 0 .. valid_rows - 1 of src, then zeros. The same copy as LoadTileRows for contiguous
// rows, with each thread's source pointer stepped by a constant instead of formed per row
// (a third of the instructions: this runs once per key tile, between a tile's barrier and its
// first matrix product).
template <int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void LoadTile(__nv_bfloat16* tile, const uint16_t* src, int64_t stride,
                                         int64_t valid_rows) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kRows % kRowsPerPass == 0 && kRowsPerPass % 8 == 0, "tile split");
  const int row0 = threadIdx.x / kChunksPerRow, col = (threadIdx.x % kChunksPerRow) * 8;
  __nv_bfloat16* dst = tile + SwizzledOffset<kHeadDim>(row0, col);
  const uint16_t* row_src = src + row0 * stride + col;
  const int valid = static_cast<int>(valid_rows < kRows ? valid_rows : kRows);
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    // A row past the end reads nothing (src-size 0): its address need not be valid.
    CpAsync16(dst + i * kRowsPerPass * kHeadDim, row_src, row0 + i * kRowsPerPass < valid);
    row_src += kRowsPerPass * stride;
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

// The online-softmax step of one row held by 4 lanes: reduces the tile's max over them, folds
// it into the running max and sum, and gives the factor that rescales the row's output, and
// -max * scale_log2 for exp2(score * scale_log2 - max * scale_log2). Returns whether the max
// moved.
__device__ __forceinline__ bool FoldRowMax(float tile_max, float scale_log2, float* row_max,
                                           float* row_sum, float* correction, float* neg_base) {
  tile_max = fmaxf(tile_max, __shfl_xor_sync(~0u, tile_max, 1));
  tile_max = fmaxf(tile_max, __shfl_xor_sync(~0u, tile_max, 2));
  const float new_max = fmaxf(*row_max, tile_max);
  // A row with every key so far masked keeps max -inf: use 0 so exp2 gives 0, not NaN.
  const float base = new_max == -INFINITY ? 0.f : new_max;
  *correction = FastExp2((*row_max - base) * scale_log2);
  const bool moved = *row_max != new_max;
  *row_max = new_max;
  *neg_base = -base * scale_log2;
  *row_sum *= *correction;
  return moved;
}

// Normalises and stores one of a lane's two rows of a 16-row tile (the mma accumulator layout):
// sums this lane's partial row sum over the row's 4 lanes (every lane calls this), then, if
// row < valid_rows, writes columns 8j + 2(lane%4) + {0,1} of out + row * out_stride as bf16 of
// value(j, 0..1) / sum.
template <int kHeadDim, typename Value>
__device__ __forceinline__ void StoreLaneRow(uint16_t* out, int64_t out_stride, int64_t row,
                                             int64_t valid_rows, float partial_sum,
                                             const Value& value) {
  float sum = partial_sum;
  sum += __shfl_xor_sync(~0u, sum, 1);
  sum += __shfl_xor_sync(~0u, sum, 2);
  if (row >= valid_rows) return;
  const float inv_sum = 1.f / sum;
  uint16_t* dst = out + row * out_stride + 2 * (threadIdx.x % 4);
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j) {
    *reinterpret_cast<uint32_t*>(dst + j * 8) =
        PackBf16(value(j, 0) * inv_sum, value(j, 1) * inv_sum);
  }
}

// Which keys of a tile a group's rows see. Key k of the tile exists when k < valid and sits at
// position key0 + k (contiguous keys) or, for gathered keys, entries[k] & kEntryKeyMask, kept
// for this group when the entry has the `owner` bit; group row r, at position first + r, sees
// the existing, kept keys at or before its position. all_visible: every key exists, is kept
// and is at or before `first`, so nothing needs masking.
struct TileMask {
  static constexpr uint32_t kEntryKeyMask = (1u << 30) - 1;

  bool all_visible;
  int key0;
  const uint32_t* entries;  // Gathered keys (global memory), or null for contiguous keys.
  int valid;
  int first;
  uint32_t owner;

  __device__ __forceinline__ bool Hidden(int row, int key) const {
    if (key >= valid) return true;
    if (entries == nullptr) return key0 + key > first + row;
    const uint32_t entry = entries[key];
    return (entry & owner) == 0 || static_cast<int>(entry & kEntryKeyMask) > first + row;
  }
};

// Per-warp state of kMTiles x 16 query rows against tiles of kFlashKeys keys (m-tile m: rows 16m ..
// 16m + 15 of the warp's). Lane l owns rows 16m + l/4 and 16m + l/4 + 8 of each m-tile, and in the
// output the columns 8j + 2(l%4) + {0,1} of each 8-wide column tile j. Q fragments are re-read from
// shared memory for each key tile (registers go to the accumulators); each K/V fragment loaded
// feeds all kMTiles m-tiles, which halves shared-memory traffic per mma at kMTiles = 2.
template <int kHeadDim, int kMTiles, int kFlashKeys>
struct FlashWarpState {
  // What FlashBlock needs of a per-group state: keys per tile, rows and threads of a group,
  // and whether it reads shared memory through the async proxy (wgmma does, ldmatrix not).
  static constexpr int kHeadDimension = kHeadDim;
  static constexpr int kKeys = kFlashKeys;
  static constexpr int kGroupRows = 16 * kMTiles;
  static constexpr int kGroupThreads = 32;
  static constexpr bool kReadsThroughAsyncProxy = false;

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

  // Folds one tile of kFlashKeys keys (K and V tiles in shared memory) in, as `mask` says.
  // scale_log2 = log2(e) / sqrt(head_dim).
  __device__ __forceinline__ void Step(const __nv_bfloat16* k_tile, const __nv_bfloat16* v_tile,
                                       float scale_log2, const TileMask& mask) {
    if (mask.all_visible) {
      AttendTileImpl<false>(k_tile, v_tile, scale_log2, mask);
    } else {
      AttendTileImpl<true>(k_tile, v_tile, scale_log2, mask);
    }
  }

  // With kMask, keys the mask hides from a row (row 0 .. 16 kMTiles - 1 of the warp) count as
  // -inf scores.
  template <bool kMask>
  __device__ __forceinline__ void AttendTileImpl(const __nv_bfloat16* k_tile,
                                                 const __nv_bfloat16* v_tile, float scale_log2,
                                                 const TileMask& mask) {
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
          if (kMask &&
              mask.Hidden(m * 16 + lane / 4 + (e / 2) * 8, n * 8 + 2 * (lane % 4) + e % 2)) {
            s[m][n][e] = -INFINITY;
          }
          tile_max[e / 2] = fmaxf(tile_max[e / 2], s[m][n][e]);
        }
      }
      float neg_base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        rescale |= FoldRowMax(tile_max[r], scale_log2, &row_max[m][r], &row_sum[m][r],
                              &correction[m][r], &neg_base[r]);
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

  // Normalises the warp's rows and stores them as bf16: row r (r < valid_rows) of the warp
  // to out + r * out_stride. Lane l owns rows 16m + l/4 (+8), columns 8j + 2(l%4) + {0,1}.
  __device__ __forceinline__ void Store(uint16_t* out, int64_t out_stride, int64_t valid_rows) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        StoreLaneRow<kHeadDim>(out, out_stride, m * 16 + lane / 4 + r * 8, valid_rows,
                               row_sum[m][r], [&](int j, int e) { return o[m][j][2 * r + e]; });
      }
    }
  }
};

// One thread block of FlashAttention over a list of key tiles: kGroups groups (warps or
// warpgroups, as `State` says) own State::kGroupRows query rows each; the key tiles stream
// through shared memory in a kStages-deep cp.async pipeline (one barrier per tile). `Tiles`
// says which keys each tile holds:
//   int count() const;                                     // tiles for this block
//   void Load(int tile, __nv_bfloat16* k, __nv_bfloat16* v);  // LoadTileRows, all threads,
//                                                          // tiles 0, 1, 2, ... in order
//   bool Visible(int tile, int64_t group_pos0, TileMask* mask) const;
// Visible says whether any key of the tile is visible to the group whose rows sit at
// group_pos0, group_pos0 + 1, ... and, if so, which (the same answer for every thread of the
// group); the group's state folds in only such tiles.
template <typename State, int kGroups, int kStages, int kBlocksPerSm = 1>
struct FlashBlock {
  using GroupState = State;
  static constexpr int kMinBlocksPerSm = kBlocksPerSm;  // For __launch_bounds__.
  static constexpr int kHeadDim = State::kHeadDimension;
  static constexpr int kTileKeys = State::kKeys;
  static constexpr int kPipelineStages = kStages;
  static constexpr int kGroupRows = State::kGroupRows;
  static constexpr int kQueryRows = kGroups * kGroupRows;
  static constexpr int kThreads = kGroups * State::kGroupThreads;
  // wgmma wants 1024-byte aligned atoms: the tiles start at the next such boundary.
  static constexpr int kSharedBytes = (kQueryRows + kStages * 2 * kTileKeys) * kHeadDim * 2 + 1024;

  // Query row r (r < valid_rows) is q + r * q_stride at position first_pos + r; its output row
  // goes to out + r * out_stride. `shared` holds kSharedBytes.
  template <typename Tiles>
  __device__ __forceinline__ static void Run(Tiles& tiles, unsigned char* shared, const uint16_t* q,
                                             int64_t q_stride, int64_t valid_rows,
                                             int64_t first_pos, float scale_log2, uint16_t* out,
                                             int64_t out_stride) {
    constexpr int kKeys = kTileKeys;
    __nv_bfloat16* q_tile =
        reinterpret_cast<__nv_bfloat16*>(shared + (1024 - SharedAddress(shared) % 1024) % 1024);
    __nv_bfloat16* kv_tiles = q_tile + kQueryRows * kHeadDim;  // [stage][K, V][keys][dim]
    auto stage_k = [&](int stage) { return kv_tiles + stage * 2 * kKeys * kHeadDim; };
    const int num_tiles = tiles.count();
    LoadTile<kHeadDim, kQueryRows, kThreads>(q_tile, q, q_stride, valid_rows);
    // One cp.async group per key tile (the first also holds Q), kAhead tiles ahead.
    constexpr int kAhead = kStages - 1;
    static_assert(kAhead >= 1, "too few stages");
#pragma unroll
    for (int tile = 0; tile < kAhead; ++tile) {
      if (tile < num_tiles) tiles.Load(tile, stage_k(tile), stage_k(tile) + kKeys * kHeadDim);
      CpAsyncCommit();
    }
    // Read through a shuffle so the compiler knows it is the same in every lane: what derives
    // from it (the group's Q address, wgmma descriptors) then lives in uniform registers.
    const int group = __shfl_sync(~0u, static_cast<int>(threadIdx.x) / State::kGroupThreads, 0);
    const int64_t group_pos0 = first_pos + group * kGroupRows;
    State state;
    state.Init(q_tile, group * kGroupRows);
    for (int tile = 0; tile < num_tiles; ++tile) {
      CpAsyncWait<kAhead - 1>();  // This tile's group has landed (for this thread)...
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      // cp.async wrote through the generic proxy; wgmma reads through the async one.
      if (State::kReadsThroughAsyncProxy) {
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      }
#endif
      __syncthreads();  // ...for every thread; and all are done with the tile before it.
      // So the stage of tile - 1 can take tile + kAhead.
      const int next = tile + kAhead;
      if (next < num_tiles) {
        tiles.Load(next, stage_k(next % kStages), stage_k(next % kStages) + kKeys * kHeadDim);
      }
      CpAsyncCommit();
      TileMask mask;
      if (tiles.Visible(tile, group_pos0, &mask)) {
        const __nv_bfloat16* k_tile = stage_k(tile % kStages);
        state.Step(k_tile, k_tile + kKeys * kHeadDim, scale_log2, mask);
      }
    }
    const int64_t row0 = group * kGroupRows;
    state.Store(out + row0 * out_stride, out_stride, valid_rows - row0);
  }
};

// Key tiles 0 .. count - 1 of one KV head, contiguous: the tile list of causal dense
// attention for a FlashBlock `Block` (the dense kernel's, and the sparse kernel's for query
// blocks that select every key).
template <typename Block>
struct CausalTiles {
  static constexpr int kKeys = Block::kTileKeys;
  static constexpr int kHeadDim = Block::kHeadDim;
  const uint16_t* k;  // KV head's column, row 0.
  const uint16_t* v;
  int64_t stride;
  int64_t n_kv;
  int num_tiles;

  __device__ __forceinline__ int count() const { return num_tiles; }
  __device__ __forceinline__ void Load(int tile, __nv_bfloat16* k_dst, __nv_bfloat16* v_dst) const {
    const int64_t key0 = int64_t{tile} * kKeys;
    LoadTile<kHeadDim, kKeys, Block::kThreads>(k_dst, k + key0 * stride, stride, n_kv - key0);
    LoadTile<kHeadDim, kKeys, Block::kThreads>(v_dst, v + key0 * stride, stride, n_kv - key0);
  }
  __device__ __forceinline__ bool Visible(int tile, int64_t group_pos0, TileMask* mask) const {
    const int64_t key0 = int64_t{tile} * kKeys;
    // Tiles entirely after this group's last row contribute nothing; a tile that straddles the
    // diagonal is masked (key and row compare as int32 positions: n_kv <= 2^31).
    if (key0 > group_pos0 + Block::kGroupRows - 1) return false;
    *mask = TileMask{key0 + kKeys - 1 <= group_pos0,
                     static_cast<int>(key0),
                     nullptr,
                     kKeys,
                     static_cast<int>(group_pos0),
                     0};
    return true;
  }
};

}  // namespace cuda
}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_CUDA_FLASH_TILE_CUH_
