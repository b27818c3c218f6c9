// Inter-token latency of batched decoding on the CUDA engine: a prompt of `context` tokens is
// prefilled once into the device pool, forked into `batch` sequences, and each timed step
// decodes one token for all of them. Prints
// one JSON object per (context, batch): median and p90 step time. Steps sample greedily on the
// GPU (DecodeAndSample), so only the token ids come back to the host.
//   decode_bench --model DIR --contexts 4096,32768 --batches 1,8,32 [--steps 32] [--pool_gib 40]
//       [--decode_graphs=false]

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/log.h"
#include "kernels/sampling.h"
#include "model/cuda/llama_cuda.h"

ABSL_FLAG(std::string, model, "", "Checkpoint directory.");
ABSL_FLAG(std::string, contexts, "4096,32768", "Context lengths.");
ABSL_FLAG(std::string, batches, "1,8,32", "Batch sizes.");
ABSL_FLAG(int64_t, steps, 32, "Timed decode steps.");
ABSL_FLAG(double, pool_gib, 40, "Device K/V pool size.");
ABSL_FLAG(bool, decode_graphs, true, "Decode steps as captured CUDA graphs.");
ABSL_FLAG(int64_t, small_batch_linear_rows, 3,
          "Decode steps of at most this many sequences run SmallBatchLinear (0: cuBLASLt).");

namespace sparseaccel {
namespace {

constexpr int64_t kWarmupSteps = 2;

absl::StatusOr<std::vector<int64_t>> ParseList(const std::string& text) {
  std::vector<int64_t> values;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int64_t v;
    if (!absl::SimpleAtoi(part, &v) || v <= 0) return absl::InvalidArgumentError(text);
    values.push_back(v);
  }
  return values;
}

int Fail(const std::string& event, const absl::Status& status) {
  LogError(event, {{"error", status.ToString()}});
  return 1;
}

int Run() {
  auto contexts = ParseList(absl::GetFlag(FLAGS_contexts));
  auto batches = ParseList(absl::GetFlag(FLAGS_batches));
  if (!contexts.ok() || !batches.ok()) {
    return Fail("decode_bench.usage", absl::InvalidArgumentError("bad list"));
  }
  const int64_t steps = absl::GetFlag(FLAGS_steps);
  auto config = LoadModelConfig(absl::GetFlag(FLAGS_model));
  if (!config.ok()) return Fail("decode_bench.load_failed", config.status());
  const double token_bytes =
      2.0 * 2.0 * config->num_hidden_layers * config->num_key_value_heads * config->head_dim;
  LlamaCudaOptions options;
  options.kv_block_tokens = 64;
  options.decode_graphs = absl::GetFlag(FLAGS_decode_graphs);
  options.small_batch_linear_rows = absl::GetFlag(FLAGS_small_batch_linear_rows);
  options.kv_pool_tokens =
      static_cast<int64_t>(absl::GetFlag(FLAGS_pool_gib) * (1 << 30) / token_bytes);
  auto model = LlamaCuda::Load(absl::GetFlag(FLAGS_model), options);
  if (!model.ok()) return Fail("decode_bench.load_failed", model.status());
  const int64_t vocab = config->vocab_size;
  for (int64_t context : *contexts) {
    std::vector<int32_t> prompt(context);
    for (int64_t i = 0; i < context; ++i) {
      prompt[i] = static_cast<int32_t>(SamplingUniform(context, i) * vocab);
    }
    std::vector<float> last;
    auto base = (*model)->StartSequence(prompt, &last);
    if (!base.ok()) return Fail("decode_bench.prefill_failed", base.status());
    const int32_t first = SampleTokenCpu(last.data(), vocab, SamplingParams{}, 0);
    for (int64_t batch : *batches) {
      const int64_t blocks_per_seq = (context + kWarmupSteps + steps + 63) / 64;
      const double needed_gib = (batch + 1) * blocks_per_seq * 64 * token_bytes / (1 << 30);
      if ((batch + 1) * blocks_per_seq * 64 > options.kv_pool_tokens) {
        std::printf(
            "{\"context\": %ld, \"batch\": %ld, \"skipped\": \"K/V needs %.1f GiB, "
            "pool %.1f GiB\"}\n",
            static_cast<long>(context), static_cast<long>(batch), needed_gib,
            absl::GetFlag(FLAGS_pool_gib));
        std::fflush(stdout);
        continue;
      }
      std::vector<int64_t> ids;
      for (int64_t b = 0; b < batch; ++b) {
        auto fork = (*model)->ForkSequence(*base);
        if (!fork.ok()) return Fail("decode_bench.fork_failed", fork.status());
        ids.push_back(*fork);
      }
      std::vector<int32_t> tokens(batch, first);
      const std::vector<SamplingParams> greedy(batch);
      std::vector<double> seconds;
      for (int64_t step = 0; step < kWarmupSteps + steps; ++step) {
        const std::vector<uint64_t> draw(batch, static_cast<uint64_t>(step));
        const auto start = std::chrono::steady_clock::now();
        absl::Status status = (*model)->DecodeAndSample(ids, tokens, greedy, draw, &tokens);
        if (!status.ok()) return Fail("decode_bench.step_failed", status);
        const auto end = std::chrono::steady_clock::now();
        if (step >= kWarmupSteps) {
          seconds.push_back(std::chrono::duration<double>(end - start).count());
        }
      }
      for (int64_t id : ids) (void)(*model)->EndSequence(id);
      std::sort(seconds.begin(), seconds.end());
      const double median = seconds[seconds.size() / 2];
      std::printf(
          "{\"context\": %ld, \"batch\": %ld, \"itl_ms\": %.3f, \"p90_ms\": %.3f, "
          "\"tokens_per_s\": %.1f, \"steps\": %ld, \"decode_graphs\": %s, "
          "\"small_batch_linear_rows\": %ld}\n",
          static_cast<long>(context), static_cast<long>(batch), median * 1e3,
          seconds[seconds.size() * 9 / 10] * 1e3, batch / median, static_cast<long>(steps),
          options.decode_graphs ? "true" : "false",
          static_cast<long>(options.small_batch_linear_rows));
      std::fflush(stdout);
    }
    (void)(*model)->EndSequence(*base);
  }
  return 0;
}

}  // namespace
}  // namespace sparseaccel

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return sparseaccel::Run();
}
