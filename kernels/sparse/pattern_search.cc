#include "kernels/sparse/pattern_search.h"

#include <algorithm>

namespace sparseaccel {

std::vector<HeadPattern> CandidatePatterns(int64_t n) {
  std::vector<HeadPattern> candidates;
  const int64_t blocks = (n + kBlockSize - 1) / kBlockSize;
  for (double fraction : {0.02, 0.05, 0.1, 0.2, 0.35}) {
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
  for (double v : {0.01, 0.03, 0.1}) {
    for (int64_t extra : {int64_t{4}, int64_t{16}, n / 32}) {
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

HeadChoice ChooseCandidate(const std::vector<HeadPattern>& candidates,
                           const std::vector<Fidelity>& fidelity, double target_density) {
  HeadChoice best, sparsest;
  if (target_density >= 1) {
    best.pattern.kind = HeadPattern::Kind::kDense;
    best.fidelity = Fidelity{1, 1, 1, 0};
    return best;
  }
  bool have_best = false, have_sparsest = false;
  for (size_t i = 0; i < candidates.size() && i < fidelity.size(); ++i) {
    const Fidelity& mean = fidelity[i];
    if (!have_sparsest || mean.density < sparsest.fidelity.density) {
      sparsest = HeadChoice{candidates[i], mean};
      have_sparsest = true;
    }
    if (mean.density <= target_density &&
        (!have_best || mean.relative_error < best.fidelity.relative_error)) {
      best = HeadChoice{candidates[i], mean};
      have_best = true;
    }
  }
  return have_best ? best : sparsest;
}

HeadChoice SearchHead(const std::vector<HeadSample>& samples, int64_t d, double target_density,
                      const std::vector<HeadPattern>& candidates) {
  if (target_density >= 1) return ChooseCandidate(candidates, {}, target_density);
  std::vector<DenseReference> dense;
  for (const HeadSample& s : samples) {
    dense.push_back(
        ComputeDenseReference(s.q.data(), d, s.k.data(), s.v.data(), d, s.num_tokens, d));
  }
  std::vector<Fidelity> fidelity;
  for (const HeadPattern& candidate : candidates) {
    Fidelity mean;
    for (size_t i = 0; i < samples.size(); ++i) {
      const HeadSample& s = samples[i];
      SparseIndex index = BuildIndex(candidate, s.q.data(), d, s.k.data(), d, s.num_tokens, d);
      Fidelity f = MeasureFidelity(s.q.data(), d, s.k.data(), s.v.data(), d, d, dense[i], index);
      mean.density += f.density / samples.size();
      mean.tile_cost += f.tile_cost / samples.size();
      mean.recall += f.recall / samples.size();
      mean.relative_error += f.relative_error / samples.size();
    }
    fidelity.push_back(mean);
  }
  return ChooseCandidate(candidates, fidelity, target_density);
}

}  // namespace sparseaccel
