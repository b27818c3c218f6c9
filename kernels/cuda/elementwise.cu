// Row and elementwise kernels: conversions, embedding gather, residual add + RMSNorm, RoPE,
// SwiGLU. Memory-bound: one block per row where a row needs a reduction, grid-stride loops
// elsewhere; the ones on the prefill path read and write 16 bytes at a time where alignment
// allows (scalar bf16 accesses left them at a third of the bandwidth).

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace sparseaccel {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int GridFor(int64_t count) {
  return static_cast<int>(std::min<int64_t>(CeilDiv(count, kThreads), 65535 * 8));
}

__global__ void Bf16ToF32Kernel(const uint16_t* in, int64_t count, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = Bf16BitsToFloat(in[i]);
  }
}

__global__ void F32ToBf16Kernel(const float* in, int64_t count, uint16_t* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = FloatToBf16Bits(in[i]);
  }
}

__global__ void EmbeddingGatherKernel(const int32_t* ids, const uint16_t* table, int64_t vocab_size,
                                      int64_t hidden, uint16_t* out) {
  const int32_t id = ids[blockIdx.x];
  uint16_t* dst = out + blockIdx.x * hidden;
  const bool valid = id >= 0 && id < vocab_size;
  const uint16_t* src = table + (valid ? id : 0) * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = valid ? src[i] : 0;
}

// Sum over the block; every thread gets the result. `scratch` holds one value per warp.
__device__ float BlockSum(float value, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(~0u, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from a previous call.
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  float total = 0;
  for (int w = 0; w < blockDim.x / 32; ++w) total += scratch[w];
  return total;
}

// kVec consecutive bf16 as floats, in one 16-byte access when kVec is 8 (p then 16-byte
// aligned), element by element when it is 1.
template <int kVec>
__device__ __forceinline__ void LoadBf16(const uint16_t* p, float (&v)[kVec]) {
  static_assert(kVec == 1 || kVec == 8, "one element or 16 bytes");
  if constexpr (kVec == 8) {
    Unpack8(*reinterpret_cast<const uint4*>(p), v);
  } else {
    v[0] = Bf16BitsToFloat(*p);
  }
}
template <int kVec>
__device__ __forceinline__ void StoreBf16(uint16_t* p, const float (&v)[kVec]) {
  if constexpr (kVec == 8) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      words[i] = FloatToBf16Bits(v[2 * i]) | uint32_t{FloatToBf16Bits(v[2 * i + 1])} << 16;
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
  } else {
    *p = FloatToBf16Bits(v[0]);
  }
}

// 8-wide accesses when every pointer is 16-byte aligned and every length and stride a
// multiple of 8 elements; otherwise one element at a time.
bool Vectorizable(std::initializer_list<const void*> pointers,
                  std::initializer_list<int64_t> lengths) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  for (int64_t n : lengths) {
    if (n % 8 != 0) return false;
  }
  return true;
}

// One block per row, kVec elements per access; the second pass re-reads the row from L1.
template <int kVec>
__global__ void AddRmsNormKernel(uint16_t* x, const uint16_t* residual, const uint16_t* weight,
                                 int64_t dim, float eps, uint16_t* out) {
  __shared__ float scratch[32];
  uint16_t* row = x + blockIdx.x * dim;
  const uint16_t* res = residual ? residual + blockIdx.x * dim : nullptr;
  float sum_sq = 0;
  for (int64_t i = threadIdx.x * int64_t{kVec}; i < dim; i += blockDim.x * int64_t{kVec}) {
    float v[kVec];
    LoadBf16(row + i, v);
    if (res) {
      float r[kVec];
      LoadBf16(res + i, r);
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[e] = Bf16BitsToFloat(FloatToBf16Bits(v[e] + r[e]));
      StoreBf16(row + i, v);
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum_sq += v[e] * v[e];
  }
  const float inv_rms = rsqrtf(BlockSum(sum_sq, scratch) / dim + eps);
  uint16_t* dst = out + blockIdx.x * dim;
  // Each thread reads back only the elements it wrote itself: no barrier needed.
  for (int64_t i = threadIdx.x * int64_t{kVec}; i < dim; i += blockDim.x * int64_t{kVec}) {
    float v[kVec], w[kVec];
    LoadBf16(row + i, v);
    LoadBf16(weight + i, w);
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = v[e] * inv_rms * w[e];
    StoreBf16(dst + i, v);
  }
}

// What one RopeKernel launch rotates and where it stores: q in place; k rotated into k_out
// (k itself for ApplyRope); v, when set, copied unrotated beside it. Row r of k goes to row
// out_rows[r] of k_out / v_out (r when out_rows is null).
struct RopeJob {
  uint16_t* q;
  int64_t q_stride;
  int num_heads;
  const uint16_t* k;
  int64_t k_stride;
  int num_kv_heads;
  int head_dim;
  const int32_t* positions;
  const float* inv_freq;
  uint16_t* k_out;
  int64_t out_stride;
  const int32_t* out_rows;
  const uint16_t* v;  // At k_stride, like k; null: no V rows.
  uint16_t* v_out;
};

// One block per row. The row's angles are computed once into shared memory (fp32 angle as the
// CPU twin forms it, trig in double: the same rounding as the twin); then thread t rotates
// pairs i .. i + kVec - 1 (i = kVec (t % (half / kVec))) of heads t / (half / kVec), + step..
template <int kVec>
__global__ void RopeKernel(RopeJob job) {
  extern __shared__ float cos_sin[];  // [half] cosines, then [half] sines.
  const int half = job.head_dim / 2;
  const int64_t r = blockIdx.x;
  const int64_t out_row = job.out_rows ? job.out_rows[r] : r;
  const float position = static_cast<float>(job.positions[r]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const double angle = static_cast<double>(position * job.inv_freq[i]);
    cos_sin[i] = static_cast<float>(cos(angle));
    cos_sin[half + i] = static_cast<float>(sin(angle));
  }
  __syncthreads();
  const int vecs = half / kVec;
  const int total = (job.num_heads + job.num_kv_heads) * vecs;
  for (int t = threadIdx.x; t < total; t += blockDim.x) {
    const int i = (t % vecs) * kVec, head = t / vecs;
    const bool is_q = head < job.num_heads;
    const int64_t k_offset = (head - job.num_heads) * int64_t{job.head_dim};
    const uint16_t* src =
        is_q ? job.q + r * job.q_stride + head * job.head_dim : job.k + r * job.k_stride + k_offset;
    uint16_t* dst = is_q ? job.q + r * job.q_stride + head * job.head_dim
                         : job.k_out + out_row * job.out_stride + k_offset;
    float a[kVec], b[kVec], ra[kVec], rb[kVec];
    LoadBf16(src + i, a);
    LoadBf16(src + i + half, b);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float cos_a = cos_sin[i + e], sin_a = cos_sin[half + i + e];
      ra[e] = a[e] * cos_a - b[e] * sin_a;
      rb[e] = b[e] * cos_a + a[e] * sin_a;
    }
    StoreBf16(dst + i, ra);
    StoreBf16(dst + i + half, rb);
  }
  if (job.v == nullptr) return;
  const int64_t width = job.num_kv_heads * int64_t{job.head_dim};
  for (int64_t i = threadIdx.x * int64_t{kVec}; i < width; i += blockDim.x * int64_t{kVec}) {
    float v[kVec];
    LoadBf16(job.v + r * job.k_stride + i, v);
    StoreBf16(job.v_out + out_row * job.out_stride + i, v);
  }
}

// Rows blockIdx.y, + gridDim.y, ..; kVec elements of a row per thread and step.
template <int kVec>
__global__ void SwiGluKernel(const uint16_t* gate, const uint16_t* up, int64_t rows, int64_t width,
                             int64_t in_stride, uint16_t* out) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    for (int64_t i = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) * kVec; i < width;
         i += int64_t{gridDim.x} * blockDim.x * kVec) {
      float g[kVec], u[kVec];
      LoadBf16(gate + r * in_stride + i, g);
      LoadBf16(up + r * in_stride + i, u);
#pragma unroll
      for (int e = 0; e < kVec; ++e) g[e] = g[e] / (1.0f + expf(-g[e])) * u[e];
      StoreBf16(out + r * width + i, g);
    }
  }
}

absl::Status CheckCount(int64_t count, const char* what) {
  if (count < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": negative count"));
  return absl::OkStatus();
}

absl::Status LaunchRope(const RopeJob& job, int64_t rows, void* stream) {
  if (rows < 0 || job.head_dim <= 0 || job.head_dim % 2 != 0 || job.num_heads < 0 ||
      job.num_kv_heads < 0) {
    return absl::InvalidArgumentError("rotary embedding: bad shape");
  }
  if (rows == 0) return absl::OkStatus();
  const bool vectorized =
      Vectorizable({job.q, job.k, job.k_out, job.v, job.v_out},
                   {job.head_dim / 2, job.q_stride, job.k_stride, job.out_stride});
  const auto kernel = vectorized ? RopeKernel<8> : RopeKernel<1>;
  kernel<<<rows, kThreads, job.head_dim * sizeof(float), AsStream(stream)>>>(job);
  return LaunchStatus("RopeKernel");
}

}  // namespace

absl::Status Bf16ToF32(const uint16_t* in, int64_t count, float* out, void* stream) {
  if (auto s = CheckCount(count, "Bf16ToF32"); !s.ok() || count == 0) return s;
  Bf16ToF32Kernel<<<GridFor(count), kThreads, 0, AsStream(stream)>>>(in, count, out);
  return LaunchStatus("Bf16ToF32Kernel");
}

absl::Status F32ToBf16(const float* in, int64_t count, uint16_t* out, void* stream) {
  if (auto s = CheckCount(count, "F32ToBf16"); !s.ok() || count == 0) return s;
  F32ToBf16Kernel<<<GridFor(count), kThreads, 0, AsStream(stream)>>>(in, count, out);
  return LaunchStatus("F32ToBf16Kernel");
}

absl::Status EmbeddingGather(const int32_t* ids, int64_t rows, const uint16_t* table,
                             int64_t vocab_size, int64_t hidden, uint16_t* out, void* stream) {
  if (rows < 0 || hidden <= 0 || vocab_size <= 0) {
    return absl::InvalidArgumentError("EmbeddingGather: bad shape");
  }
  if (rows == 0) return absl::OkStatus();
  EmbeddingGatherKernel<<<rows, kThreads, 0, AsStream(stream)>>>(ids, table, vocab_size, hidden,
                                                                 out);
  return LaunchStatus("EmbeddingGatherKernel");
}

absl::Status AddRmsNorm(uint16_t* x, const uint16_t* residual, const uint16_t* weight, int64_t rows,
                        int64_t dim, float eps, uint16_t* out, void* stream) {
  if (rows < 0 || dim <= 0) return absl::InvalidArgumentError("AddRmsNorm: bad shape");
  if (rows == 0) return absl::OkStatus();
  const auto kernel =
      Vectorizable({x, residual, weight, out}, {dim}) ? AddRmsNormKernel<8> : AddRmsNormKernel<1>;
  kernel<<<rows, 256, 0, AsStream(stream)>>>(x, residual, weight, dim, eps, out);
  return LaunchStatus("AddRmsNormKernel");
}

absl::Status ApplyRope(uint16_t* q, int64_t q_stride, int64_t num_heads, uint16_t* k,
                       int64_t k_stride, int64_t num_kv_heads, int64_t rows, int64_t head_dim,
                       const int32_t* positions, const float* inv_freq, void* stream) {
  if (k == nullptr) num_kv_heads = 0;
  const RopeJob job{q,
                    q_stride,
                    static_cast<int>(num_heads),
                    k,
                    k_stride,
                    static_cast<int>(num_kv_heads),
                    static_cast<int>(head_dim),
                    positions,
                    inv_freq,
                    k,
                    k_stride,
                    nullptr,
                    nullptr,
                    nullptr};
  return LaunchRope(job, rows, stream);
}

absl::Status RopeAndStoreKv(uint16_t* qkv, int64_t qkv_stride, int64_t num_heads,
                            int64_t num_kv_heads, int64_t rows, int64_t head_dim,
                            const int32_t* positions, const float* inv_freq, const int32_t* slots,
                            uint16_t* k_pool, uint16_t* v_pool, void* stream) {
  const int64_t q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
  const RopeJob job{qkv,
                    qkv_stride,
                    static_cast<int>(num_heads),
                    qkv + q_width,
                    qkv_stride,
                    static_cast<int>(num_kv_heads),
                    static_cast<int>(head_dim),
                    positions,
                    inv_freq,
                    k_pool,
                    kv_width,
                    slots,
                    qkv + q_width + kv_width,
                    v_pool};
  return LaunchRope(job, rows, stream);
}

absl::Status SwiGlu(const uint16_t* gate, const uint16_t* up, int64_t rows, int64_t width,
                    int64_t in_stride, uint16_t* out, void* stream) {
  if (rows < 0 || width <= 0 || in_stride < width) {
    return absl::InvalidArgumentError("SwiGlu: bad shape");
  }
  if (rows == 0) return absl::OkStatus();
  const bool vectorized = Vectorizable({gate, up, out}, {width, in_stride});
  const auto kernel = vectorized ? SwiGluKernel<8> : SwiGluKernel<1>;
  const int64_t threads_per_row = CeilDiv(width, vectorized ? 8 : 1);
  const dim3 grid(
      static_cast<unsigned>(std::min<int64_t>(CeilDiv(threads_per_row, kThreads), 1024)),
      static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  kernel<<<grid, kThreads, 0, AsStream(stream)>>>(gate, up, rows, width, in_stride, out);
  return LaunchStatus("SwiGluKernel");
}

}  // namespace cuda
}  // namespace sparseaccel
