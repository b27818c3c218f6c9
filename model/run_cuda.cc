// Runs the CUDA engine on a prompt of token ids, like run_cpu: logits at every prompt position
// (the chunked prefill through a host KV store), then greedy decode steps on a device sequence
// (StartSequence + DecodeStep). Prints the ids as JSON; can dump all logits rows (fp32).
//   run_cuda --model DIR (--prompt_ids 1,2,3 | --random_prompt N --seed S) --decode 8
//            [--dump_logits out.bin] [--chunk 4096]

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
#include "model/llama_cuda.h"

ABSL_FLAG(std::string, model, "", "Checkpoint directory (config.json + safetensors).");
ABSL_FLAG(std::string, prompt_ids, "", "Comma-separated prompt token ids.");
ABSL_FLAG(int64_t, random_prompt, 0, "Use this many pseudo-random token ids instead.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of --random_prompt.");
ABSL_FLAG(int64_t, decode, 8, "Greedy decode steps after the prefill.");
ABSL_FLAG(std::string, dump_logits, "", "Write all logits rows here (fp32).");
ABSL_FLAG(int64_t, chunk, 4096, "Prefill chunk (tokens).");

namespace sparseaccel {
namespace {

int Fail(const std::string& event, const absl::Status& status) {
  LogError(event, {{"error", status.ToString()}});
  return 1;
}

int Run() {
  std::vector<int32_t> prompt;
  const int64_t steps = absl::GetFlag(FLAGS_decode);
  LlamaCudaOptions options;
  options.prefill_chunk_tokens = absl::GetFlag(FLAGS_chunk);
  if (absl::GetFlag(FLAGS_random_prompt) > 0) {
    options.kv_pool_tokens = absl::GetFlag(FLAGS_random_prompt) + steps + 1;
  } else {
    options.kv_pool_tokens = 1 << 16;
  }
  absl::StatusOr<std::unique_ptr<LlamaCuda>> model =
      LlamaCuda::Load(absl::GetFlag(FLAGS_model), options);
  if (!model.ok()) return Fail("run_cuda.load_failed", model.status());
  const ModelConfig& config = (*model)->config();
  if (absl::GetFlag(FLAGS_random_prompt) > 0) {
    for (int64_t i = 0; i < absl::GetFlag(FLAGS_random_prompt); ++i) {
      double u = SamplingUniform(absl::GetFlag(FLAGS_seed), i);
      prompt.push_back(static_cast<int32_t>(u * config.vocab_size));
    }
  } else {
    for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_prompt_ids), ',')) {
      int32_t id;
      if (!absl::SimpleAtoi(part, &id)) {
        return Fail("run_cuda.usage", absl::InvalidArgumentError("bad --prompt_ids"));
      }
      prompt.push_back(id);
    }
  }
  ContiguousKvStore kv((*model)->kv_shape(), static_cast<int64_t>(prompt.size()));
  std::vector<float> logits;
  absl::Status status =
      (*model)->Forward({SequenceChunk{prompt, 0, &kv, LogitsFor::kAll}}, &logits);
  if (!status.ok()) return Fail("run_cuda.prefill_failed", status);
  std::vector<float> last;
  absl::StatusOr<int64_t> id = (*model)->StartSequence(prompt, &last);
  if (!id.ok()) return Fail("run_cuda.start_failed", id.status());
  std::vector<int32_t> generated;
  for (int64_t step = 0; step < steps; ++step) {
    int32_t token = SampleTokenCpu(last.data(), config.vocab_size, SamplingParams{}, step);
    generated.push_back(token);
    if (step + 1 == steps) break;
    status = (*model)->DecodeStep({*id}, {token}, &last);
    if (!status.ok()) return Fail("run_cuda.decode_failed", status);
    logits.insert(logits.end(), last.begin(), last.end());
  }
  const std::string dump = absl::GetFlag(FLAGS_dump_logits);
  if (!dump.empty()) {
    std::ofstream out(dump, std::ios::binary);
    out.write(reinterpret_cast<const char*>(logits.data()), logits.size() * sizeof(float));
    if (!out) return Fail("run_cuda.dump_failed", absl::DataLossError(dump));
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
