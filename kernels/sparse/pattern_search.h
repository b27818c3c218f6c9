#ifndef SPARSEACCEL_KERNELS_SPARSE_PATTERN_SEARCH_H_
#define SPARSEACCEL_KERNELS_SPARSE_PATTERN_SEARCH_H_

// Kernel-aware pattern search (SparseAccelerate's Algorithm 1) for one head: every candidate
// pattern and budget is run on calibration samples of the head's Q/K/V and measured against
// dense attention. What a head must keep is the attention mass dense attention puts on its
// keys (recall), over all queries and over the last ones (which produce the next token and
// answer a question at the end of a prompt), in the worst calibration sample, not on average:
// a pattern that loses a retrieval on one prompt in four still loses it in serving.

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/sparse/pattern_config.h"
#include "kernels/sparse/sparse_index.h"

namespace sparseaccel {

// One calibration prompt's Q, K, V of one head: [num_tokens][head_dim] each, contiguous.
struct HeadSample {
  std::vector<float> q, k, v;
  int64_t num_tokens = 0;
};

// Candidates with budgets for prompts of `num_tokens`: A-shape windows and block-sparse top-k
// values spanning densities from a few percent to about half, and vertical-slash budgets.
std::vector<HeadPattern> CandidatePatterns(int64_t num_tokens);

// What a head may spend and what it must keep.
struct SearchRule {
  double target_density = 0.1;  // Fraction of causal (q, k) pairs a head may compute.
  double recall_floor = 0.1;    // Least RecallScore a sparse choice must keep.
};

// The recall a choice is judged by: the lower of the mean over all queries and over the last
// kTailQueries.
double RecallScore(const Fidelity& fidelity);

// Fidelity of no sample yet: the identity of WorstOf.
inline constexpr Fidelity kNoSamples{0, 0, 1, 0, 1, 0};

// The worse of two measurements in every field: higher density, cost and error, lower recalls.
Fidelity WorstOf(const Fidelity& a, const Fidelity& b);

struct HeadChoice {
  HeadPattern pattern;
  Fidelity fidelity;               // Worst case over the calibration samples.
  std::string reason;              // Why this candidate, for the search's report.
  std::vector<Fidelity> measured;  // Every candidate's worst case (the report's detail).
};

// Scores this close count as equal: the cheaper candidate wins.
inline constexpr double kRecallTie = 0.01;

// The choice rule, on each candidate's worst-case fidelity `worst[i]`:
// 1. among candidates with density <= target and RecallScore >= floor, the lowest tile cost of
//    those within kRecallTie of the highest score;
// 2. else the cheapest (tile cost) candidate whose score reaches the floor, over the target;
// 3. else dense: no candidate keeps the floor.
// Dense when the target is >= 1.
HeadChoice ChooseCandidate(const std::vector<HeadPattern>& candidates,
                           const std::vector<Fidelity>& worst, const SearchRule& rule);

// A sample's fidelity as the search counts it: recall and error from every sample, density and
// tile cost only from samples of the budget length (the longest prompt, what the config is
// sized for). Vertical-slash budgets are absolute, so a short prompt pays a higher density for
// them than the long prompts the config serves; short prompts are there to check recall.
Fidelity AtBudgetLength(Fidelity f, int64_t num_tokens, int64_t budget_tokens);

// Measures every candidate on the head's samples (CPU reference kernels), a sample of n tokens
// running the candidate at PatternAtLength(candidate, n, budget_tokens) as serving would, and
// applies ChooseCandidate to the worst case over the samples (AtBudgetLength).
HeadChoice SearchHead(const std::vector<HeadSample>& samples, int64_t head_dim,
                      const SearchRule& rule, const std::vector<HeadPattern>& candidates,
                      int64_t budget_tokens);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_SPARSE_PATTERN_SEARCH_H_
