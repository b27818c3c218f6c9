#ifndef SPARSEACCEL_KERNELS_ATTENTION_H_
#define SPARSEACCEL_KERNELS_ATTENTION_H_

// Causal grouped-query attention of a run of query rows against one layer's K/V.

#include <cstdint>

#include "kernels/kv_view.h"

namespace sparseaccel {

struct AttentionShape {
  int64_t num_heads = 0;     // Query heads.
  int64_t num_kv_heads = 0;  // Query head h reads KV head h / (num_heads / num_kv_heads).
  int64_t head_dim = 0;
};

// q: [n][num_heads][head_dim], the queries at positions start_pos .. start_pos + n - 1.
// kv: keys and values for positions 0 .. start_pos + n - 1 (rows of num_kv_heads x head_dim).
// out: [n][num_heads][head_dim]. Query at position p attends to keys 0..p with scale
// 1/sqrt(head_dim); dot products, softmax (with max subtraction) and the weighted sum of values
// in double.
void CausalAttentionCpu(const float* q, int64_t n, int64_t start_pos, const AttentionShape& shape,
                        const KvLayerView& kv, float* out);

// One query row of one head against `num_keys` keys of its KV head: positions keys[0..num_keys)
// or, when `keys` is null, positions 0..num_keys-1. The building block of the dense and sparse
// CPU paths. `scores` is scratch of num_keys doubles.
void AttendOneQuery(const float* q_head, const KvLayerView& kv, int64_t kv_head, int64_t head_dim,
                    const int64_t* keys, int64_t num_keys, double* scores, float* out_head);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_ATTENTION_H_
