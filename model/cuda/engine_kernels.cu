#include <mma.h>

#include <cmath>

#include "absl/strings/str_cat.h"
#include "model/cuda/cuda_util.cuh"
#include "model/cuda/engine_kernels.cuh"

namespace sparseaccel {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

__device__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ float Round(float v) { return __bfloat162float(__float2bfloat16(v)); }

int Blocks(int64_t n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

__global__ void EmbeddingGatherKernel(const int32_t* ids, const bf16* table, int64_t hidden,
                                      bf16* out) {
  const uint4* src = reinterpret_cast<const uint4*>(table + ids[blockIdx.x] * hidden);
  uint4* dst = reinterpret_cast<uint4*>(out + blockIdx.x * hidden);
  for (int64_t i = threadIdx.x; i < hidden / 8; i += blockDim.x) dst[i] = src[i];
}

__global__ void RmsNormKernel(const bf16* x, int64_t hidden, const bf16* weight, float eps,
                              bf16* out) {
  const bf16* row = x + blockIdx.x * hidden;
  float sum = 0;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = __bfloat162float(row[i]);
    sum += v * v;
  }
  __shared__ float warp_sums[32];
  sum = WarpSum(sum);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x < 32) {
    float total = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.0f;
    total = WarpSum(total);
    if (threadIdx.x == 0) warp_sums[0] = total;
  }
  __syncthreads();
  const float scale = rsqrtf(warp_sums[0] / static_cast<float>(hidden) + eps);
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float normed = Round(__bfloat162float(row[i]) * scale);
    out[blockIdx.x * hidden + i] = __float2bfloat16(normed * __bfloat162float(weight[i]));
  }
}

__global__ void RopeAndStoreKvKernel(RopeStoreArgs a) {
  const int64_t r = blockIdx.x;
  const int64_t half = a.head_dim / 2;
  const int64_t pos = a.positions ? a.positions[r] : a.first_pos + r;
  const int64_t slot = a.slots ? a.slots[r] : a.first_slot + r;
  const int64_t kv_row = a.num_kv_heads * a.head_dim;
  bf16* row = a.qkv + r * a.qkv_stride;
  const int64_t pairs = (a.num_heads + a.num_kv_heads) * half;
  for (int64_t idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
    const int64_t head = idx / half;
    const int64_t i = idx % half;
    float sin_v, cos_v;
    sincosf(static_cast<float>(pos) * a.inv_freq[i], &sin_v, &cos_v);
    // Hugging Face casts cos/sin to the activation dtype and rounds each product.
    const float c = Round(cos_v), s = Round(sin_v);
    const float x1 = __bfloat162float(row[head * a.head_dim + i]);
    const float x2 = __bfloat162float(row[head * a.head_dim + i + half]);
    const bf16 y1 = __float2bfloat16(Round(x1 * c) - Round(x2 * s));
    const bf16 y2 = __float2bfloat16(Round(x2 * c) + Round(x1 * s));
    if (head < a.num_heads) {
      row[head * a.head_dim + i] = y1;
      row[head * a.head_dim + i + half] = y2;
    } else {
      bf16* k = a.k_dst + slot * kv_row + (head - a.num_heads) * a.head_dim;
      k[i] = y1;
      k[i + half] = y2;
    }
  }
  const bf16* v = row + (a.num_heads + a.num_kv_heads) * a.head_dim;
  for (int64_t i = threadIdx.x; i < kv_row; i += blockDim.x) a.v_dst[slot * kv_row + i] = v[i];
}

__global__ void SwiGluKernel(const bf16* gate_up, int64_t n, int64_t inter, bf16* out) {
  const int64_t total = n * inter;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / inter, j = idx % inter;
    const float g = __bfloat162float(gate_up[r * 2 * inter + j]);
    const float u = __bfloat162float(gate_up[r * 2 * inter + inter + j]);
    out[idx] = __float2bfloat16(Round(g / (1.0f + __expf(-g))) * u);
  }
}

// FlashAttention-2 style: a block takes 64 queries of one head, 4 warps of 16 rows each; key
// tiles of 64 are staged in shared memory; S = QK^T and O += PV on bf16 tensor cores (WMMA),
// online softmax in fp32 with the running output kept in shared memory.
template <int D>
struct FlashLayout {
  static constexpr int kBlockQ = 64, kBlockK = 64, kWarps = 4;
  static constexpr int kKvLd = D + 8;       // bf16
  static constexpr int kSLd = kBlockK + 4;  // float
  static constexpr int kPLd = kBlockK + 8;  // bf16
  static constexpr int kOLd = D + 4;        // float
  static constexpr size_t kKvBytes = size_t{kBlockK} * kKvLd * 2;
  static constexpr size_t kSBytes = size_t{kWarps} * 16 * kSLd * 4;
  static constexpr size_t kPBytes = size_t{kWarps} * 16 * kPLd * 2;
  static constexpr size_t kOBytes = size_t{kWarps} * 16 * kOLd * 4;
  static constexpr size_t kBytes = 2 * kKvBytes + kSBytes + kPBytes + kOBytes;
};

template <int D>
__device__ void LoadTile(const bf16* src, int64_t stride, int64_t first_row, int64_t rows_valid,
                         bf16* dst) {
  using L = FlashLayout<D>;
  constexpr int kVecPerRow = D / 8;
  for (int idx = threadIdx.x; idx < L::kBlockK * kVecPerRow; idx += blockDim.x) {
    const int r = idx / kVecPerRow, c = idx % kVecPerRow;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (first_row + r < rows_valid) {
      value = *reinterpret_cast<const uint4*>(src + (first_row + r) * stride + c * 8);
    }
    *reinterpret_cast<uint4*>(dst + r * L::kKvLd + c * 8) = value;
  }
}

template <int D>
__global__ void __launch_bounds__(128) FlashPrefillKernel(PrefillAttentionArgs a) {
  using namespace nvcuda;
  using L = FlashLayout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* k_tile = reinterpret_cast<bf16*>(smem);
  bf16* v_tile = reinterpret_cast<bf16*>(smem + L::kKvBytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* s_warp = reinterpret_cast<float*>(smem + 2 * L::kKvBytes) + warp * 16 * L::kSLd;
  bf16* p_warp = reinterpret_cast<bf16*>(smem + 2 * L::kKvBytes + L::kSBytes) + warp * 16 * L::kPLd;
  float* o_warp = reinterpret_cast<float*>(smem + 2 * L::kKvBytes + L::kSBytes + L::kPBytes) +
                  warp * 16 * L::kOLd;

  const int64_t q_tile = gridDim.x - 1 - blockIdx.x;  // Longest rows first.
  const int64_t head = blockIdx.y;
  const int64_t kv_head = head / (a.num_heads / a.num_kv_heads);
  const int64_t kv_stride = a.num_kv_heads * D;
  const int64_t q_row0 = q_tile * L::kBlockQ;
  const int64_t warp_row0 = q_row0 + warp * 16;
  const bool warp_active = warp_row0 < a.nq;
  const int64_t warp_last_pos = a.q_start + min(warp_row0 + 15, a.nq - 1);
  const int64_t k_end = a.q_start + min(q_row0 + L::kBlockQ, a.nq);

  // Stage Q through the K buffer into per-warp fragments.
  LoadTile<D>(a.q + head * D, a.q_stride, q_row0, a.nq, k_tile);
  for (int i = threadIdx.x; i < L::kWarps * 16 * L::kOLd; i += blockDim.x) {
    (o_warp - warp * 16 * L::kOLd)[i] = 0.0f;
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> q_frag[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    wmma::load_matrix_sync(q_frag[kk], k_tile + warp * 16 * L::kKvLd + kk * 16, L::kKvLd);
  }

  const int row = lane / 2, col0 = (lane % 2) * 32;
  const int64_t row_pos = a.q_start + min(warp_row0 + row, a.nq - 1);
  const float scale = kLog2e / sqrtf(static_cast<float>(D));
  float m = -INFINITY, l = 0.0f;

  for (int64_t k0 = 0; k0 < k_end; k0 += L::kBlockK) {
    __syncthreads();
    LoadTile<D>(a.k + kv_head * D, kv_stride, k0, k_end, k_tile);
    LoadTile<D>(a.v + kv_head * D, kv_stride, k0, k_end, v_tile);
    __syncthreads();
    if (!warp_active || k0 > warp_last_pos) continue;
#pragma unroll
    for (int j = 0; j < L::kBlockK / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
      wmma::fill_fragment(s_frag, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> k_frag;
        wmma::load_matrix_sync(k_frag, k_tile + j * 16 * L::kKvLd + kk * 16, L::kKvLd);
        wmma::mma_sync(s_frag, q_frag[kk], k_frag, s_frag);
      }
      wmma::store_matrix_sync(s_warp + j * 16, s_frag, L::kSLd, wmma::mem_row_major);
    }
    __syncwarp();
    float s[32];
    float tile_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const bool masked = k0 + col0 + c > row_pos;
      s[c] = masked ? -INFINITY : s_warp[row * L::kSLd + col0 + c] * scale;
      tile_max = fmaxf(tile_max, s[c]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m, tile_max);
    const float alpha = exp2f(m - m_new);
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const float p = exp2f(s[c] - m_new);
      sum += p;
      p_warp[row * L::kPLd + col0 + c] = __float2bfloat16(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    for (int d = (lane % 2) * (D / 2); d < (lane % 2 + 1) * (D / 2); ++d) {
      o_warp[row * L::kOLd + d] *= alpha;
    }
    __syncwarp();
#pragma unroll
    for (int t = 0; t < D / 16; ++t) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      wmma::load_matrix_sync(o_frag, o_warp + t * 16, L::kOLd, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < L::kBlockK / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> p_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> v_frag;
        wmma::load_matrix_sync(p_frag, p_warp + kk * 16, L::kPLd);
        wmma::load_matrix_sync(v_frag, v_tile + kk * 16 * L::kKvLd + t * 16, L::kKvLd);
        wmma::mma_sync(o_frag, p_frag, v_frag, o_frag);
      }
      wmma::store_matrix_sync(o_warp + t * 16, o_frag, L::kOLd, wmma::mem_row_major);
    }
    __syncwarp();
  }
  if (!warp_active || warp_row0 + row >= a.nq) return;
  const float inv_l = 1.0f / l;
  bf16* out = a.out + (warp_row0 + row) * a.num_heads * D + head * D;
  for (int d = (lane % 2) * (D / 2); d < (lane % 2 + 1) * (D / 2); ++d) {
    out[d] = __float2bfloat16(o_warp[row * L::kOLd + d] * inv_l);
  }
}

template <int D>
absl::Status LaunchFlashPrefill(const PrefillAttentionArgs& a, cudaStream_t stream) {
  using L = FlashLayout<D>;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      FlashPrefillKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes));
  const dim3 grid(Blocks(a.nq, L::kBlockQ), a.num_heads);
  FlashPrefillKernel<D><<<grid, 128, L::kBytes, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

// Decode: a block takes one sequence, one KV head (all its query heads) and kDecodeSplit
// positions; its 4 warps stride over the positions, then merge; a second kernel merges splits.
constexpr int kDecodeSplit = 256;
constexpr int kMaxGroup = 8;

int64_t DecodeSplits(int64_t max_length) { return (max_length + kDecodeSplit - 1) / kDecodeSplit; }

template <int D>
__global__ void __launch_bounds__(128) DecodeSplitKernel(DecodeAttentionArgs a) {
  constexpr int E = D >= 32 ? D / 32 : 1;
  const int64_t split = blockIdx.x, kv_head = blockIdx.y, seq = blockIdx.z;
  const int64_t length = a.lengths[seq];
  const int64_t begin = split * kDecodeSplit;
  if (begin >= length) return;
  const int64_t end = min(begin + static_cast<int64_t>(kDecodeSplit), length);
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool lane_active = lane * E < D;
  const float scale = kLog2e / sqrtf(static_cast<float>(D));

  float q[kMaxGroup][E], acc[kMaxGroup][E], m[kMaxGroup], l[kMaxGroup];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      acc[g][e] = 0.0f;
      q[g][e] =
          (g < group && lane_active)
              ? __bfloat162float(a.q[seq * a.q_stride + (kv_head * group + g) * D + lane * E + e]) *
                    scale
              : 0.0f;
    }
  }
  const int64_t kv_row = a.num_kv_heads * D;
  const int32_t* table = a.block_tables + seq * a.table_stride;
  for (int64_t p = begin + warp; p < end; p += 4) {
    const int64_t slot =
        static_cast<int64_t>(table[p / a.block_tokens]) * a.block_tokens + p % a.block_tokens;
    float k[E], v[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      k[e] = lane_active ? __bfloat162float(a.k_pool[slot * kv_row + kv_head * D + lane * E + e])
                         : 0.0f;
      v[e] = lane_active ? __bfloat162float(a.v_pool[slot * kv_row + kv_head * D + lane * E + e])
                         : 0.0f;
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= group) break;
      float dot = 0.0f;
#pragma unroll
      for (int e = 0; e < E; ++e) dot += q[g][e] * k[e];
      dot = WarpSum(dot);
      const float m_new = fmaxf(m[g], dot);
      const float alpha = exp2f(m[g] - m_new);
      const float p_val = exp2f(dot - m_new);
      l[g] = l[g] * alpha + p_val;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] = acc[g][e] * alpha + p_val * v[e];
      m[g] = m_new;
    }
  }
  __shared__ float warp_m[4][kMaxGroup], warp_l[4][kMaxGroup];
  __shared__ float warp_o[4][kMaxGroup][D];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g >= group) break;
    if (lane == 0) warp_m[warp][g] = m[g], warp_l[warp][g] = l[g];
    if (lane_active) {
#pragma unroll
      for (int e = 0; e < E; ++e) warp_o[warp][g][lane * E + e] = acc[g][e];
    }
  }
  __syncthreads();
  const int64_t splits = gridDim.x;
  for (int idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
    const int g = idx / D, d = idx % D;
    float m_max = -INFINITY;
    for (int w = 0; w < 4; ++w) m_max = fmaxf(m_max, warp_m[w][g]);
    float l_sum = 0.0f, o_sum = 0.0f;
    for (int w = 0; w < 4; ++w) {
      const float weight = exp2f(warp_m[w][g] - m_max);
      l_sum += warp_l[w][g] * weight;
      o_sum += warp_o[w][g][d] * weight;
    }
    const int64_t head = kv_head * group + g;
    const int64_t part = (seq * a.num_heads + head) * splits + split;
    a.partials[part * D + d] = o_sum;
    if (d == 0) {
      float* ml = a.partials + a.num_seqs * a.num_heads * splits * D;
      ml[2 * part] = m_max;
      ml[2 * part + 1] = l_sum;
    }
  }
}

__global__ void DecodeCombineKernel(DecodeAttentionArgs a, int64_t splits) {
  const int64_t head = blockIdx.x, seq = blockIdx.y;
  const int64_t d = threadIdx.x;
  const int64_t D = a.head_dim;
  const int64_t used = (a.lengths[seq] + kDecodeSplit - 1) / kDecodeSplit;
  const float* ml = a.partials + a.num_seqs * a.num_heads * splits * D;
  const int64_t base = (seq * a.num_heads + head) * splits;
  float m_max = -INFINITY;
  for (int64_t s = 0; s < used; ++s) m_max = fmaxf(m_max, ml[2 * (base + s)]);
  float l_sum = 0.0f, o_sum = 0.0f;
  for (int64_t s = 0; s < used; ++s) {
    const float weight = exp2f(ml[2 * (base + s)] - m_max);
    l_sum += ml[2 * (base + s) + 1] * weight;
    o_sum += a.partials[(base + s) * D + d] * weight;
  }
  a.out[seq * a.num_heads * D + head * D + d] = __float2bfloat16(o_sum / l_sum);
}

template <int D>
absl::Status LaunchDecode(const DecodeAttentionArgs& a, cudaStream_t stream) {
  const int64_t splits = DecodeSplits(a.max_length);
  DecodeSplitKernel<D><<<dim3(splits, a.num_kv_heads, a.num_seqs), 128, 0, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_FAILED();
  DecodeCombineKernel<<<dim3(a.num_heads, a.num_seqs), D, 0, stream>>>(a, splits);
  CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

__global__ void CopyRowsKernel(const bf16* src, const int32_t* src_slots, bf16* dst,
                               const int32_t* dst_slots, int64_t row) {
  const int64_t i = blockIdx.x;
  const int64_t from = src_slots ? src_slots[i] : i;
  const int64_t to = dst_slots ? dst_slots[i] : i;
  const uint4* s = reinterpret_cast<const uint4*>(src + from * row);
  uint4* d = reinterpret_cast<uint4*>(dst + to * row);
  for (int64_t j = threadIdx.x; j < row / 8; j += blockDim.x) d[j] = s[j];
}

__global__ void F32ToBf16Kernel(const float* in, int64_t n, bf16* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16(in[i]);
  }
}

__global__ void Bf16ToF32Kernel(const bf16* in, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __bfloat162float(in[i]);
  }
}

int GridFor(int64_t n) { return static_cast<int>(std::min<int64_t>(Blocks(n, 256), 8192)); }

absl::Status BadHeadDim(int64_t head_dim) {
  return absl::InvalidArgumentError(
      absl::StrCat("head_dim ", head_dim, " unsupported (16, 32, 64 or 128)"));
}

}  // namespace

absl::Status EmbeddingGather(const int32_t* ids, int64_t n, const bf16* table, int64_t hidden,
                             bf16* out, cudaStream_t stream) {
  if (hidden % 8 != 0) return absl::InvalidArgumentError("hidden size must be a multiple of 8");
  EmbeddingGatherKernel<<<n, 256, 0, stream>>>(ids, table, hidden, out);
  CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

absl::Status RmsNorm(const bf16* x, int64_t n, int64_t hidden, const bf16* weight, float eps,
                     bf16* out, cudaStream_t stream) {
  RmsNormKernel<<<n, 256, 0, stream>>>(x, hidden, weight, eps, out);
  CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

absl::Status RopeAndStoreKv(const RopeStoreArgs& args, cudaStream_t stream) {
  RopeAndStoreKvKernel<<<args.n, 256, 0, stream>>>(args);
  CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

absl::Status SwiGlu(const bf16* gate_up, int64_t n, int64_t inter, bf16* out, cudaStream_t stream) {
  SwiGluKernel<<<GridFor(n * inter), 256, 0, stream>>>(gate_up, n, inter, out);
  CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

absl::Status PrefillAttention(const PrefillAttentionArgs& args, cudaStream_t stream) {
  switch (args.head_dim) {
    case 16:
      return LaunchFlashPrefill<16>(args, stream);
    case 32:
      return LaunchFlashPrefill<32>(args, stream);
    case 64:
      return LaunchFlashPrefill<64>(args, stream);
    case 128:
      return LaunchFlashPrefill<128>(args, stream);
    default:
      return BadHeadDim(args.head_dim);
  }
}

size_t DecodeAttentionPartialsBytes(int64_t num_seqs, int64_t num_heads, int64_t head_dim,
                                    int64_t max_length) {
  return static_cast<size_t>(num_seqs * num_heads * DecodeSplits(max_length) * (head_dim + 2)) *
         sizeof(float);
}

absl::Status DecodeAttention(const DecodeAttentionArgs& args, cudaStream_t stream) {
  if (args.num_heads / args.num_kv_heads > kMaxGroup) {
    return absl::InvalidArgumentError("more than 8 query heads per KV head");
  }
  switch (args.head_dim) {
    case 16:
      return LaunchDecode<16>(args, stream);
    case 32:
      return LaunchDecode<32>(args, stream);
    case 64:
      return LaunchDecode<64>(args, stream);
    case 128:
      return LaunchDecode<128>(args, stream);
    default:
      return BadHeadDim(args.head_dim);
  }
}

absl::Status CopyRows(const bf16* src, const int32_t* src_slots, bf16* dst,
                      const int32_t* dst_slots, int64_t n, int64_t row, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  CopyRowsKernel<<<n, 128, 0, stream>>>(src, src_slots, dst, dst_slots, row);
  CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

absl::Status F32ToBf16(const float* in, int64_t n, bf16* out, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  F32ToBf16Kernel<<<GridFor(n), 256, 0, stream>>>(in, n, out);
  CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

absl::Status Bf16ToF32(const bf16* in, int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  Bf16ToF32Kernel<<<GridFor(n), 256, 0, stream>>>(in, n, out);
  CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

}  // namespace sparseaccel
