// The GPU sparse prefill (kernels/cuda/sparse_attention.h) against the CPU reference
// (kernels/sparse/sparse_index.h) on fresh random and planted inputs: the same indices where
// the selection is clear-cut, the same outputs within bf16 rounding for any index, and dense
// results from full budgets.

#include "kernels/cuda/sparse_attention.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/cuda_test_util.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/sparse/pattern_config.h"
#include "kernels/sparse/planted.h"
#include "kernels/sparse/sparse_index.h"

namespace sparseaccel {
namespace cuda {
namespace {

// Outputs are bf16 (relative rounding 2^-9 per element) and the kernel's probabilities are
// rounded to bf16 before P V, as in the dense kernel: the same bound as its test.
constexpr double kAttentionBound = 2e-2;

HeadPattern Dense() { return HeadPattern{}; }

// One layer's Q, K, V as bf16 rows ([n][heads][dim] and [n][kv_heads][dim]) on host and device.
struct Layer {
  int64_t n = 0, heads = 0, kv_heads = 0, dim = 0;
  std::vector<uint16_t> q, k, v;
  DeviceBuffer d_q, d_k, d_v;

  // Head h's Q (or KV head h's K / V) as floats [n][dim].
  std::vector<float> Column(const std::vector<uint16_t>& x, int64_t width, int64_t h) const {
    std::vector<float> out(n * dim);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t t = 0; t < dim; ++t) out[r * dim + t] = FromBf16(x[(r * width + h) * dim + t]);
    }
    return out;
  }
  absl::Status Upload() {
    absl::StatusOr<DeviceBuffer> b = ToDevice(q);
    if (!b.ok()) return b.status();
    d_q = std::move(*b);
    b = ToDevice(k);
    if (!b.ok()) return b.status();
    d_k = std::move(*b);
    b = ToDevice(v);
    if (!b.ok()) return b.status();
    d_v = std::move(*b);
    return absl::OkStatus();
  }
};

class SparseAttentionTest : public CudaTest {
 protected:
  Layer RandomLayer(int64_t n, int64_t heads, int64_t kv_heads, int64_t dim) {
    Layer l{n, heads, kv_heads, dim};
    l.q = RandomBf16(n * heads * dim, 1.5f);
    l.k = RandomBf16(n * kv_heads * dim, 1.5f);
    l.v = RandomBf16(n * kv_heads * dim);
    return l;
  }

  // One planted head per (query head = KV head); kSlash heads at `slash_offsets` (or
  // PlantedHead's default).
  Layer PlantedLayer(int64_t n, int64_t dim, const std::vector<Planted>& kinds,
                     const std::vector<int64_t>& slash_offsets = {}) {
    const int64_t heads = static_cast<int64_t>(kinds.size());
    Layer l{n, heads, heads, dim};
    l.q.resize(n * heads * dim);
    l.k.resize(n * heads * dim);
    l.v.resize(n * heads * dim);
    std::mt19937 rng(static_cast<uint32_t>(rng_()));
    for (int64_t h = 0; h < heads; ++h) {
      const HeadSample s = PlantedHead(kinds[h], n, dim, &rng, 10.0, slash_offsets);
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t t = 0; t < dim; ++t) {
          const int64_t at = (r * heads + h) * dim + t;
          l.q[at] = ToBf16(s.q[r * dim + t]);
          l.k[at] = ToBf16(s.k[r * dim + t]);
          l.v[at] = ToBf16(s.v[r * dim + t]);
        }
      }
    }
    return l;
  }

  // Builds the layer's index on the GPU into workspace_; returns it.
  absl::StatusOr<DeviceSparseIndex> Build(const Layer& l, const std::vector<HeadPattern>& heads) {
    host_patterns_.clear();
    for (const HeadPattern& p : heads) {
      absl::StatusOr<DeviceHeadPattern> dp = ToDevicePattern(p);
      if (!dp.ok()) return dp.status();
      host_patterns_.push_back(*dp);
    }
    absl::StatusOr<DeviceBuffer> patterns = ToDevice(host_patterns_);
    if (!patterns.ok()) return patterns.status();
    patterns_ = std::move(*patterns);
    SparseIndexArgs args;
    args.q = l.d_q.As<uint16_t>();
    args.q_stride = l.heads * l.dim;
    args.k = l.d_k.As<uint16_t>();
    args.k_stride = l.kv_heads * l.dim;
    args.num_tokens = l.n;
    args.num_heads = l.heads;
    args.num_kv_heads = l.kv_heads;
    args.head_dim = l.dim;
    args.patterns = patterns_.As<DeviceHeadPattern>();
    args.host_patterns = &host_patterns_;
    const size_t bytes = SparseIndexWorkspaceBytes(args);
    absl::StatusOr<DeviceBuffer> workspace = DeviceBuffer::Allocate(bytes);
    if (!workspace.ok()) return workspace.status();
    workspace_ = std::move(*workspace);
    // Poison: every index entry the kernels leave unwritten would show as garbage.
    absl::Status fill = workspace_.Fill(0xff);
    if (!fill.ok()) return fill;
    DeviceSparseIndex index;
    absl::Status status = BuildSparseIndex(args, workspace_.As<void>(), bytes, &index, nullptr);
    if (!status.ok()) return status;
    return index;
  }

  // The layer's Q, K, V, written to `out` (all rows of the prompt).
  static AttentionOperands Operands(const Layer& l, DeviceBuffer* out,
                                    AttentionInnerLoop loop = AttentionInnerLoop::kAuto) {
    AttentionOperands x;
    x.q = l.d_q.As<uint16_t>();
    x.q_stride = l.heads * l.dim;
    x.k = l.d_k.As<uint16_t>();
    x.v = l.d_v.As<uint16_t>();
    x.kv_stride = l.kv_heads * l.dim;
    x.out = out->As<uint16_t>();
    x.out_stride = l.heads * l.dim;
    x.num_heads = l.heads;
    x.num_kv_heads = l.kv_heads;
    x.head_dim = l.dim;
    x.inner_loop = loop;
    return x;
  }

  // Runs SparseAttention over query blocks [first, first + count) into rows of `out`.
  absl::Status Attend(const Layer& l, const DeviceSparseIndex& index, int64_t first, int64_t count,
                      DeviceBuffer* out, AttentionInnerLoop loop = AttentionInnerLoop::kAuto) {
    SparseAttentionArgs args{Operands(l, out, loop), first, count, index};
    args.operands.out += first * kBlockSize * l.heads * l.dim;
    return SparseAttention(args, nullptr);
  }

  // The CPU reference's attention for every head over `indices`, as [n][heads][dim].
  std::vector<float> CpuAttention(const Layer& l, const std::vector<SparseIndex>& indices) {
    std::vector<float> out(l.n * l.heads * l.dim);
    for (int64_t h = 0; h < l.heads; ++h) {
      const int64_t kv = h / (l.heads / l.kv_heads);
      const std::vector<float> q = l.Column(l.q, l.heads, h), k = l.Column(l.k, l.kv_heads, kv),
                               v = l.Column(l.v, l.kv_heads, kv);
      std::vector<float> head_out(l.n * l.dim);
      SparseAttentionCpu(q.data(), l.dim, k.data(), v.data(), l.dim, l.dim, indices[h],
                         head_out.data(), l.dim);
      for (int64_t r = 0; r < l.n; ++r) {
        std::copy_n(&head_out[r * l.dim], l.dim, &out[(r * l.heads + h) * l.dim]);
      }
    }
    return out;
  }

  // The layer's index built on the GPU (Build), copied to the host per head.
  absl::StatusOr<std::vector<SparseIndex>> GpuIndices(const Layer& l,
                                                      const std::vector<HeadPattern>& heads) {
    absl::StatusOr<DeviceSparseIndex> index = Build(l, heads);
    if (!index.ok()) return index.status();
    return CopyIndexToHost(*index, nullptr);
  }

  std::vector<SparseIndex> CpuIndices(const Layer& l, const std::vector<HeadPattern>& heads) {
    std::vector<SparseIndex> out;
    for (int64_t h = 0; h < l.heads; ++h) {
      const int64_t kv = h / (l.heads / l.kv_heads);
      const std::vector<float> q = l.Column(l.q, l.heads, h), k = l.Column(l.k, l.kv_heads, kv);
      out.push_back(BuildIndex(heads[h], q.data(), l.dim, k.data(), l.dim, l.n, l.dim));
    }
    return out;
  }

  std::vector<DeviceHeadPattern> host_patterns_;
  DeviceBuffer patterns_, workspace_;
};

void ExpectSameIndex(const SparseIndex& gpu, const SparseIndex& cpu, const std::string& what) {
  ASSERT_EQ(gpu.num_query_blocks, cpu.num_query_blocks) << what;
  for (int64_t b = 0; b < cpu.num_query_blocks; ++b) {
    ASSERT_EQ(gpu.range_count[b], cpu.range_count[b]) << what << " block " << b;
    ASSERT_EQ(gpu.column_count[b], cpu.column_count[b]) << what << " block " << b;
    for (int32_t i = 0; i < cpu.range_count[b]; ++i) {
      ASSERT_EQ(gpu.range_start[b * gpu.max_ranges + i], cpu.range_start[b * cpu.max_ranges + i])
          << what << " block " << b << " range " << i;
    }
    for (int32_t i = 0; i < cpu.column_count[b]; ++i) {
      ASSERT_EQ(gpu.column_index[b * gpu.max_columns + i],
                cpu.column_index[b * cpu.max_columns + i])
          << what << " block " << b << " column " << i;
    }
  }
}

TEST_F(SparseAttentionTest, IndicesEqualCpuOnPlantedHeads) {
  for (int64_t dim : {64, 128}) {
    for (int64_t n : {1000, 1536}) {
      const std::vector<Planted> kinds = {Planted::kNone,  Planted::kSinkLocal,
                                          Planted::kSlash, Planted::kVertical,
                                          Planted::kBlock, Planted::kSinkLocal};
      Layer l = PlantedLayer(n, dim, kinds);
      ASSERT_OK(l.Upload());
      // Budgets that keep exactly the planted structure, so the choice is clear-cut: the two
      // planted far diagonals, the planted columns beyond the forced ones, the target block.
      int64_t planted_columns = 0;
      for (int64_t c = 7; c < n; c += n / 7 + 13) ++planted_columns;
      const std::vector<HeadPattern> heads = {Dense(),
                                              AShapePattern(64, 200),
                                              VerticalSlashPattern(4, 64 + 2),
                                              VerticalSlashPattern(4 + planted_columns, 64, 32),
                                              BlockSparsePattern(2),
                                              AShapePattern(0, 64)};
      ASSERT_OK_AND_ASSIGN(gpu, GpuIndices(l, heads));
      const std::vector<SparseIndex> cpu = CpuIndices(l, heads);
      for (int64_t h = 0; h < l.heads; ++h) {
        ExpectSameIndex(gpu[h], cpu[h],
                        "dim " + std::to_string(dim) + " n " + std::to_string(n) + " head " +
                            std::to_string(h) + " seed " + std::to_string(seed_));
      }
    }
  }
}

// Planted diagonals 63, 64 and 65 apart and far apart: full query blocks see runs of offsets
// that merge, split, and end at the block's last visible offset (the conversion takes whole
// runs); the last, partial block (n = 64 * 62 + 32) walks its offsets one by one. One layer has
// fixed offsets, one offsets drawn with gaps around 64.
TEST_F(SparseAttentionTest, SlashRunsEqualCpu) {
  const int64_t n = 4000, dim = 128;
  std::vector<int64_t> drawn = {0};
  for (int64_t o = 200 + rng_() % 64; drawn.size() < 7; o += 58 + rng_() % 13) {
    drawn.push_back(o);
    if (rng_() % 3 == 0) o += 500;
  }
  for (const std::vector<int64_t>& offsets :
       {std::vector<int64_t>{0, 300, 363, 427, 492, 1500, 2900}, drawn}) {
    Layer l = PlantedLayer(n, dim, {Planted::kSlash, Planted::kSlash}, offsets);
    ASSERT_OK(l.Upload());
    // Forced offsets 0 .. 63 and the 6 planted beyond them.
    const std::vector<HeadPattern> heads = {VerticalSlashPattern(4, 64 + 6),
                                            VerticalSlashPattern(4, 64 + 6, 32)};
    ASSERT_OK_AND_ASSIGN(gpu, GpuIndices(l, heads));
    const std::vector<SparseIndex> cpu = CpuIndices(l, heads);
    std::string planted;
    for (int64_t o : offsets) planted += " " + std::to_string(o);
    for (int64_t h = 0; h < l.heads; ++h) {
      // The budget ends at the planted diagonals: the last full block keeps each.
      const int64_t last_full = n / kBlockSize - 1;
      const std::vector<int64_t> keys = cpu[h].KeysOfBlock(last_full);
      for (int64_t o : offsets) {
        EXPECT_TRUE(std::binary_search(keys.begin(), keys.end(), last_full * kBlockSize - o))
            << "planted offset " << o << " not kept, offsets" << planted << " seed " << seed_;
      }
      ExpectSameIndex(
          gpu[h], cpu[h],
          "offsets" + planted + " head " + std::to_string(h) + " seed " + std::to_string(seed_));
    }
  }
}

// Exactly tied scores across the top-k's chunks of 4096: with every key the same vector, all
// the columns that every estimating query sees score the same, and each budget ends inside that
// tie, so the smaller indices must be kept (the CPU rule) on both sides of a chunk boundary.
// The same holds for block-sparse heads: every pooled key block is the same vector, so each
// query block's candidates tie and the smallest blocks (with the diagonal) are kept.
TEST_F(SparseAttentionTest, TiedScoresKeepTheSmallerIndices) {
  const int64_t n = 9000, dim = 128;
  Layer l = RandomLayer(n, 4, 1, dim);
  const std::vector<uint16_t> key = RandomBf16(dim, 1.5f);
  for (int64_t r = 0; r < n; ++r) std::copy(key.begin(), key.end(), &l.k[r * dim]);
  ASSERT_OK(l.Upload());
  const std::vector<HeadPattern> heads = {VerticalSlashPattern(6000, 64),
                                          VerticalSlashPattern(4100, 64, 16),
                                          BlockSparsePattern(50), BlockSparsePattern(1)};
  ASSERT_OK_AND_ASSIGN(gpu, GpuIndices(l, heads));
  const std::vector<SparseIndex> cpu = CpuIndices(l, heads);
  for (int64_t h = 0; h < l.heads; ++h) {
    ExpectSameIndex(gpu[h], cpu[h], "head " + std::to_string(h) + " seed " + std::to_string(seed_));
  }
}

// On random inputs many scores are nearly equal, and fp32 and double may order a few of them
// differently: the selected keys must still agree almost everywhere.
TEST_F(SparseAttentionTest, IndicesAgreeWithCpuOnRandomHeads) {
  Layer l = RandomLayer(2000, 4, 2, 128);
  ASSERT_OK(l.Upload());
  const std::vector<HeadPattern> heads = {VerticalSlashPattern(100, 300),
                                          VerticalSlashPattern(30, 64, 16), BlockSparsePattern(5),
                                          BlockSparsePattern(1)};
  ASSERT_OK_AND_ASSIGN(gpu, GpuIndices(l, heads));
  const std::vector<SparseIndex> cpu = CpuIndices(l, heads);
  for (int64_t h = 0; h < l.heads; ++h) {
    int64_t common = 0, total = 0;
    for (int64_t b = 0; b < cpu[h].num_query_blocks; ++b) {
      const std::vector<int64_t> a = gpu[h].KeysOfBlock(b), c = cpu[h].KeysOfBlock(b);
      std::vector<int64_t> both;
      std::set_intersection(a.begin(), a.end(), c.begin(), c.end(), std::back_inserter(both));
      common += static_cast<int64_t>(both.size());
      total += static_cast<int64_t>(std::max(a.size(), c.size()));
    }
    EXPECT_GT(static_cast<double>(common) / total, 0.99) << "head " << h << " seed " << seed_;
  }
}

TEST_F(SparseAttentionTest, AttentionMatchesCpuOnItsIndex) {
  struct Case {
    int64_t n, heads, kv_heads, dim;
  };
  for (const Case& c : {Case{777, 8, 2, 128}, Case{1024, 4, 4, 64}, Case{100, 4, 1, 128}}) {
    const std::string what = "n=" + std::to_string(c.n) + " dim=" + std::to_string(c.dim);
    Layer l = RandomLayer(c.n, c.heads, c.kv_heads, c.dim);
    ASSERT_OK(l.Upload());
    std::vector<HeadPattern> heads;
    const HeadPattern cycle[] = {VerticalSlashPattern(40, 150), BlockSparsePattern(3),
                                 AShapePattern(64, 128), Dense()};
    for (int64_t h = 0; h < c.heads; ++h) heads.push_back(cycle[h % 4]);
    ASSERT_OK_AND_ASSIGN(index, Build(l, heads));
    ASSERT_OK_AND_ASSIGN(gpu_index, CopyIndexToHost(index, nullptr));
    const std::vector<float> expected = CpuAttention(l, gpu_index);
    for (const AttentionInnerLoop loop :
         {AttentionInnerLoop::kMmaSync, AttentionInnerLoop::kWgmma}) {
      ASSERT_OK_AND_ASSIGN(out, DeviceBuffer::Allocate(c.n * c.heads * c.dim * 2));
      ASSERT_OK(out.Fill(kNanBytes));
      // In two calls, as the engine does per chunk of queries.
      const int64_t blocks = index.num_query_blocks, split = blocks / 3;
      const absl::Status first_call = Attend(l, index, 0, split, &out, loop);
      if (WgmmaUnavailable(loop, first_call)) continue;
      ASSERT_OK(first_call);
      ASSERT_OK(Attend(l, index, split, blocks - split, &out, loop));
      ASSERT_OK(DeviceSynchronize());
      ASSERT_OK_AND_ASSIGN(result, ToHost<uint16_t>(out, c.n * c.heads * c.dim));
      ExpectClose(FromBf16(result), expected, kAttentionBound, what + " " + InnerLoopName(loop));
    }
  }
}

// Dense heads, and vertical-slash budgets covering every key, compute dense attention: the
// same as the dense kernel.
TEST_F(SparseAttentionTest, FullBudgetsEqualDenseKernel) {
  const int64_t n = 900, heads = 8, kv_heads = 2, dim = 128;
  Layer l = RandomLayer(n, heads, kv_heads, dim);
  ASSERT_OK(l.Upload());
  std::vector<HeadPattern> patterns;
  for (int64_t h = 0; h < heads; ++h) {
    patterns.push_back(h % 2 == 0 ? Dense() : VerticalSlashPattern(n, n));
  }
  ASSERT_OK_AND_ASSIGN(index, Build(l, patterns));
  ASSERT_OK_AND_ASSIGN(gpu_index, CopyIndexToHost(index, nullptr));
  for (int64_t h = 0; h < heads; ++h) EXPECT_EQ(IndexDensity(gpu_index[h]), 1.0) << "head " << h;
  ASSERT_OK_AND_ASSIGN(sparse_out, DeviceBuffer::Allocate(n * heads * dim * 2));
  ASSERT_OK_AND_ASSIGN(dense_out, DeviceBuffer::Allocate(n * heads * dim * 2));
  ASSERT_OK(sparse_out.Fill(kNanBytes));
  ASSERT_OK(dense_out.Fill(kNanBytes));
  ASSERT_OK(Attend(l, index, 0, index.num_query_blocks, &sparse_out));
  const PrefillAttentionArgs dense{Operands(l, &dense_out), n, n};
  ASSERT_OK(PrefillAttention(dense, nullptr));
  ASSERT_OK(DeviceSynchronize());
  ASSERT_OK_AND_ASSIGN(sparse_result, ToHost<uint16_t>(sparse_out, n * heads * dim));
  ASSERT_OK_AND_ASSIGN(dense_result, ToHost<uint16_t>(dense_out, n * heads * dim));
  ExpectClose(FromBf16(sparse_result), FromBf16(dense_result), kAttentionBound, "vs dense");
  std::vector<SparseIndex> dense_indices(heads, DenseIndex(n));
  ExpectClose(FromBf16(sparse_result), CpuAttention(l, dense_indices), kAttentionBound, "vs cpu");
}

TEST_F(SparseAttentionTest, BadArgumentsAreErrors) {
  EXPECT_EQ(ToDevicePattern(VerticalSlashPattern(10, 10, 65)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ToDevicePattern(BlockSparsePattern(-1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  Layer l = RandomLayer(256, 2, 1, 128);
  ASSERT_OK(l.Upload());
  ASSERT_OK_AND_ASSIGN(index, Build(l, {VerticalSlashPattern(8, 64), Dense()}));
  ASSERT_OK_AND_ASSIGN(out, DeviceBuffer::Allocate(256 * 2 * 128 * 2));
  // Query blocks past the index.
  EXPECT_EQ(Attend(l, index, 2, 3, &out).code(), absl::StatusCode::kInvalidArgument);
  // A workspace smaller than asked for.
  SparseIndexArgs args;
  args.q = l.d_q.As<uint16_t>();
  args.q_stride = 256;
  args.k = l.d_k.As<uint16_t>();
  args.k_stride = 128;
  args.num_tokens = 256;
  args.num_heads = 2;
  args.num_kv_heads = 1;
  args.head_dim = 128;
  args.patterns = patterns_.As<DeviceHeadPattern>();
  args.host_patterns = &host_patterns_;
  DeviceSparseIndex unused;
  EXPECT_EQ(BuildSparseIndex(args, workspace_.As<void>(), SparseIndexWorkspaceBytes(args) - 1,
                             &unused, nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
  args.head_dim = 96;
  EXPECT_EQ(
      BuildSparseIndex(args, workspace_.As<void>(), workspace_.bytes(), &unused, nullptr).code(),
      absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace cuda
}  // namespace sparseaccel
