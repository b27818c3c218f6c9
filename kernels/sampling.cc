#include "kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common/counter_random.h"

namespace sparseaccel {
namespace {

int32_t Argmax(const float* logits, int64_t vocab_size) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab_size; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

}  // namespace

double SamplingUniform(uint64_t seed, uint64_t step) { return CounterUniform(seed, step); }

int32_t SampleTokenCpu(const float* logits, int64_t vocab_size, const SamplingParams& params,
                       uint64_t step) {
  if (params.temperature <= 0 || params.top_k == 1) return Argmax(logits, vocab_size);
  std::vector<int32_t> order(vocab_size);
  std::iota(order.begin(), order.end(), 0);
  auto by_logit = [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  int64_t keep = vocab_size;
  if (params.top_k > 0 && params.top_k < vocab_size) {
    keep = params.top_k;
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), by_logit);
  } else {
    std::sort(order.begin(), order.end(), by_logit);
  }
  const double inv_t = 1.0 / params.temperature;
  const double max_logit = logits[order[0]];
  std::vector<double> weights(keep);
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) {
    weights[i] = std::exp((logits[order[i]] - max_logit) * inv_t);
    total += weights[i];
  }
  if (params.top_p < 1) {
    double mass = 0;
    int64_t cut = 0;
    while (cut < keep) {
      mass += weights[cut++];
      if (mass >= params.top_p * total) break;
    }
    keep = std::max<int64_t>(cut, 1);
    total = mass;
  }
  const double target = SamplingUniform(params.seed, step) * total;
  double mass = 0;
  for (int64_t i = 0; i < keep; ++i) {
    mass += weights[i];
    if (target < mass) return order[i];
  }
  return order[keep - 1];
}

}  // namespace sparseaccel
