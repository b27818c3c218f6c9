// Row and elementwise kernels: conversions, embedding gather, residual add + RMSNorm, RoPE,
// SwiGLU. Memory-bound: one block per row where a row needs a reduction, grid-stride loops
// elsewhere.

#include <algorithm>

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

__global__ void AddRmsNormKernel(uint16_t* x, const uint16_t* residual, const uint16_t* weight,
                                 int64_t dim, float eps, uint16_t* out) {
  __shared__ float scratch[32];
  uint16_t* row = x + blockIdx.x * dim;
  const uint16_t* res = residual ? residual + blockIdx.x * dim : nullptr;
  float sum_sq = 0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = Bf16BitsToFloat(row[i]);
    if (res) {
      v = Bf16BitsToFloat(FloatToBf16Bits(v + Bf16BitsToFloat(res[i])));
      row[i] = FloatToBf16Bits(v);
    }
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(BlockSum(sum_sq, scratch) / dim + eps);
  uint16_t* dst = out + blockIdx.x * dim;
  // Each thread reads back only the elements it wrote itself: no barrier needed.
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    dst[i] = FloatToBf16Bits(Bf16BitsToFloat(row[i]) * inv_rms * Bf16BitsToFloat(weight[i]));
  }
}

// One block per row; thread t handles pair index t % half of heads t / half, t / half + step..
__global__ void RopeKernel(uint16_t* q, int64_t q_stride, int num_heads, uint16_t* k,
                           int64_t k_stride, int num_kv_heads, int head_dim,
                           const int32_t* positions, const float* inv_freq) {
  const int half = head_dim / 2;
  const int64_t r = blockIdx.x;
  const float position = static_cast<float>(positions[r]);
  const int total = (num_heads + num_kv_heads) * half;
  for (int t = threadIdx.x; t < total; t += blockDim.x) {
    const int i = t % half, head = t / half;
    // fp32 angle as the CPU twin forms it, trig in double (the same rounding as the twin).
    const float angle = position * inv_freq[i];
    const float cos_a = static_cast<float>(cos(static_cast<double>(angle)));
    const float sin_a = static_cast<float>(sin(static_cast<double>(angle)));
    uint16_t* h = head < num_heads ? q + r * q_stride + head * head_dim
                                   : k + r * k_stride + (head - num_heads) * head_dim;
    const float a = Bf16BitsToFloat(h[i]), b = Bf16BitsToFloat(h[i + half]);
    h[i] = FloatToBf16Bits(a * cos_a - b * sin_a);
    h[i + half] = FloatToBf16Bits(b * cos_a + a * sin_a);
  }
}

__global__ void SwiGluKernel(const uint16_t* gate, const uint16_t* up, int64_t rows, int64_t width,
                             int64_t in_stride, uint16_t* out) {
  const int64_t count = rows * width;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = e / width, i = e % width;
    const float g = Bf16BitsToFloat(gate[r * in_stride + i]);
    const float u = Bf16BitsToFloat(up[r * in_stride + i]);
    out[e] = FloatToBf16Bits(g / (1.0f + expf(-g)) * u);
  }
}

absl::Status CheckCount(int64_t count, const char* what) {
  if (count < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": negative count"));
  return absl::OkStatus();
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
  AddRmsNormKernel<<<rows, 1024, 0, AsStream(stream)>>>(x, residual, weight, dim, eps, out);
  return LaunchStatus("AddRmsNormKernel");
}

absl::Status ApplyRope(uint16_t* q, int64_t q_stride, int64_t num_heads, uint16_t* k,
                       int64_t k_stride, int64_t num_kv_heads, int64_t rows, int64_t head_dim,
                       const int32_t* positions, const float* inv_freq, void* stream) {
  if (rows < 0 || head_dim <= 0 || head_dim % 2 != 0 || num_heads < 0 || num_kv_heads < 0) {
    return absl::InvalidArgumentError("ApplyRope: bad shape");
  }
  if (k == nullptr) num_kv_heads = 0;
  if (rows == 0) return absl::OkStatus();
  RopeKernel<<<rows, kThreads, 0, AsStream(stream)>>>(
      q, q_stride, static_cast<int>(num_heads), k, k_stride, static_cast<int>(num_kv_heads),
      static_cast<int>(head_dim), positions, inv_freq);
  return LaunchStatus("RopeKernel");
}

absl::Status SwiGlu(const uint16_t* gate, const uint16_t* up, int64_t rows, int64_t width,
                    int64_t in_stride, uint16_t* out, void* stream) {
  if (rows < 0 || width <= 0 || in_stride < width) {
    return absl::InvalidArgumentError("SwiGlu: bad shape");
  }
  if (rows == 0) return absl::OkStatus();
  SwiGluKernel<<<GridFor(rows * width), kThreads, 0, AsStream(stream)>>>(gate, up, rows, width,
                                                                         in_stride, out);
  return LaunchStatus("SwiGluKernel");
}

}  // namespace cuda
}  // namespace sparseaccel
