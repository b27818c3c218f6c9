#include "kernels/sparse/pattern_search.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace sparseaccel {

std::vector<HeadPattern> CandidatePatterns(int64_t n) {
  std::vector<HeadPattern> candidates;
  const int64_t blocks = (n + kBlockSize - 1) / kBlockSize;
  for (double fraction : {0.02, 0.05, 0.1, 0.2, 0.35, 0.5}) {
    HeadPattern a_shape;
    a_shape.kind = HeadPattern::Kind::kAShape;
    a_shape.sink = kBlockSize;
    a_shape.window = std::max<int64_t>(kBlockSize, static_cast<int64_t>(fraction * n));
    candidates.push_back(a_shape);

    HeadPattern block_sparse;
    block_sparse.kind = HeadPattern::Kind::kBlockSparse;
    block_sparse.top_k = std::max<int64_t>(1, static_cast<int64_t>(fraction * blocks));
    candidates.push_back(block_sparse);
  }
  // Vertical-slash: columns as fractions of the prompt, diagonals beyond the 64 always kept (the
  // paper's 1000 / 6096 at 128K is about 0.8% / 4.7%). Every extra diagonal costs one 64-key
  // range per query block, so few are affordable on short prompts.
  for (double v : {0.01, 0.03, 0.1, 0.25}) {
    for (int64_t extra : {int64_t{4}, int64_t{16}, n / 32, n / 8}) {
      HeadPattern vs;
      vs.kind = HeadPattern::Kind::kVerticalSlash;
      vs.vertical_slash.vertical = std::max<int64_t>(4, static_cast<int64_t>(v * n));
      vs.vertical_slash.slash = kBlockSize + extra;
      vs.vertical_slash.last_q = kBlockSize;
      candidates.push_back(vs);
    }
  }
  return candidates;
}

double RecallScore(const Fidelity& f) { return std::min(f.recall, f.tail_recall); }

Fidelity WorstOf(const Fidelity& a, const Fidelity& b) {
  return Fidelity{
      std::max(a.density, b.density),         std::max(a.tile_cost, b.tile_cost),
      std::min(a.recall, b.recall),           std::max(a.relative_error, b.relative_error),
      std::min(a.tail_recall, b.tail_recall), std::max(a.tail_error, b.tail_error)};
}

namespace {

HeadChoice Dense(std::string reason) {
  HeadChoice dense;
  dense.pattern.kind = HeadPattern::Kind::kDense;
  dense.fidelity = Fidelity{1, 1, 1, 0, 1, 0};
  dense.reason = std::move(reason);
  return dense;
}

}  // namespace

HeadChoice ChooseCandidate(const std::vector<HeadPattern>& candidates,
                           const std::vector<Fidelity>& worst, const SearchRule& rule) {
  if (rule.target_density >= 1) return Dense("target density >= 1");
  int over = -1, best_score = -1;
  double best_within = -1;  // The highest score within the target.
  const int count = static_cast<int>(std::min(candidates.size(), worst.size()));
  for (int i = 0; i < count; ++i) {
    const Fidelity& f = worst[i];
    if (best_score < 0 || RecallScore(f) > RecallScore(worst[best_score])) best_score = i;
    if (RecallScore(f) < rule.recall_floor) continue;
    if (f.density <= rule.target_density) {
      best_within = std::max(best_within, RecallScore(f));
    } else if (over < 0 || f.tile_cost < worst[over].tile_cost) {
      over = i;
    }
  }
  // Within the target: the cheapest of those that come within kRecallTie of the best score.
  int within = -1;
  for (int i = 0; i < count && best_within >= 0; ++i) {
    const Fidelity& f = worst[i];
    if (f.density <= rule.target_density && RecallScore(f) >= rule.recall_floor &&
        RecallScore(f) >= best_within - kRecallTie &&
        (within < 0 || f.tile_cost < worst[within].tile_cost)) {
      within = i;
    }
  }
  const auto chosen = [&](int i, std::string reason) {
    return HeadChoice{candidates[i], worst[i], std::move(reason)};
  };
  if (within >= 0) {
    return chosen(within, absl::StrCat("worst-case recall ", RecallScore(worst[within]),
                                       " (best within density ", rule.target_density, ": ",
                                       best_within, ") at the lowest cost"));
  }
  if (over >= 0) {
    return chosen(
        over, absl::StrCat("no candidate within density ", rule.target_density, " keeps recall ",
                           rule.recall_floor, "; the cheapest that does"));
  }
  return Dense(absl::StrCat("no candidate keeps recall ", rule.recall_floor, " (best ",
                            best_score < 0 ? 0.0 : RecallScore(worst[best_score]), ")"));
}

Fidelity AtBudgetLength(Fidelity f, int64_t num_tokens, int64_t budget_tokens) {
  if (num_tokens < budget_tokens) f.density = f.tile_cost = 0;
  return f;
}

HeadChoice SearchHead(const std::vector<HeadSample>& samples, int64_t d, const SearchRule& rule,
                      const std::vector<HeadPattern>& candidates, int64_t budget_tokens) {
  if (rule.target_density >= 1) return ChooseCandidate(candidates, {}, rule);
  std::vector<DenseReference> dense;
  for (const HeadSample& s : samples) {
    dense.push_back(
        ComputeDenseReference(s.q.data(), d, s.k.data(), s.v.data(), d, s.num_tokens, d));
  }
  std::vector<Fidelity> worst(candidates.size(), kNoSamples);
  for (size_t c = 0; c < candidates.size(); ++c) {
    for (size_t i = 0; i < samples.size(); ++i) {
      const HeadSample& s = samples[i];
      const HeadPattern pattern = PatternAtLength(candidates[c], s.num_tokens, budget_tokens);
      SparseIndex index = BuildIndex(pattern, s.q.data(), d, s.k.data(), d, s.num_tokens, d);
      worst[c] =
          WorstOf(worst[c], AtBudgetLength(MeasureFidelity(s.q.data(), d, s.k.data(), s.v.data(), d,
                                                           d, dense[i], index),
                                           s.num_tokens, budget_tokens));
    }
  }
  HeadChoice choice = ChooseCandidate(candidates, worst, rule);
  choice.measured = std::move(worst);
  return choice;
}

}  // namespace sparseaccel
