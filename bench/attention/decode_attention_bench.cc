// Times paged decode attention (one query token per sequence) for one layer of Llama-3.1-8B
// (32 query heads, 8 KV heads, head_dim 128, bf16, 16-token blocks scattered over the pool) at
// several (batch, context) points; prints one JSON object with the K/V bytes read per second.

#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/device_memory.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace cuda {
namespace {

constexpr int64_t kHeads = 32, kKvHeads = 8, kHeadDim = 128, kBlockTokens = 16;

absl::StatusOr<nlohmann::json> TimePoint(int64_t batch, int64_t context, std::mt19937& rng) {
  const int64_t blocks_per_seq = context / kBlockTokens, pool_blocks = batch * blocks_per_seq;
  const int64_t block_elems = kBlockTokens * kKvHeads * kHeadDim;
  std::vector<int32_t> tables(pool_blocks);
  std::iota(tables.begin(), tables.end(), 0);
  std::shuffle(tables.begin(), tables.end(), rng);
  const std::vector<int32_t> lengths(batch, static_cast<int32_t>(context));
  std::vector<uint16_t> q(batch * kHeads * kHeadDim);
  std::uniform_int_distribution<int> bits(0x3c00, 0x3f80);  // bf16 in [2^-7, 1).
  for (uint16_t& x : q) x = static_cast<uint16_t>(bits(rng));
  absl::StatusOr<DeviceBuffer> k = DeviceBuffer::Allocate(pool_blocks * block_elems * 2);
  absl::StatusOr<DeviceBuffer> v = DeviceBuffer::Allocate(pool_blocks * block_elems * 2);
  absl::StatusOr<DeviceBuffer> d_q = ToDevice(q), d_tables = ToDevice(tables),
                               d_lengths = ToDevice(lengths);
  absl::StatusOr<DeviceBuffer> out = DeviceBuffer::Allocate(batch * kHeads * kHeadDim * 2);
  for (auto* b : {&k, &v, &d_q, &d_tables, &d_lengths, &out}) {
    if (!b->ok()) return b->status();
  }
  // K/V contents do not change the work: constant bytes, finite and non-zero.
  absl::Status status = k->Fill(0x3f);  // bf16 0x3f3f, about 0.75.
  if (status.ok()) status = v->Fill(0x3e);
  if (!status.ok()) return status;
  PagedDecodeArgs args;
  args.q = d_q->As<uint16_t>();
  args.q_stride = kHeads * kHeadDim;
  args.k_pool = k->As<uint16_t>();
  args.v_pool = v->As<uint16_t>();
  args.block_tables = d_tables->As<int32_t>();
  args.max_blocks_per_seq = blocks_per_seq;
  args.seq_lens = d_lengths->As<int32_t>();
  args.num_seqs = batch;
  args.max_seq_len = context;
  args.block_tokens = kBlockTokens;
  args.num_heads = kHeads;
  args.num_kv_heads = kKvHeads;
  args.head_dim = kHeadDim;
  args.out = out->As<uint16_t>();
  args.out_stride = kHeads * kHeadDim;
  absl::StatusOr<DeviceBuffer> work = DeviceBuffer::Allocate(PagedDecodeWorkspaceBytes(args));
  if (!work.ok()) return work.status();
  args.workspace = work->As<void>();
  absl::StatusOr<EventTimer> timer = EventTimer::Create();
  if (!timer.ok()) return timer.status();
  if (status = PagedDecodeAttention(args, nullptr); !status.ok()) return status;  // Warm-up.
  absl::StatusOr<std::vector<double>> ms =
      timer->SortedMilliseconds(20, [&] { return PagedDecodeAttention(args, nullptr); });
  if (!ms.ok()) return ms.status();
  const double median = (*ms)[ms->size() / 2];
  const double bytes = 2.0 * batch * context * kKvHeads * kHeadDim * 2;  // K and V, bf16.
  return nlohmann::json{{"batch", batch},
                        {"context", context},
                        {"median_ms", median},
                        {"kv_gb_per_s", bytes / (median * 1e-3) / 1e9}};
}

int Main() {
  absl::StatusOr<std::string> device = DeviceDescription();
  if (!device.ok()) {
    std::fprintf(stderr, "%s\n", device.status().ToString().c_str());
    return 1;
  }
  std::mt19937 rng(std::random_device{}());
  nlohmann::json results = nlohmann::json::array();
  const std::pair<int64_t, int64_t> points[] = {{1, 8192},  {1, 32768}, {1, 131072},
                                                {8, 32768}, {32, 8192}, {128, 2048}};
  for (const auto& [batch, context] : points) {
    absl::StatusOr<nlohmann::json> result = TimePoint(batch, context, rng);
    if (!result.ok()) {
      std::fprintf(stderr, "batch %lld context %lld: %s\n", static_cast<long long>(batch),
                   static_cast<long long>(context), result.status().ToString().c_str());
      return 1;
    }
    results.push_back(*result);
  }
  const nlohmann::json report = {{"kernel",
                                  "sparseaccel PagedDecodeAttention (key chunks of 64+ filling "
                                  "whole waves of blocks + merge)"},
                                 {"device", *device},
                                 {"shape",
                                  {{"heads", kHeads},
                                   {"kv_heads", kKvHeads},
                                   {"head_dim", kHeadDim},
                                   {"block_tokens", kBlockTokens},
                                   {"dtype", "bf16"}}},
                                 {"results", results}};
  std::printf("%s\n", report.dump(2).c_str());
  return 0;
}

}  // namespace
}  // namespace cuda
}  // namespace sparseaccel

int main() { return sparseaccel::cuda::Main(); }
