#ifndef SPARSEACCEL_MODEL_SPARSE_PATTERN_SEARCH_CUDA_H_
#define SPARSEACCEL_MODEL_SPARSE_PATTERN_SEARCH_CUDA_H_

// The pattern search (SearchModelPatterns, model/sparse_prefill.h) on the CUDA engine, for
// models too large for the CPU one: each calibration prompt runs through
// LlamaCuda::ObservePrefill, and at every layer each candidate pattern runs on all heads at
// once with the serving kernels (BuildSparseIndex + SparseAttention) against the dense kernel's
// output. Same candidates (CandidatePatterns), budgets per prompt length (PatternAtLength) and
// choice rule (ChooseCandidate, on the worst prompt) as the CPU search. Per head and candidate:
// density and tile cost of the GPU index, relative error of the bf16 output against dense over
// every row, recall over kRecallRows evenly spaced rows and tail recall over the last
// kTailQueries rows (dense attention probabilities computed on the host in double). Holds one
// layer's data at a time: device memory of a few [tokens][hidden] buffers and the index.

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "model/cuda/llama_cuda.h"
#include "model/sparse/sparse_prefill.h"

namespace sparseaccel {

inline constexpr int64_t kRecallRows = 32;

absl::StatusOr<ModelSearch> SearchModelPatternsCuda(
    LlamaCuda* model, const std::vector<std::vector<int32_t>>& prompts, const SearchRule& rule,
    int64_t dense_below_tokens);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_SPARSE_PATTERN_SEARCH_CUDA_H_
