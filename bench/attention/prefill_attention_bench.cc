// Times the dense causal prefill attention kernel for one layer of Llama-3.1-8B (32 query
// heads, 8 KV heads, head_dim 128, bf16) at several context lengths; prints one JSON object.
//   prefill_attention_bench [--contexts=8192,16384,...]

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/device_memory.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace cuda {
namespace {

constexpr int64_t kHeads = 32, kKvHeads = 8, kHeadDim = 128;

// Fills a buffer of bf16 with a repeated block of random normal values (never zero).
absl::Status FillRandom(DeviceBuffer& buffer, std::mt19937& rng) {
  const size_t count = buffer.bytes() / 2;
  std::vector<float> block(std::min<size_t>(count, 1 << 20));
  std::normal_distribution<float> dist(0.f, 1.f);
  for (float& x : block) x = dist(rng) + (dist(rng) > 0 ? 1e-3f : -1e-3f);
  absl::StatusOr<DeviceBuffer> d_block = ToDevice(block);
  if (!d_block.ok()) return d_block.status();
  for (size_t at = 0; at < count; at += block.size()) {
    const size_t n = std::min(block.size(), count - at);
    absl::Status status = F32ToBf16(d_block->As<float>(), n, buffer.As<uint16_t>() + at, nullptr);
    if (!status.ok()) return status;
  }
  return DeviceSynchronize();
}

// Times PrefillAttention with `loop` at context n; null when the device has no wgmma.
absl::StatusOr<nlohmann::json> TimeContext(int64_t n, AttentionInnerLoop loop, std::mt19937& rng) {
  absl::StatusOr<DeviceBuffer> q = DeviceBuffer::Allocate(n * kHeads * kHeadDim * 2);
  absl::StatusOr<DeviceBuffer> k = DeviceBuffer::Allocate(n * kKvHeads * kHeadDim * 2);
  absl::StatusOr<DeviceBuffer> v = DeviceBuffer::Allocate(n * kKvHeads * kHeadDim * 2);
  absl::StatusOr<DeviceBuffer> out = DeviceBuffer::Allocate(n * kHeads * kHeadDim * 2);
  for (auto* b : {&q, &k, &v, &out}) {
    if (!b->ok()) return b->status();
  }
  for (auto* b : {&q, &k, &v}) {
    absl::Status status = FillRandom(**b, rng);
    if (!status.ok()) return status;
  }
  PrefillAttentionArgs args;
  args.operands.q = q->As<uint16_t>();
  args.operands.q_stride = kHeads * kHeadDim;
  args.operands.k = k->As<uint16_t>();
  args.operands.v = v->As<uint16_t>();
  args.operands.kv_stride = kKvHeads * kHeadDim;
  args.operands.out = out->As<uint16_t>();
  args.operands.out_stride = kHeads * kHeadDim;
  args.operands.num_heads = kHeads;
  args.operands.num_kv_heads = kKvHeads;
  args.operands.head_dim = kHeadDim;
  args.operands.inner_loop = loop;
  args.n = args.n_kv = n;
  absl::StatusOr<EventTimer> timer = EventTimer::Create();
  if (!timer.ok()) return timer.status();
  absl::Status status = PrefillAttention(args, nullptr);  // Warm-up.
  if (loop == AttentionInnerLoop::kWgmma && absl::IsFailedPrecondition(status)) {
    return nlohmann::json();
  }
  if (!status.ok()) return status;
  const int repeats = n <= 16384 ? 20 : n <= 32768 ? 10 : 5;
  absl::StatusOr<std::vector<double>> ms =
      timer->SortedMilliseconds(repeats, [&] { return PrefillAttention(args, nullptr); });
  if (!ms.ok()) return ms.status();
  const double median = (*ms)[ms->size() / 2];
  // Causal: half of the 4 n^2 H D multiply-adds of full attention.
  const double flops = 2.0 * double(n) * double(n) * kHeads * kHeadDim;
  return nlohmann::json{{"context", n},
                        {"inner_loop", loop == AttentionInnerLoop::kWgmma ? "wgmma" : "mma.sync"},
                        {"median_ms", median},
                        {"min_ms", ms->front()},
                        {"repeats", repeats},
                        {"tflops", flops / (median * 1e-3) / 1e12}};
}

int Main(int argc, char** argv) {
  std::vector<int64_t> contexts = {8192, 16384, 32768, 65536, 131072};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const std::string prefix = "--contexts=";
    if (arg.rfind(prefix, 0) != 0) {
      std::fprintf(stderr, "usage: %s [--contexts=8192,16384,...]\n", argv[0]);
      return 2;
    }
    contexts.clear();
    for (absl::string_view part : absl::StrSplit(arg.substr(prefix.size()), ',')) {
      int64_t n;
      if (!absl::SimpleAtoi(part, &n) || n <= 0) {
        std::fprintf(stderr, "bad context: %s\n", std::string(part).c_str());
        return 2;
      }
      contexts.push_back(n);
    }
  }
  absl::StatusOr<std::string> device = DeviceDescription();
  if (!device.ok()) {
    std::fprintf(stderr, "%s\n", device.status().ToString().c_str());
    return 1;
  }
  std::mt19937 rng(std::random_device{}());
  nlohmann::json results = nlohmann::json::array();
  for (int64_t n : contexts) {
    for (const AttentionInnerLoop loop :
         {AttentionInnerLoop::kMmaSync, AttentionInnerLoop::kWgmma}) {
      absl::StatusOr<nlohmann::json> result = TimeContext(n, loop, rng);
      if (!result.ok()) {
        std::fprintf(stderr, "context %lld: %s\n", static_cast<long long>(n),
                     result.status().ToString().c_str());
        return 1;
      }
      if (!result->is_null()) results.push_back(*result);
    }
  }
  const nlohmann::json report = {{"kernel",
                                  "sparseaccel PrefillAttention, 128 queries a block: mma.sync "
                                  "m16n8k16 (4 warps, 32-key tiles at head_dim 128) and, where "
                                  "the device has it, wgmma m64n64k16 (2 warpgroups, 64-key "
                                  "tiles)"},
                                 {"device", *device},
                                 {"shape",
                                  {{"heads", kHeads},
                                   {"kv_heads", kKvHeads},
                                   {"head_dim", kHeadDim},
                                   {"dtype", "bf16"},
                                   {"causal", true},
                                   {"batch", 1}}},
                                 {"results", results}};
  std::printf("%s\n", report.dump(2).c_str());
  return 0;
}

}  // namespace
}  // namespace cuda
}  // namespace sparseaccel

int main(int argc, char** argv) { return sparseaccel::cuda::Main(argc, argv); }
