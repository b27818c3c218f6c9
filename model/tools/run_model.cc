// Runs one engine on a prompt of token ids: the prefill (logits at every prompt position), then
// greedy decode steps. Prints the generated ids as JSON on stdout and can dump all logits (fp32,
// row-major [prompt + decode - 1 rows][vocab]: every prompt position, then the step that
// produced each generated token after the first) for comparison with other implementations.
//   run_model [--device cpu|cuda] --model DIR (--prompt_ids 1,2,3 | --random_prompt N --seed S)
//             --decode 8 [--dump_logits out.bin] [--chunk 4096]
// cpu decodes through LanguageModel::Forward over a host K/V store; cuda prefills the same way
// and then decodes a device sequence (StartSequence + DecodeStep, the decode service's path).

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "kernels/sampling.h"
#include "model/llama_cpu.h"
#ifdef SPARSEACCEL_WITH_CUDA
#include "model/cuda/llama_cuda.h"
#endif

ABSL_FLAG(std::string, device, "cpu", "Engine: cpu or cuda (builds made where nvcc exists).");
ABSL_FLAG(std::string, model, "", "Checkpoint directory (config.json + safetensors).");
ABSL_FLAG(std::string, prompt_ids, "", "Comma-separated prompt token ids.");
ABSL_FLAG(int64_t, random_prompt, 0, "Use this many pseudo-random token ids instead.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of --random_prompt.");
ABSL_FLAG(int64_t, decode, 8, "Greedy decode steps after the prefill.");
ABSL_FLAG(std::string, dump_logits, "", "Write all logits rows here (fp32).");
ABSL_FLAG(int64_t, chunk, 4096, "cuda: prefill chunk (tokens).");

namespace sparseaccel {
namespace {

// One prompt's prefill and decode steps on an engine, each returning logits.
class PromptRun {
 public:
  virtual ~PromptRun() = default;
  virtual const ModelConfig& config() const = 0;
  // Logits at every prompt position, [prompt][vocab].
  virtual absl::Status Prefill(absl::Span<const int32_t> prompt, std::vector<float>* logits) = 0;
  // Appends `token` to the sequence; the logits of the position after it, [vocab].
  virtual absl::Status Step(int32_t token, std::vector<float>* logits) = 0;
};

// Any LanguageModel, K/V in one host store.
class ForwardRun : public PromptRun {
 public:
  ForwardRun(std::unique_ptr<LanguageModel> model, int64_t max_tokens)
      : model_(std::move(model)), kv_(model_->kv_shape(), max_tokens) {}
  const ModelConfig& config() const override { return model_->config(); }
  absl::Status Prefill(absl::Span<const int32_t> prompt, std::vector<float>* logits) override {
    position_ = static_cast<int64_t>(prompt.size());
    return model_->Forward({SequenceChunk{prompt, 0, &kv_, LogitsFor::kAll}}, logits);
  }
  absl::Status Step(int32_t token, std::vector<float>* logits) override {
    const std::vector<int32_t> one = {token};
    logits->clear();  // Forward appends.
    return model_->Forward({SequenceChunk{one, position_++, &kv_, LogitsFor::kLast}}, logits);
  }

 private:
  std::unique_ptr<LanguageModel> model_;
  ContiguousKvStore kv_;
  int64_t position_ = 0;
};

#ifdef SPARSEACCEL_WITH_CUDA
// The CUDA engine: the prefill's logits through a host store, decode steps on a device sequence.
class DeviceSequenceRun : public PromptRun {
 public:
  explicit DeviceSequenceRun(std::unique_ptr<LlamaCuda> model) : model_(std::move(model)) {}
  const ModelConfig& config() const override { return model_->config(); }
  absl::Status Prefill(absl::Span<const int32_t> prompt, std::vector<float>* logits) override {
    ContiguousKvStore kv(model_->kv_shape(), static_cast<int64_t>(prompt.size()));
    RETURN_IF_ERROR(model_->Forward({SequenceChunk{prompt, 0, &kv, LogitsFor::kAll}}, logits));
    std::vector<float> last;
    ASSIGN_OR_RETURN(id_, model_->StartSequence(prompt, &last));
    return absl::OkStatus();
  }
  absl::Status Step(int32_t token, std::vector<float>* logits) override {
    return model_->DecodeStep({id_}, {token}, logits);
  }

 private:
  std::unique_ptr<LlamaCuda> model_;
  int64_t id_ = -1;
};
#endif

absl::StatusOr<std::unique_ptr<PromptRun>> LoadRun(int64_t max_tokens) {
  const std::string device = absl::GetFlag(FLAGS_device);
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  if (device == "cpu") {
    ASSIGN_OR_RETURN(std::unique_ptr<LlamaCpu> model, LlamaCpu::Load(model_dir));
    return std::make_unique<ForwardRun>(std::move(model), max_tokens);
  }
#ifdef SPARSEACCEL_WITH_CUDA
  if (device == "cuda") {
    LlamaCudaOptions options;
    options.prefill_chunk_tokens = absl::GetFlag(FLAGS_chunk);
    options.kv_pool_tokens = max_tokens;
    ASSIGN_OR_RETURN(std::unique_ptr<LlamaCuda> model, LlamaCuda::Load(model_dir, options));
    return std::make_unique<DeviceSequenceRun>(std::move(model));
  }
#endif
  return absl::InvalidArgumentError(absl::StrCat("--device ", device, ": this build has cpu",
#ifdef SPARSEACCEL_WITH_CUDA
                                                 " and cuda"
#endif
                                                 ));
}

absl::StatusOr<std::vector<int32_t>> PromptFromFlags(int64_t vocab_size) {
  std::vector<int32_t> prompt;
  for (int64_t i = 0; i < absl::GetFlag(FLAGS_random_prompt); ++i) {
    const double u = SamplingUniform(absl::GetFlag(FLAGS_seed), i);
    prompt.push_back(static_cast<int32_t>(u * vocab_size));
  }
  if (!prompt.empty()) return prompt;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_prompt_ids), ',')) {
    int32_t id;
    if (!absl::SimpleAtoi(part, &id)) return absl::InvalidArgumentError("bad --prompt_ids");
    prompt.push_back(id);
  }
  return prompt;
}

int Fail(const std::string& event, const absl::Status& status) {
  LogError(event, {{"error", status.ToString()}});
  return 1;
}

using Clock = std::chrono::steady_clock;

double MillisecondsSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

int Run() {
  const int64_t steps = absl::GetFlag(FLAGS_decode);
  if ((absl::GetFlag(FLAGS_random_prompt) > 0) == !absl::GetFlag(FLAGS_prompt_ids).empty() ||
      steps < 0) {
    return Fail("run_model.usage",
                absl::InvalidArgumentError(
                    "give exactly one of --prompt_ids and --random_prompt, and --decode >= 0"));
  }
  // Room for the prompt and the steps: --prompt_ids has at most one id per two bytes.
  const int64_t max_prompt = std::max<int64_t>(absl::GetFlag(FLAGS_random_prompt),
                                               absl::GetFlag(FLAGS_prompt_ids).size() / 2 + 1);
  absl::StatusOr<std::unique_ptr<PromptRun>> run = LoadRun(max_prompt + steps + 1);
  if (!run.ok()) return Fail("run_model.load_failed", run.status());
  const int64_t vocab = (*run)->config().vocab_size;
  absl::StatusOr<std::vector<int32_t>> prompt = PromptFromFlags(vocab);
  if (!prompt.ok()) return Fail("run_model.usage", prompt.status());
  std::vector<float> logits;
  const Clock::time_point prefill_start = Clock::now();
  absl::Status status = (*run)->Prefill(*prompt, &logits);
  if (!status.ok()) return Fail("run_model.prefill_failed", status);
  const double prefill_ms = MillisecondsSince(prefill_start);
  const Clock::time_point decode_start = Clock::now();
  std::vector<int32_t> generated;
  std::vector<float> last(logits.end() - vocab, logits.end());
  for (int64_t step = 0; step < steps; ++step) {
    generated.push_back(SampleTokenCpu(last.data(), vocab, SamplingParams{}, step));
    if (step + 1 == steps) break;
    status = (*run)->Step(generated.back(), &last);
    if (!status.ok()) return Fail("run_model.decode_failed", status);
    logits.insert(logits.end(), last.begin(), last.end());
  }
  const int64_t decode_forwards = std::max<int64_t>(steps - 1, 0);
  LogInfo("run_model.timing",
          {{"device", absl::GetFlag(FLAGS_device)},
           {"prompt_tokens", prompt->size()},
           {"prefill_ms", prefill_ms},
           {"decode_forwards", decode_forwards},
           {"decode_ms_per_token",
            decode_forwards ? MillisecondsSince(decode_start) / decode_forwards : 0}});
  const std::string dump = absl::GetFlag(FLAGS_dump_logits);
  if (!dump.empty()) {
    std::ofstream out(dump, std::ios::binary);
    out.write(reinterpret_cast<const char*>(logits.data()), logits.size() * sizeof(float));
    if (!out) return Fail("run_model.dump_failed", absl::DataLossError(dump));
  }
  std::printf("{\"prompt\": [%s], \"generated\": [%s]}\n", absl::StrJoin(*prompt, ", ").c_str(),
              absl::StrJoin(generated, ", ").c_str());
  return 0;
}

}  // namespace
}  // namespace sparseaccel

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return sparseaccel::Run();
}
