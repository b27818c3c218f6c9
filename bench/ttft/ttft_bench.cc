// Time to first token of the CUDA engine: one prefill of N pseudo-random tokens (K/V streamed
// out layer by layer, logits for the last token only), median wall time over repetitions, and
// the peak device memory of each length. Prints one JSON object per length. With
// --sparse_config, prompts of at least its dense_below_tokens run the sparse prefill.
//   ttft_bench --model DIR --lengths 4096,16384 [--reps 3] [--chunk 4096]
//              [--sparse_config FILE --label vs1000_6096]

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
ABSL_FLAG(std::string, lengths, "4096,16384,32768,65536,131072", "Prompt lengths.");
ABSL_FLAG(int64_t, reps, 3, "Timed runs per length up to 32K tokens (one above).");
ABSL_FLAG(int64_t, chunk, 4096, "Prefill chunk (tokens).");
ABSL_FLAG(std::string, sparse_config, "", "Sparse attention config (empty: dense).");
ABSL_FLAG(std::string, label, "dense", "Name of this configuration in the output.");
ABSL_FLAG(int32_t, gpus, 0, "LlamaCudaOptions::gpus: 0 one GPU, N >= 1 tensor parallel over N.");

namespace sparseaccel {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

int Run() {
  LlamaCudaOptions options;
  options.prefill_chunk_tokens = absl::GetFlag(FLAGS_chunk);
  options.gpus = absl::GetFlag(FLAGS_gpus);
  if (!absl::GetFlag(FLAGS_sparse_config).empty()) {
    absl::StatusOr<SparseConfig> sparse = LoadSparseConfig(absl::GetFlag(FLAGS_sparse_config));
    if (!sparse.ok()) {
      LogError("ttft.load_failed", {{"error", sparse.status().ToString()}});
      return 1;
    }
    options.sparse = *std::move(sparse);
  }
  const std::string label = absl::GetFlag(FLAGS_label);
  auto model = LlamaCuda::Load(absl::GetFlag(FLAGS_model), options);
  if (!model.ok()) {
    LogError("ttft.load_failed", {{"error", model.status().ToString()}});
    return 1;
  }
  const int64_t vocab = (*model)->config().vocab_size;
  std::vector<int64_t> lengths;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_lengths), ',')) {
    int64_t n;
    if (!absl::SimpleAtoi(part, &n) || n <= 0) {
      LogError("ttft.usage", {{"error", "bad --lengths"}});
      return 1;
    }
    lengths.push_back(n);
  }
  bool warm = false;
  for (int64_t n : lengths) {
    std::vector<int32_t> tokens(n);
    for (int64_t i = 0; i < n; ++i) {
      tokens[i] = static_cast<int32_t>(SamplingUniform(n, i) * vocab);
    }
    std::vector<float> logits;
    if (!warm) {  // Module load and cuBLASLt planning stay out of the numbers.
      absl::Status status = (*model)->Prefill(tokens, {}, &logits);
      if (!status.ok()) {
        LogError("ttft.prefill_failed", {{"error", status.ToString()}});
        return 1;
      }
      warm = true;
    }
    (*model)->ResetPeakMemory();
    const int64_t reps = n <= 32768 ? absl::GetFlag(FLAGS_reps) : 1;
    const SparsePrefillStats before = (*model)->SparseStats();
    std::vector<double> seconds;
    for (int64_t r = 0; r < reps; ++r) {
      const auto start = std::chrono::steady_clock::now();
      absl::Status status = (*model)->Prefill(tokens, {}, &logits);
      const auto end = std::chrono::steady_clock::now();
      if (!status.ok()) {
        std::printf("{\"tokens\": %ld, \"error\": \"%s\"}\n", static_cast<long>(n),
                    status.ToString().c_str());
        std::fflush(stdout);
        break;
      }
      seconds.push_back(std::chrono::duration<double>(end - start).count());
    }
    if (seconds.empty()) continue;
    std::sort(seconds.begin(), seconds.end());
    const CudaMemoryStats memory = (*model)->MemoryStats();
    const bool sparse = (*model)->SparseStats().sparse_prefills > before.sparse_prefills;
    std::printf(
        "{\"attention\": \"%s\", \"gpus\": %d, \"path\": \"%s\", \"tokens\": %ld, "
        "\"ttft_s\": %.4f, "
        "\"reps\": %zu, \"weights_gib\": %.3f, \"peak_allocated_gib\": %.3f, "
        "\"peak_device_used_gib\": %.3f}\n",
        label.c_str(), absl::GetFlag(FLAGS_gpus), sparse ? "sparse" : "dense", static_cast<long>(n),
        seconds[seconds.size() / 2], seconds.size(), memory.weights / kGiB,
        memory.peak_allocated / kGiB, memory.peak_device_used / kGiB);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace sparseaccel

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return sparseaccel::Run();
}
