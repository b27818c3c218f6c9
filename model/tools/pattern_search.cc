// Offline pattern search over a checkpoint: runs calibration prompts through the CPU engine
// (--device=cpu) or the CUDA engine (--device=cuda, for 8B-sized models), measures every
// head's candidate patterns on the captured Q/K/V, picks each head's pattern and budget at the
// target density and recall floor (kernels/sparse/pattern_search.h, on the worst calibration
// prompt), and writes the per-model sparse config (JSON) that the services load with
// --sparse_config. Logs each head's choice with the reason for it.
//   pattern_search --model DIR --out sparse.json [--device cpu|cuda --target_density 0.1
//                  --recall_floor 0.1 --tokens 2048 --prompts 2 --seed 1 --dense_below N]
//   pattern_search --model DIR --out sparse.json --prompt_file ids.txt
// Calibration prompts are pseudo-random token ids, or read from --prompt_file: one prompt per
// line, token ids separated by white space.

#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "kernels/sampling.h"
#include "kernels/sparse/pattern_search.h"
#include "model/sparse/sparse_prefill.h"
#ifdef SPARSEACCEL_WITH_CUDA
#include "model/sparse/pattern_search_cuda.h"
#endif

ABSL_FLAG(std::string, model, "", "Checkpoint directory.");
ABSL_FLAG(std::string, device, "cpu", "Engine that runs the calibration: cpu or cuda.");
ABSL_FLAG(std::string, out, "", "Where to write the sparse config JSON.");
ABSL_FLAG(double, target_density, 0.1, "Fraction of causal (q, k) pairs each head may compute.");
ABSL_FLAG(double, recall_floor, 0.1,
          "Least attention recall (over all queries and over the last 64, on the worst "
          "calibration prompt) a sparse head must keep; heads that no candidate keeps it for "
          "stay dense.");
ABSL_FLAG(int64_t, tokens, 2048, "Calibration prompt length.");
ABSL_FLAG(int64_t, prompts, 2, "Calibration prompts (pseudo-random token ids).");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the calibration prompts.");
ABSL_FLAG(int64_t, dense_below, -1,
          "Prompts shorter than this run dense at serving time. Default: the break-even of the "
          "device's sparse path, 4096 on cpu and 24576 on cuda (measured on an H200 by "
          "bench/attention/sparse_attention_bench.py).");
ABSL_FLAG(std::string, prompt_file, "",
          "Calibration prompts, one per line of white-space separated token ids (instead of "
          "--prompts random prompts of --tokens ids).");

namespace sparseaccel {
namespace {

// The calibration prompts: from --prompt_file, or pseudo-random ids.
absl::StatusOr<std::vector<std::vector<int32_t>>> CalibrationPrompts(int64_t vocab_size) {
  std::vector<std::vector<int32_t>> prompts;
  const std::string path = absl::GetFlag(FLAGS_prompt_file);
  if (path.empty()) {
    const int64_t n = absl::GetFlag(FLAGS_tokens);
    if (n < 1 || absl::GetFlag(FLAGS_prompts) < 1) {
      return absl::InvalidArgumentError("--tokens and --prompts must be >= 1");
    }
    for (int64_t p = 0; p < absl::GetFlag(FLAGS_prompts); ++p) {
      prompts.emplace_back(n);
      for (int64_t i = 0; i < n; ++i) {
        prompts.back()[i] =
            static_cast<int32_t>(SamplingUniform(absl::GetFlag(FLAGS_seed) + p, i) * vocab_size);
      }
    }
    return prompts;
  }
  std::ifstream file(path);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::string line;
  for (int64_t line_number = 1; std::getline(file, line); ++line_number) {
    std::istringstream ids(line);
    std::vector<int32_t> prompt;
    std::string id;
    while (ids >> id) {
      char* end = nullptr;
      const long value = std::strtol(id.c_str(), &end, 10);
      if (*end != '\0' || value < 0 || value >= vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(path, ":", line_number, ": '", id,
                                                       "' is not a token id below ", vocab_size));
      }
      prompt.push_back(static_cast<int32_t>(value));
    }
    if (!prompt.empty()) prompts.push_back(std::move(prompt));
  }
  if (prompts.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no prompts"));
  return prompts;
}

// Loads the model on --device and searches it on `prompts` (from CalibrationPrompts).
absl::StatusOr<ModelSearch> Search() {
  const std::string device = absl::GetFlag(FLAGS_device);
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  const SearchRule rule{absl::GetFlag(FLAGS_target_density), absl::GetFlag(FLAGS_recall_floor)};
  const int64_t dense_below_flag = absl::GetFlag(FLAGS_dense_below);
  const int64_t dense_below =
      dense_below_flag >= 0 ? dense_below_flag : (device == "cuda" ? 24576 : 4096);
  if (device == "cpu") {
    ASSIGN_OR_RETURN(std::unique_ptr<LlamaCpu> model, LlamaCpu::Load(model_dir));
    ASSIGN_OR_RETURN(auto prompts, CalibrationPrompts(model->config().vocab_size));
    return SearchModelPatterns(model.get(), prompts, rule, dense_below);
  }
  if (device == "cuda") {
#ifdef SPARSEACCEL_WITH_CUDA
    ASSIGN_OR_RETURN(std::unique_ptr<LlamaCuda> model, LlamaCuda::Load(model_dir));
    ASSIGN_OR_RETURN(auto prompts, CalibrationPrompts(model->config().vocab_size));
    return SearchModelPatternsCuda(model.get(), prompts, rule, dense_below);
#else
    return absl::UnimplementedError("--device=cuda: this build has no CUDA backend (no nvcc)");
#endif
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown --device '", device, "' (cpu, cuda)"));
}

// Debug detail of the report: what one candidate measured on one head (worst case).
void LogCandidate(int64_t layer, int64_t head, const HeadPattern& pattern, const Fidelity& f) {
  LogDebug("pattern_search.candidate", {{"layer", layer},
                                        {"head", head},
                                        {"candidate", HeadPatternToJson(pattern)},
                                        {"density", f.density},
                                        {"recall", f.recall},
                                        {"tail_recall", f.tail_recall},
                                        {"relative_error", f.relative_error},
                                        {"tail_error", f.tail_error}});
}

int Run() {
  absl::StatusOr<ModelSearch> search = Search();
  if (!search.ok()) {
    LogError("pattern_search.failed", {{"error", search.status().ToString()}});
    return 1;
  }
  search->config.calibration_seed = absl::GetFlag(FLAGS_seed);
  for (size_t l = 0; l < search->choices.size(); ++l) {
    for (size_t h = 0; h < search->choices[l].size(); ++h) {
      const HeadChoice& choice = search->choices[l][h];
      for (size_t c = 0; c < choice.measured.size(); ++c) {
        LogCandidate(static_cast<int64_t>(l), static_cast<int64_t>(h), search->candidates[c],
                     choice.measured[c]);
      }
      LogInfo("pattern_search.head", {{"layer", static_cast<int64_t>(l)},
                                      {"head", static_cast<int64_t>(h)},
                                      {"pattern", std::string(PatternName(choice.pattern.kind))},
                                      {"density", choice.fidelity.density},
                                      {"tile_cost", choice.fidelity.tile_cost},
                                      {"recall", choice.fidelity.recall},
                                      {"tail_recall", choice.fidelity.tail_recall},
                                      {"relative_error", choice.fidelity.relative_error},
                                      {"tail_error", choice.fidelity.tail_error},
                                      {"reason", choice.reason}});
    }
  }
  std::ofstream out(absl::GetFlag(FLAGS_out));
  out << SparseConfigToJson(search->config);
  out.close();
  if (!out) {
    LogError("pattern_search.write_failed", {{"out", absl::GetFlag(FLAGS_out)}});
    return 1;
  }
  LogInfo("pattern_search.done", {{"out", absl::GetFlag(FLAGS_out)},
                                  {"mean_density", search->mean.density},
                                  {"mean_tile_cost", search->mean.tile_cost},
                                  {"mean_recall", search->mean.recall},
                                  {"mean_tail_recall", search->mean.tail_recall},
                                  {"mean_relative_error", search->mean.relative_error}});
  return 0;
}

}  // namespace
}  // namespace sparseaccel

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return sparseaccel::Run();
}
