#include "kernels/attention.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace sparseaccel {
namespace {

// Naive causal softmax attention in double over contiguous K/V [pos][kv_heads][dim].
std::vector<double> NaiveAttention(const std::vector<float>& q, const std::vector<float>& k,
                                   const std::vector<float>& v, int64_t n, int64_t start_pos,
                                   const AttentionShape& s) {
  const int64_t group = s.num_heads / s.num_kv_heads, d = s.head_dim;
  std::vector<double> out(n * s.num_heads * d);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < s.num_heads; ++h) {
      const int64_t kvh = h / group, keys = start_pos + i + 1;
      std::vector<double> p(keys);
      double mx = -1e300, sum = 0;
      for (int64_t j = 0; j < keys; ++j) {
        double dot = 0;
        for (int64_t t = 0; t < d; ++t) {
          dot += double(q[(i * s.num_heads + h) * d + t]) * k[(j * s.num_kv_heads + kvh) * d + t];
        }
        p[j] = dot / std::sqrt(double(d));
        mx = std::max(mx, p[j]);
      }
      for (double& x : p) sum += (x = std::exp(x - mx));
      for (int64_t j = 0; j < keys; ++j) {
        for (int64_t t = 0; t < d; ++t) {
          out[(i * s.num_heads + h) * d + t] += p[j] / sum * v[(j * s.num_kv_heads + kvh) * d + t];
        }
      }
    }
  }
  return out;
}

// K/V split into blocks of `block` rows (the last one partially used), like a paged cache.
KvLayerView BlockedView(std::vector<float>* k, std::vector<float>* v, int64_t total, int64_t row,
                        int64_t block, std::vector<std::vector<float>>* storage) {
  KvLayerView view;
  view.block_tokens = block;
  view.row_size = row;
  for (int64_t b = 0; b * block < total; ++b) {
    storage->emplace_back(block * row, NAN);
    storage->emplace_back(block * row, NAN);
    std::vector<float>& kb = (*storage)[storage->size() - 2];
    std::vector<float>& vb = storage->back();
    for (int64_t r = 0; r < block && b * block + r < total; ++r) {
      std::copy_n(k->data() + (b * block + r) * row, row, kb.data() + r * row);
      std::copy_n(v->data() + (b * block + r) * row, row, vb.data() + r * row);
    }
    view.k_blocks.push_back(kb.data());
    view.v_blocks.push_back(vb.data());
  }
  return view;
}

TEST(AttentionTest, MatchesNaiveSoftmaxGqaPagedWithOffset) {
  std::mt19937 rng(35);
  std::normal_distribution<float> dist(0.0f, 1.5f);
  struct Case {
    AttentionShape shape;
    int64_t n, start_pos, block;
  };
  const Case cases[] = {{{4, 4, 16}, 9, 0, 1000},
                        {{8, 2, 32}, 13, 0, 4},
                        {{8, 1, 8}, 1, 40, 7},
                        {{6, 3, 16}, 5, 21, 16}};
  for (const Case& c : cases) {
    const int64_t total = c.start_pos + c.n, row = c.shape.num_kv_heads * c.shape.head_dim;
    std::vector<float> q(c.n * c.shape.num_heads * c.shape.head_dim), k(total * row),
        v(total * row);
    for (float& x : q) x = dist(rng);
    for (float& x : k) x = dist(rng);
    for (float& x : v) x = dist(rng);
    std::vector<std::vector<float>> storage;
    KvLayerView view = BlockedView(&k, &v, total, row, c.block, &storage);
    std::vector<float> out(q.size(), NAN);
    CausalAttentionCpu(q.data(), c.n, c.start_pos, c.shape, view, out.data());
    std::vector<double> expected = NaiveAttention(q, k, v, c.n, c.start_pos, c.shape);
    double max_err = 0, max_ref = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      ASSERT_FALSE(std::isnan(out[i])) << i;
      max_err = std::max(max_err, std::fabs(out[i] - expected[i]));
      max_ref = std::max(max_ref, std::fabs(expected[i]));
    }
    EXPECT_LT(max_err / max_ref, 1e-6) << "heads " << c.shape.num_heads << " n " << c.n;
  }
}

}  // namespace
}  // namespace sparseaccel
