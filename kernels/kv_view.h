#ifndef SPARSEACCEL_KERNELS_KV_VIEW_H_
#define SPARSEACCEL_KERNELS_KV_VIEW_H_

// One layer's K and V for positions [0, n), stored in blocks of `block_tokens` rows. A row is
// one position's keys (or values) for all KV heads: [num_kv_heads * head_dim] fp32, the layout
// of the K/V projection output. A contiguous cache is the special case of one block; a paged
// cache lists its blocks in position order.

#include <cstdint>
#include <vector>

namespace sparseaccel {

struct KvLayerView {
  int64_t block_tokens = 0;
  int64_t row_size = 0;
  std::vector<float*> k_blocks;
  std::vector<float*> v_blocks;

  float* KRow(int64_t pos) const {
    return k_blocks[pos / block_tokens] + (pos % block_tokens) * row_size;
  }
  float* VRow(int64_t pos) const {
    return v_blocks[pos / block_tokens] + (pos % block_tokens) * row_size;
  }
};

// KV heads [first_kv_head, ..) of `kv`: the same rows, each starting first_kv_head * head_dim
// floats in (a tensor-parallel shard's heads, addressed from 0).
inline KvLayerView KvHeadsView(const KvLayerView& kv, int64_t first_kv_head, int64_t head_dim) {
  KvLayerView view = kv;
  for (float*& block : view.k_blocks) block += first_kv_head * head_dim;
  for (float*& block : view.v_blocks) block += first_kv_head * head_dim;
  return view;
}

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_KV_VIEW_H_
