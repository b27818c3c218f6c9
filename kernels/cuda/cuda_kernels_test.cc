// Each CUDA kernel against its CPU twin in kernels/ on fresh random inputs (a new seed per
// run, printed on failure). Inputs are rounded to bf16 first and the twin runs in fp32/double
// on exactly those values, so the bounds below only cover the kernels' own rounding. Outputs
// are poisoned with NaN before every call and every element is checked.

#include "kernels/cuda/cuda_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/activation.h"
#include "kernels/attention.h"
#include "kernels/cuda/cuda_test_util.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/sampling.h"

namespace sparseaccel {
namespace cuda {
namespace {

class CudaKernelsTest : public CudaTest {};

TEST_F(CudaKernelsTest, ConversionsRoundTripExactly) {
  const size_t count = 100003;
  std::vector<float> values(count);
  std::normal_distribution<float> dist(0.f, 10.f);
  for (float& x : values) x = dist(rng_);
  ASSERT_OK_AND_ASSIGN(d_f32, ToDevice(values));
  ASSERT_OK_AND_ASSIGN(d_bf16, DeviceBuffer::Allocate(count * 2));
  ASSERT_OK_AND_ASSIGN(d_back, DeviceBuffer::Allocate(count * 4));
  ASSERT_OK(d_bf16.Fill(kNanBytes));
  ASSERT_OK(d_back.Fill(kNanBytes));
  ASSERT_OK(F32ToBf16(d_f32.As<float>(), count, d_bf16.As<uint16_t>(), nullptr));
  ASSERT_OK(Bf16ToF32(d_bf16.As<uint16_t>(), count, d_back.As<float>(), nullptr));
  ASSERT_OK_AND_ASSIGN(bf16, ToHost<uint16_t>(d_bf16, count));
  ASSERT_OK_AND_ASSIGN(back, ToHost<float>(d_back, count));
  for (size_t i = 0; i < count; ++i) {
    ASSERT_EQ(bf16[i], ToBf16(values[i])) << i;
    ASSERT_EQ(back[i], FromBf16(bf16[i])) << i;
  }
}

TEST_F(CudaKernelsTest, EmbeddingGatherCopiesRowsAndZeroesBadIds) {
  const int64_t vocab = 1000, hidden = 300;
  const std::vector<uint16_t> table = RandomBf16(vocab * hidden);
  std::vector<int32_t> ids = {0, 999, 5, 5, -1, 1000, 123};
  std::uniform_int_distribution<int32_t> pick(0, vocab - 1);
  for (int i = 0; i < 20; ++i) ids.push_back(pick(rng_));
  const int64_t rows = ids.size();
  ASSERT_OK_AND_ASSIGN(d_table, ToDevice(table));
  ASSERT_OK_AND_ASSIGN(d_ids, ToDevice(ids));
  ASSERT_OK_AND_ASSIGN(d_out, DeviceBuffer::Allocate(rows * hidden * 2));
  ASSERT_OK(d_out.Fill(kNanBytes));
  ASSERT_OK(EmbeddingGather(d_ids.As<int32_t>(), rows, d_table.As<uint16_t>(), vocab, hidden,
                            d_out.As<uint16_t>(), nullptr));
  ASSERT_OK_AND_ASSIGN(out, ToHost<uint16_t>(d_out, rows * hidden));
  for (int64_t r = 0; r < rows; ++r) {
    const bool valid = ids[r] >= 0 && ids[r] < vocab;
    for (int64_t i = 0; i < hidden; ++i) {
      ASSERT_EQ(out[r * hidden + i], valid ? table[ids[r] * hidden + i] : 0) << r << " " << i;
    }
  }
}

// Output in bf16: each element carries up to 2^-9 relative rounding, plus fp32 vs double
// accumulation of the mean square: 1e-2 of the largest magnitude covers both with margin.
TEST_F(CudaKernelsTest, AddRmsNormMatchesCpu) {
  struct Case {
    int64_t rows, dim;
    bool residual;
  };
  for (const Case& c : {Case{7, 4096, true}, Case{3, 100, false}, Case{33, 2048, true}}) {
    const std::vector<uint16_t> x = RandomBf16(c.rows * c.dim, 2.f);
    const std::vector<uint16_t> residual = RandomBf16(c.rows * c.dim, 2.f);
    std::vector<uint16_t> weight = RandomBf16(c.dim, 0.5f);
    ASSERT_OK_AND_ASSIGN(d_x, ToDevice(x));
    ASSERT_OK_AND_ASSIGN(d_res, ToDevice(residual));
    ASSERT_OK_AND_ASSIGN(d_w, ToDevice(weight));
    ASSERT_OK_AND_ASSIGN(d_out, DeviceBuffer::Allocate(c.rows * c.dim * 2));
    ASSERT_OK(d_out.Fill(kNanBytes));
    const float eps = 1e-5f;
    ASSERT_OK(AddRmsNorm(d_x.As<uint16_t>(), c.residual ? d_res.As<uint16_t>() : nullptr,
                         d_w.As<uint16_t>(), c.rows, c.dim, eps, d_out.As<uint16_t>(), nullptr));
    // The updated x is exactly bf16(x + residual): the sum of two bf16 is exact in fp32.
    std::vector<float> sum(c.rows * c.dim);
    for (size_t i = 0; i < sum.size(); ++i) {
      sum[i] =
          c.residual ? FromBf16(ToBf16(FromBf16(x[i]) + FromBf16(residual[i]))) : FromBf16(x[i]);
    }
    ASSERT_OK_AND_ASSIGN(new_x, ToHost<uint16_t>(d_x, sum.size()));
    ASSERT_EQ(FromBf16(new_x), sum);
    std::vector<float> expected(sum.size());
    const std::vector<float> w = FromBf16(weight);
    RmsNormCpu(sum.data(), w.data(), c.rows, c.dim, eps, expected.data());
    ASSERT_OK_AND_ASSIGN(out, ToHost<uint16_t>(d_out, sum.size()));
    ExpectClose(FromBf16(out), expected, 1e-2, "rmsnorm dim " + std::to_string(c.dim));
  }
}

// Same angles as the CPU (same inv_freq, fp32 position * inv_freq, double trig); the only
// difference is the bf16 rounding of the result: 1e-2 of the largest magnitude.
TEST_F(CudaKernelsTest, RopeMatchesCpuWithLlama3Scaling) {
  Llama3RopeScaling scaling;
  scaling.enabled = true;
  struct Case {
    int64_t rows, heads, kv_heads, dim;
  };
  // head_dim 12: pairs not a multiple of 8, the element-by-element path.
  for (const Case& c :
       {Case{37, 32, 8, 128}, Case{5, 4, 4, 64}, Case{9, 8, 1, 128}, Case{6, 3, 1, 12}}) {
    const std::vector<float> inv_freq = RopeInverseFrequencies(c.dim, 500000.0, scaling);
    const int64_t stride = (c.heads + 2 * c.kv_heads) * c.dim;  // A fused [q | k | v] row.
    const std::vector<uint16_t> qkv = RandomBf16(c.rows * stride);
    std::vector<int64_t> positions(c.rows);
    std::uniform_int_distribution<int64_t> pos(0, 131071);
    for (int64_t& p : positions) p = pos(rng_);
    std::vector<int32_t> positions32(positions.begin(), positions.end());
    ASSERT_OK_AND_ASSIGN(d_qkv, ToDevice(qkv));
    ASSERT_OK_AND_ASSIGN(d_pos, ToDevice(positions32));
    ASSERT_OK_AND_ASSIGN(d_freq, ToDevice(inv_freq));
    uint16_t* q = d_qkv.As<uint16_t>();
    ASSERT_OK(ApplyRope(q, stride, c.heads, q + c.heads * c.dim, stride, c.kv_heads, c.rows, c.dim,
                        d_pos.As<int32_t>(), d_freq.As<float>(), nullptr));
    ASSERT_OK_AND_ASSIGN(out, ToHost<uint16_t>(d_qkv, qkv.size()));
    // CPU: rotate q and k separately (dense rows), v untouched.
    std::vector<float> q_cpu(c.rows * c.heads * c.dim), k_cpu(c.rows * c.kv_heads * c.dim);
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t i = 0; i < c.heads * c.dim; ++i) {
        q_cpu[r * c.heads * c.dim + i] = FromBf16(qkv[r * stride + i]);
      }
      for (int64_t i = 0; i < c.kv_heads * c.dim; ++i) {
        k_cpu[r * c.kv_heads * c.dim + i] = FromBf16(qkv[r * stride + c.heads * c.dim + i]);
      }
    }
    ApplyRopeCpu(q_cpu.data(), c.rows, c.heads, c.dim, positions.data(), inv_freq.data());
    ApplyRopeCpu(k_cpu.data(), c.rows, c.kv_heads, c.dim, positions.data(), inv_freq.data());
    std::vector<float> q_gpu, k_gpu;
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t i = 0; i < c.heads * c.dim; ++i) q_gpu.push_back(FromBf16(out[r * stride + i]));
      for (int64_t i = 0; i < c.kv_heads * c.dim; ++i) {
        k_gpu.push_back(FromBf16(out[r * stride + c.heads * c.dim + i]));
      }
      for (int64_t i = (c.heads + c.kv_heads) * c.dim; i < stride; ++i) {
        ASSERT_EQ(out[r * stride + i], qkv[r * stride + i]) << "v changed";
      }
    }
    ExpectClose(q_gpu, q_cpu, 1e-2, "rope q");
    ExpectClose(k_gpu, k_cpu, 1e-2, "rope k");
  }
}

// bf16 output of an fp32 computation (expf vs std::exp differ by ulps): 1e-2.
TEST_F(CudaKernelsTest, SwiGluMatchesCpuOnFusedRows) {
  // Width 999: not a multiple of 8, the element-by-element path.
  for (const int64_t width : {int64_t{1000}, int64_t{999}}) {
    const int64_t rows = 13, stride = 2 * width;
    const std::vector<uint16_t> gate_up = RandomBf16(rows * stride, 3.f);
    ASSERT_OK_AND_ASSIGN(d_in, ToDevice(gate_up));
    ASSERT_OK_AND_ASSIGN(d_out, DeviceBuffer::Allocate(rows * width * 2));
    ASSERT_OK(d_out.Fill(kNanBytes));
    const uint16_t* in = d_in.As<uint16_t>();
    ASSERT_OK(SwiGlu(in, in + width, rows, width, stride, d_out.As<uint16_t>(), nullptr));
    std::vector<float> gate(rows * width), up(rows * width), expected(rows * width);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < width; ++i) {
        gate[r * width + i] = FromBf16(gate_up[r * stride + i]);
        up[r * width + i] = FromBf16(gate_up[r * stride + width + i]);
      }
    }
    SwiGluCpu(gate.data(), up.data(), rows * width, expected.data());
    ASSERT_OK_AND_ASSIGN(out, ToHost<uint16_t>(d_out, rows * width));
    ExpectClose(FromBf16(out), expected, 1e-2, "swiglu width " + std::to_string(width));
  }
}

// The RoPE of ApplyRope and a store of K (rotated) and V at each row's pool slot, from fused
// [q | k | v] rows: checked against ApplyRope on a copy, which the test above checks on CPU.
TEST_F(CudaKernelsTest, RopeAndStoreKvRotatesLikeApplyRopeAndStoresAtSlots) {
  for (const int64_t dim : {int64_t{128}, int64_t{12}}) {
    const std::vector<float> inv_freq = RopeInverseFrequencies(dim, 500000.0, Llama3RopeScaling{});
    const int64_t rows = 5, heads = 8, kv_heads = 2, pool_rows = 11;
    const int64_t stride = (heads + 2 * kv_heads) * dim, kv_width = kv_heads * dim;
    const std::vector<uint16_t> qkv = RandomBf16(rows * stride);
    const std::vector<int32_t> positions = {0, 17, 4095, 131071, 9};
    const std::vector<int32_t> slots = {10, 3, 0, 7, 4};
    ASSERT_OK_AND_ASSIGN(d_fused, ToDevice(qkv));
    ASSERT_OK_AND_ASSIGN(d_separate, ToDevice(qkv));
    ASSERT_OK_AND_ASSIGN(d_pos, ToDevice(positions));
    ASSERT_OK_AND_ASSIGN(d_slots, ToDevice(slots));
    ASSERT_OK_AND_ASSIGN(d_freq, ToDevice(inv_freq));
    ASSERT_OK_AND_ASSIGN(d_k, DeviceBuffer::Allocate(pool_rows * kv_width * 2));
    ASSERT_OK_AND_ASSIGN(d_v, DeviceBuffer::Allocate(pool_rows * kv_width * 2));
    ASSERT_OK(d_k.Fill(kNanBytes));
    ASSERT_OK(d_v.Fill(kNanBytes));
    ASSERT_OK(RopeAndStoreKv(d_fused.As<uint16_t>(), stride, heads, kv_heads, rows, dim,
                             d_pos.As<int32_t>(), d_freq.As<float>(), d_slots.As<int32_t>(),
                             d_k.As<uint16_t>(), d_v.As<uint16_t>(), nullptr));
    uint16_t* separate = d_separate.As<uint16_t>();
    ASSERT_OK(ApplyRope(separate, stride, heads, separate + heads * dim, stride, kv_heads, rows,
                        dim, d_pos.As<int32_t>(), d_freq.As<float>(), nullptr));
    ASSERT_OK_AND_ASSIGN(fused, ToHost<uint16_t>(d_fused, qkv.size()));
    ASSERT_OK_AND_ASSIGN(rotated, ToHost<uint16_t>(d_separate, qkv.size()));
    ASSERT_OK_AND_ASSIGN(k_pool, ToHost<uint16_t>(d_k, pool_rows * kv_width));
    ASSERT_OK_AND_ASSIGN(v_pool, ToHost<uint16_t>(d_v, pool_rows * kv_width));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t q_end = r * stride + heads * dim;
      for (int64_t i = r * stride; i < q_end; ++i) ASSERT_EQ(fused[i], rotated[i]) << "q " << i;
      for (int64_t i = q_end; i < (r + 1) * stride; ++i) {
        ASSERT_EQ(fused[i], qkv[i]) << "K/V rows of qkv changed at " << i;
      }
      for (int64_t i = 0; i < kv_width; ++i) {
        ASSERT_EQ(k_pool[slots[r] * kv_width + i], rotated[q_end + i]) << "k row " << r;
        ASSERT_EQ(v_pool[slots[r] * kv_width + i], qkv[q_end + kv_width + i]) << "v row " << r;
      }
    }
  }
}

// SmallBatchLinear against fp64 sums of the same bf16 operands, for every epilogue, row
// count, a partial last block and a partial last step of loads; and each row bit for bit what
// the same row gives alone (batch invariance). Bounds: fp32 sums 1e-4; one bf16 rounding 1e-2;
// SwiGLU rounds gate and up before silu: 2e-2.
TEST_F(CudaKernelsTest, SmallBatchLinearMatchesFp64ForEveryEpilogue) {
  struct Case {
    int64_t m, n, k;
  };
  for (const Case& c :
       {Case{1, 1001, 4096}, Case{2, 64, 2048}, Case{3, 100, 264}, Case{8, 258, 1032}}) {
    const std::vector<uint16_t> x = RandomBf16(c.m * c.k), w = RandomBf16(c.n * c.k, 0.05f);
    const std::vector<uint16_t> base = RandomBf16(c.m * c.n);
    std::vector<double> sums(c.m * c.n);
    for (int64_t r = 0; r < c.m; ++r) {
      for (int64_t j = 0; j < c.n; ++j) {
        double s = 0;
        for (int64_t i = 0; i < c.k; ++i)
          s += double(FromBf16(x[r * c.k + i])) * FromBf16(w[j * c.k + i]);
        sums[r * c.n + j] = s;
      }
    }
    ASSERT_OK_AND_ASSIGN(d_x, ToDevice(x));
    ASSERT_OK_AND_ASSIGN(d_w, ToDevice(w));
    ASSERT_OK_AND_ASSIGN(d_out, DeviceBuffer::Allocate(c.m * c.n * sizeof(float)));
    const std::string shape = absl::StrCat(" m ", c.m, " n ", c.n, " k ", c.k);
    auto run = [&](LinearEpilogue epilogue, int64_t m, int64_t row0) -> absl::Status {
      SmallBatchLinearArgs a;
      a.x = d_x.As<uint16_t>() + row0 * c.k;
      a.w = d_w.As<uint16_t>();
      a.out = d_out.As<void>();
      a.m = m;
      a.n = c.n;
      a.k = c.k;
      a.epilogue = epilogue;
      return SmallBatchLinear(a, nullptr);
    };
    ASSERT_OK(d_out.Fill(kNanBytes));
    ASSERT_OK(run(LinearEpilogue::kStoreF32, c.m, 0));
    ASSERT_OK_AND_ASSIGN(f32, ToHost<float>(d_out, c.m * c.n));
    ExpectClose(f32, std::vector<float>(sums.begin(), sums.end()), 1e-4, "f32" + shape);
    for (int64_t r = 0; r < c.m; ++r) {
      ASSERT_OK(run(LinearEpilogue::kStoreF32, 1, r));
      ASSERT_OK_AND_ASSIGN(alone, ToHost<float>(d_out, c.n));
      for (int64_t j = 0; j < c.n; ++j)
        ASSERT_EQ(alone[j], f32[r * c.n + j]) << "row " << r << shape;
    }
    ASSERT_OK(d_out.Fill(kNanBytes));
    ASSERT_OK(run(LinearEpilogue::kStoreBf16, c.m, 0));
    ASSERT_OK_AND_ASSIGN(bf16, ToHost<uint16_t>(d_out, c.m * c.n));
    ExpectClose(FromBf16(bf16), std::vector<float>(sums.begin(), sums.end()), 1e-2, "bf16" + shape);
    ASSERT_OK(d_out.CopyFrom(base.data(), base.size() * 2));
    ASSERT_OK(run(LinearEpilogue::kAccumulateBf16, c.m, 0));
    ASSERT_OK_AND_ASSIGN(accumulated, ToHost<uint16_t>(d_out, c.m * c.n));
    std::vector<float> expected(c.m * c.n);
    for (size_t i = 0; i < expected.size(); ++i) expected[i] = FromBf16(base[i]) + sums[i];
    ExpectClose(FromBf16(accumulated), expected, 1e-2, "accumulate" + shape);
    const int64_t half = c.n / 2;
    if (c.n % 2 != 0) {
      EXPECT_EQ(run(LinearEpilogue::kSwiGluBf16, c.m, 0).code(),
                absl::StatusCode::kInvalidArgument);
      continue;
    }
    ASSERT_OK(d_out.Fill(kNanBytes));
    ASSERT_OK(run(LinearEpilogue::kSwiGluBf16, c.m, 0));
    ASSERT_OK_AND_ASSIGN(act, ToHost<uint16_t>(d_out, c.m * half));
    std::vector<float> gate(c.m * half), up(c.m * half), silu(c.m * half);
    for (int64_t r = 0; r < c.m; ++r) {
      for (int64_t j = 0; j < half; ++j) {
        gate[r * half + j] = sums[r * c.n + j];
        up[r * half + j] = sums[r * c.n + half + j];
      }
    }
    SwiGluCpu(gate.data(), up.data(), c.m * half, silu.data());
    ExpectClose(FromBf16(act), silu, 2e-2, "swiglu" + shape);
  }
  SmallBatchLinearArgs too_many;
  too_many.m = kSmallBatchLinearRows + 1;
  too_many.n = too_many.k = 8;
  EXPECT_EQ(SmallBatchLinear(too_many, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

// Attention bounds: the kernel rounds the softmax weights P to bf16 before P V (relative
// error up to 2^-9 per weight, partly averaging out over keys) and writes bf16 (2^-9); the
// scores are exact fp32 sums of bf16 products. 2e-2 of the largest output magnitude leaves
// margin over the ~4e-3 these add up to, and still catches any wrong mask, scale or head.
constexpr double kAttentionBound = 2e-2;

TEST_F(CudaKernelsTest, PrefillAttentionMatchesCpu) {
  struct Case {
    int64_t n, n_kv, heads, kv_heads, dim;
    bool fused_q;  // q rows inside a fused [q | k | v] projection (q_stride > row).
  };
  const Case cases[] = {
      {200, 200, 4, 4, 64, false},  {130, 300, 8, 2, 128, true}, {257, 257, 16, 2, 128, false},
      {64, 1000, 8, 1, 64, false},  {1, 77, 4, 1, 128, false},   {700, 700, 32, 8, 128, true},
      {129, 129, 2, 2, 128, false},
  };
  for (const Case& c : cases) {
    for (const AttentionInnerLoop loop :
         {AttentionInnerLoop::kMmaSync, AttentionInnerLoop::kWgmma}) {
      const std::string what = std::string(InnerLoopName(loop)) + " n=" + std::to_string(c.n) +
                               " n_kv=" + std::to_string(c.n_kv) +
                               " heads=" + std::to_string(c.heads) + "/" +
                               std::to_string(c.kv_heads) + " dim=" + std::to_string(c.dim);
      const int64_t q_row = c.heads * c.dim, kv_row = c.kv_heads * c.dim;
      const int64_t q_stride = c.fused_q ? q_row + 2 * kv_row : q_row;
      const std::vector<uint16_t> q = RandomBf16(c.n * q_stride, 1.5f);
      const std::vector<uint16_t> k = RandomBf16(c.n_kv * kv_row, 1.5f);
      const std::vector<uint16_t> v = RandomBf16(c.n_kv * kv_row);
      ASSERT_OK_AND_ASSIGN(d_q, ToDevice(q));
      ASSERT_OK_AND_ASSIGN(d_k, ToDevice(k));
      ASSERT_OK_AND_ASSIGN(d_v, ToDevice(v));
      ASSERT_OK_AND_ASSIGN(d_out, DeviceBuffer::Allocate(c.n * q_row * 2));
      ASSERT_OK(d_out.Fill(kNanBytes));
      AttentionOperands x;
      x.q = d_q.As<uint16_t>();
      x.q_stride = q_stride;
      x.k = d_k.As<uint16_t>();
      x.v = d_v.As<uint16_t>();
      x.kv_stride = kv_row;
      x.out = d_out.As<uint16_t>();
      x.out_stride = q_row;
      x.num_heads = c.heads;
      x.num_kv_heads = c.kv_heads;
      x.head_dim = c.dim;
      x.inner_loop = loop;
      const absl::Status launched = PrefillAttention(PrefillAttentionArgs{x, c.n, c.n_kv}, nullptr);
      if (WgmmaUnavailable(loop, launched)) continue;
      ASSERT_OK(launched);
      ASSERT_OK(DeviceSynchronize());
      ASSERT_OK_AND_ASSIGN(out, ToHost<uint16_t>(d_out, c.n * q_row));

      std::vector<float> q_dense(c.n * q_row);
      for (int64_t r = 0; r < c.n; ++r) {
        for (int64_t i = 0; i < q_row; ++i) q_dense[r * q_row + i] = FromBf16(q[r * q_stride + i]);
      }
      std::vector<float> k_f = FromBf16(k), v_f = FromBf16(v), expected(c.n * q_row);
      KvLayerView view;
      view.block_tokens = c.n_kv;
      view.row_size = kv_row;
      view.k_blocks = {k_f.data()};
      view.v_blocks = {v_f.data()};
      CausalAttentionCpu(q_dense.data(), c.n, c.n_kv - c.n, {c.heads, c.kv_heads, c.dim}, view,
                         expected.data());
      ExpectClose(FromBf16(out), expected, kAttentionBound, what);
    }
  }
}

TEST_F(CudaKernelsTest, PagedDecodeAttentionMatchesCpu) {
  struct Case {
    int64_t heads, kv_heads, dim, block_tokens;
    std::vector<int64_t> lengths;
  };
  const Case cases[] = {
      {8, 8, 64, 16, {1, 17, 300}}, {32, 8, 128, 16, {1000, 4097, 33, 5}},
      {16, 2, 128, 32, {20000}},    {8, 1, 64, 7, {129, 64, 2000}},
      {24, 8, 128, 16, {513, 1}},  // 3 query heads per KV head.
  };
  for (const Case& c : cases) {
    const int64_t num_seqs = c.lengths.size();
    const int64_t max_len = *std::max_element(c.lengths.begin(), c.lengths.end());
    const int64_t max_blocks = (max_len + c.block_tokens - 1) / c.block_tokens;
    const int64_t kv_row = c.kv_heads * c.dim, q_row = c.heads * c.dim;
    // Blocks of all sequences scattered over a pool with spare blocks, in random order.
    int64_t used_blocks = 0;
    for (int64_t len : c.lengths) used_blocks += (len + c.block_tokens - 1) / c.block_tokens;
    const int64_t pool_blocks = used_blocks + 3;
    std::vector<int32_t> block_order(pool_blocks);
    std::iota(block_order.begin(), block_order.end(), 0);
    std::shuffle(block_order.begin(), block_order.end(), rng_);
    std::vector<int32_t> tables(num_seqs * max_blocks, -1);
    int64_t next = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
      for (int64_t b = 0; b * c.block_tokens < c.lengths[s]; ++b) {
        tables[s * max_blocks + b] = block_order[next++];
      }
    }
    const std::vector<uint16_t> k_pool = RandomBf16(pool_blocks * c.block_tokens * kv_row, 1.5f);
    const std::vector<uint16_t> v_pool = RandomBf16(pool_blocks * c.block_tokens * kv_row);
    const std::vector<uint16_t> q = RandomBf16(num_seqs * q_row, 1.5f);
    std::vector<int32_t> lengths32(c.lengths.begin(), c.lengths.end());
    ASSERT_OK_AND_ASSIGN(d_q, ToDevice(q));
    ASSERT_OK_AND_ASSIGN(d_k, ToDevice(k_pool));
    ASSERT_OK_AND_ASSIGN(d_v, ToDevice(v_pool));
    ASSERT_OK_AND_ASSIGN(d_tables, ToDevice(tables));
    ASSERT_OK_AND_ASSIGN(d_lens, ToDevice(lengths32));
    ASSERT_OK_AND_ASSIGN(d_out, DeviceBuffer::Allocate(num_seqs * q_row * 2));
    ASSERT_OK(d_out.Fill(kNanBytes));
    PagedDecodeArgs args;
    args.q = d_q.As<uint16_t>();
    args.q_stride = q_row;
    args.k_pool = d_k.As<uint16_t>();
    args.v_pool = d_v.As<uint16_t>();
    args.block_tables = d_tables.As<int32_t>();
    args.max_blocks_per_seq = max_blocks;
    args.seq_lens = d_lens.As<int32_t>();
    args.num_seqs = num_seqs;
    args.max_seq_len = max_len;
    args.block_tokens = c.block_tokens;
    args.num_heads = c.heads;
    args.num_kv_heads = c.kv_heads;
    args.head_dim = c.dim;
    args.out = d_out.As<uint16_t>();
    args.out_stride = q_row;
    ASSERT_OK_AND_ASSIGN(d_work, DeviceBuffer::Allocate(PagedDecodeWorkspaceBytes(args)));
    ASSERT_OK(d_work.Fill(kNanBytes));
    args.workspace = d_work.As<void>();
    ASSERT_OK(PagedDecodeAttention(args, nullptr));
    ASSERT_OK(DeviceSynchronize());
    ASSERT_OK_AND_ASSIGN(out, ToHost<uint16_t>(d_out, num_seqs * q_row));

    std::vector<float> k_f = FromBf16(k_pool), v_f = FromBf16(v_pool), q_f = FromBf16(q);
    for (int64_t s = 0; s < num_seqs; ++s) {
      KvLayerView view;
      view.block_tokens = c.block_tokens;
      view.row_size = kv_row;
      for (int64_t b = 0; b * c.block_tokens < c.lengths[s]; ++b) {
        const int64_t block = tables[s * max_blocks + b];
        view.k_blocks.push_back(k_f.data() + block * c.block_tokens * kv_row);
        view.v_blocks.push_back(v_f.data() + block * c.block_tokens * kv_row);
      }
      std::vector<float> expected(q_row);
      CausalAttentionCpu(q_f.data() + s * q_row, 1, c.lengths[s] - 1, {c.heads, c.kv_heads, c.dim},
                         view, expected.data());
      const std::vector<uint16_t> got(out.begin() + s * q_row, out.begin() + (s + 1) * q_row);
      // fp32 softmax in the kernel (no bf16 P): the bf16 output rounding dominates.
      ExpectClose(FromBf16(got), expected, 1e-2,
                  "decode seq " + std::to_string(s) + " len " + std::to_string(c.lengths[s]) +
                      " heads " + std::to_string(c.heads) + "/" + std::to_string(c.kv_heads));
    }
  }
}

// Same logits, params and step: the same token as SampleTokenCpu. The GPU forms the same
// double weights in the same candidate order; only the order of the prefix additions differs
// (relative 1e-16), so a mismatch needs a draw within that distance of a boundary.
TEST_F(CudaKernelsTest, SampleTokensMatchesCpu) {
  for (const int64_t vocab : {int64_t{1000}, int64_t{128256}}) {
    std::vector<SamplingParams> kinds(8);
    kinds[0] = {0.f, 0, 1.f, 1};     // Greedy.
    kinds[1] = {0.7f, 0, 1.f, 2};    // Temperature only.
    kinds[2] = {1.0f, 50, 1.f, 3};   // Top-k.
    kinds[3] = {0.8f, 0, 0.9f, 4};   // Top-p.
    kinds[4] = {1.3f, 40, 0.8f, 5};  // Top-k then top-p.
    kinds[5] = {1.5f, 1, 1.f, 6};    // Top-k 1: greedy.
    kinds[6] = {2.0f, 0, 0.05f, 7};  // A tiny nucleus.
    kinds[7] = {0.3f, 2000, 0.99f, 8};
    const int64_t rows = kinds.size();
    std::vector<float> logits(rows * vocab);
    std::normal_distribution<float> dist(0.f, 3.f);
    for (float& x : logits) x = dist(rng_);
    // Ties: repeated values, including a shared maximum in the greedy row.
    for (int64_t r = 0; r < rows; ++r) {
      float* row = logits.data() + r * vocab;
      const int64_t top = std::max_element(row, row + vocab) - row;
      for (int i = 0; i < 10; ++i) row[(top + 97 * (i + 1)) % vocab] = row[top];
      for (int i = 0; i < 200; ++i) row[(7 * i + 3) % vocab] = row[(11 * i + 5) % vocab];
    }
    ASSERT_OK_AND_ASSIGN(d_logits, ToDevice(logits));
    ASSERT_OK_AND_ASSIGN(d_work, DeviceBuffer::Allocate(SampleTokensWorkspaceBytes(rows, vocab)));
    ASSERT_OK_AND_ASSIGN(d_tokens, DeviceBuffer::Allocate(rows * 4));
    for (auto& p : kinds) p.seed = rng_();
    for (uint64_t step = 0; step < 12; ++step) {
      std::vector<uint64_t> steps(rows);
      for (int64_t r = 0; r < rows; ++r) steps[r] = step * 31 + r;
      ASSERT_OK(d_tokens.Fill(kNanBytes));
      ASSERT_OK(SampleTokens(d_logits.As<float>(), rows, vocab, kinds.data(), steps.data(),
                             d_work.As<void>(), d_tokens.As<int32_t>(), nullptr));
      ASSERT_OK_AND_ASSIGN(tokens, ToHost<int32_t>(d_tokens, rows));
      for (int64_t r = 0; r < rows; ++r) {
        EXPECT_EQ(tokens[r], SampleTokenCpu(logits.data() + r * vocab, vocab, kinds[r], steps[r]))
            << "vocab " << vocab << " row " << r << " step " << step << " seed " << seed_;
      }
    }
  }
}

TEST_F(CudaKernelsTest, BadShapesAreErrors) {
  PrefillAttentionArgs prefill;
  prefill.operands.head_dim = 96;
  EXPECT_EQ(PrefillAttention(prefill, nullptr).code(), absl::StatusCode::kInvalidArgument);
  prefill.operands.head_dim = 128;
  prefill.operands.num_heads = prefill.operands.num_kv_heads = 1;
  prefill.operands.q_stride = prefill.operands.kv_stride = prefill.operands.out_stride = 128;
  prefill.n = 10;
  prefill.n_kv = 5;  // Fewer keys than queries.
  EXPECT_EQ(PrefillAttention(prefill, nullptr).code(), absl::StatusCode::kInvalidArgument);
  PagedDecodeArgs decode;
  decode.head_dim = 128;
  decode.num_seqs = 1;
  decode.num_heads = 12;
  decode.num_kv_heads = 8;  // Not a divisor.
  decode.block_tokens = 16;
  decode.max_seq_len = 10;
  decode.max_blocks_per_seq = 1;
  EXPECT_EQ(PagedDecodeAttention(decode, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SwiGlu(nullptr, nullptr, 1, 10, 5, nullptr, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace cuda
}  // namespace sparseaccel
