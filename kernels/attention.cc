#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/parallel.h"

namespace sparseaccel {

void AttendOneQuery(const float* q_head, const KvLayerView& kv, int64_t kv_head, int64_t head_dim,
                    const int64_t* keys, int64_t num_keys, double* scores, float* out_head) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  double max_score = -INFINITY;
  for (int64_t k = 0; k < num_keys; ++k) {
    const float* key = kv.KRow(keys ? keys[k] : k) + kv_head * head_dim;
    double dot = 0;
    for (int64_t d = 0; d < head_dim; ++d) dot += static_cast<double>(q_head[d]) * key[d];
    scores[k] = dot * scale;
    max_score = std::max(max_score, scores[k]);
  }
  double sum = 0;
  for (int64_t k = 0; k < num_keys; ++k) {
    scores[k] = std::exp(scores[k] - max_score);
    sum += scores[k];
  }
  std::vector<double> acc(head_dim, 0.0);
  for (int64_t k = 0; k < num_keys; ++k) {
    const float* value = kv.VRow(keys ? keys[k] : k) + kv_head * head_dim;
    const double p = scores[k];
    for (int64_t d = 0; d < head_dim; ++d) acc[d] += p * value[d];
  }
  for (int64_t d = 0; d < head_dim; ++d) out_head[d] = static_cast<float>(acc[d] / sum);
}

void CausalAttentionCpu(const float* q, int64_t n, int64_t start_pos, const AttentionShape& shape,
                        const KvLayerView& kv, float* out) {
  const int64_t group = shape.num_heads / shape.num_kv_heads;
  const int64_t d = shape.head_dim;
  // Multiply-adds of q.k and p.v over all rows and heads (the causal triangle, roughly).
  const int64_t work = n * shape.num_heads * (start_pos + n) * d;
#pragma omp parallel if (work >= kMinParallelWork)
  {
    std::vector<double> scores(start_pos + n);
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < shape.num_heads; ++h) {
        const int64_t offset = (i * shape.num_heads + h) * d;
        AttendOneQuery(q + offset, kv, h / group, d, nullptr, start_pos + i + 1, scores.data(),
                       out + offset);
      }
    }
  }
}

}  // namespace sparseaccel
