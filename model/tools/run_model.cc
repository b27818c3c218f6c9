// Runs the CPU reference engine on a prompt of token ids: prefill (logits at every position),
// then greedy decode steps. Prints the generated ids as JSON on stdout and can dump all logits
// (fp32, row-major [prompt + decode - 1 rows][vocab]: every prompt position, then the step that
// produced each generated token after the first) for comparison with other implementations.
//   run_cpu --model DIR (--prompt_ids 1,2,3 | --random_prompt N --seed S) --decode 8
//           [--dump_logits out.bin]

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/log.h"
#include "kernels/sampling.h"
#include "model/llama_cpu.h"

ABSL_FLAG(std::string, model, "", "Checkpoint directory (config.json + safetensors).");
ABSL_FLAG(std::string, prompt_ids, "", "Comma-separated prompt token ids.");
ABSL_FLAG(int64_t, random_prompt, 0, "Use this many pseudo-random token ids instead.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of --random_prompt.");
ABSL_FLAG(int64_t, decode, 8, "Greedy decode steps after the prefill.");
ABSL_FLAG(std::string, dump_logits, "", "Write all logits rows here (fp32).");

namespace sparseaccel {
namespace {

int Fail(const std::string& event, const absl::Status& status) {
  LogError(event, {{"error", status.ToString()}});
  return 1;
}

int Run() {
  const bool random_prompt = absl::GetFlag(FLAGS_random_prompt) > 0;
  if (random_prompt == !absl::GetFlag(FLAGS_prompt_ids).empty() ||
      absl::GetFlag(FLAGS_decode) < 0) {
    return Fail("run_cpu.usage",
                absl::InvalidArgumentError(
                    "give exactly one of --prompt_ids and --random_prompt, and --decode >= 0"));
  }
  absl::StatusOr<std::unique_ptr<LlamaCpu>> model = LlamaCpu::Load(absl::GetFlag(FLAGS_model));
  if (!model.ok()) return Fail("run_cpu.load_failed", model.status());
  const ModelConfig& config = (*model)->config();
  std::vector<int32_t> prompt;
  if (random_prompt) {
    for (int64_t i = 0; i < absl::GetFlag(FLAGS_random_prompt); ++i) {
      double u = SamplingUniform(absl::GetFlag(FLAGS_seed), i);
      prompt.push_back(static_cast<int32_t>(u * config.vocab_size));
    }
  } else {
    for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_prompt_ids), ',')) {
      int32_t id;
      if (!absl::SimpleAtoi(part, &id)) {
        return Fail("run_cpu.usage", absl::InvalidArgumentError("bad --prompt_ids"));
      }
      prompt.push_back(id);
    }
  }
  const int64_t steps = absl::GetFlag(FLAGS_decode);
  ContiguousKvStore kv((*model)->kv_shape(), static_cast<int64_t>(prompt.size()) + steps + 1);
  std::vector<float> logits;
  SequenceChunk prefill{prompt, 0, &kv, LogitsFor::kAll};
  using Clock = std::chrono::steady_clock;
  auto ms_since = [](Clock::time_point start) {
    return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  };
  const Clock::time_point prefill_start = Clock::now();
  absl::Status status = (*model)->Forward({prefill}, &logits);
  if (!status.ok()) return Fail("run_cpu.prefill_failed", status);
  const double prefill_ms = ms_since(prefill_start);
  const Clock::time_point decode_start = Clock::now();
  std::vector<int32_t> generated;
  int64_t pos = static_cast<int64_t>(prompt.size());
  for (int64_t step = 0; step < steps; ++step) {
    const float* last = logits.data() + logits.size() - config.vocab_size;
    int32_t token = SampleTokenCpu(last, config.vocab_size, SamplingParams{}, step);
    generated.push_back(token);
    if (step + 1 == steps) break;
    std::vector<int32_t> one = {token};
    status = (*model)->Forward({SequenceChunk{one, pos++, &kv, LogitsFor::kLast}}, &logits);
    if (!status.ok()) return Fail("run_cpu.decode_failed", status);
  }
  const int64_t decode_forwards = std::max<int64_t>(steps - 1, 0);
  LogInfo("run_cpu.timing", {{"prompt_tokens", prompt.size()},
                             {"prefill_ms", prefill_ms},
                             {"decode_forwards", decode_forwards},
                             {"decode_ms_per_token",
                              decode_forwards ? ms_since(decode_start) / decode_forwards : 0}});
  const std::string dump = absl::GetFlag(FLAGS_dump_logits);
  if (!dump.empty()) {
    std::ofstream out(dump, std::ios::binary);
    out.write(reinterpret_cast<const char*>(logits.data()), logits.size() * sizeof(float));
    if (!out) return Fail("run_cpu.dump_failed", absl::DataLossError(dump));
  }
  std::printf("{\"prompt\": [%s], \"generated\": [%s]}\n", absl::StrJoin(prompt, ", ").c_str(),
              absl::StrJoin(generated, ", ").c_str());
  return 0;
}

}  // namespace
}  // namespace sparseaccel

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return sparseaccel::Run();
}
