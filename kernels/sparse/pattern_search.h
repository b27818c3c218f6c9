#ifndef SPARSEACCEL_KERNELS_SPARSE_PATTERN_SEARCH_H_
#define SPARSEACCEL_KERNELS_SPARSE_PATTERN_SEARCH_H_

// Kernel-aware pattern search (SparseAccelerate's Algorithm 1) for one head: every candidate
// pattern and budget is run on calibration samples of the head's Q/K/V; candidates whose
// computed fraction of causal pairs (what the sparse kernels pay for) is within the target are
// kept, and the one whose output is closest to dense attention wins.

#include <cstdint>
#include <vector>

#include "kernels/sparse/pattern_config.h"
#include "kernels/sparse/sparse_index.h"

namespace sparseaccel {

// One calibration prompt's Q, K, V of one head: [num_tokens][head_dim] each, contiguous.
struct HeadSample {
  std::vector<float> q, k, v;
  int64_t num_tokens = 0;
};

// Candidates for prompts of `num_tokens`: A-shape windows, vertical-slash budgets and
// block-sparse top-k values spanning densities from a few percent to about half.
std::vector<HeadPattern> CandidatePatterns(int64_t num_tokens);

struct HeadChoice {
  HeadPattern pattern;
  Fidelity fidelity;  // Mean over the samples.
};

// The choice rule: the candidate with the lowest mean relative error among those with mean
// density <= target_density; if none is that sparse, the sparsest candidate. Dense when the
// target is >= 1. `fidelity[i]` is candidate i's mean over the calibration samples.
HeadChoice ChooseCandidate(const std::vector<HeadPattern>& candidates,
                           const std::vector<Fidelity>& fidelity, double target_density);

// Measures every candidate on the head's samples (CPU reference kernels) and applies
// ChooseCandidate.
HeadChoice SearchHead(const std::vector<HeadSample>& samples, int64_t head_dim,
                      double target_density, const std::vector<HeadPattern>& candidates);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_SPARSE_PATTERN_SEARCH_H_
