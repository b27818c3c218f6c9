#ifndef SPARSEACCEL_KERNELS_SPARSE_PLANTED_H_
#define SPARSEACCEL_KERNELS_SPARSE_PLANTED_H_

// Q/K/V for one head with planted attention structure, for tests and fidelity checks: random Q
// and K make attention nearly uniform, which no sparse pattern can approximate, while real
// heads concentrate on sinks, local windows, columns, diagonals or blocks.

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/sparse/pattern_search.h"

namespace sparseaccel {

enum class Planted { kNone, kSinkLocal, kVertical, kSlash, kBlock };

// kSinkLocal: query i attends keys 0..2 and the keys of its own and the two previous 64-token
// chunks.
constexpr int64_t kLocalChunk = 64;

// `strength`: the planted scores' margin over the background, in softmax units. kSlash plants
// the diagonals at `slash_offsets` (default 0, n/5 + 3, n/2 + 1); each query's codes add to its
// background scores' spread, so a few suffice.
inline HeadSample PlantedHead(Planted kind, int64_t n, int64_t d, std::mt19937* rng,
                              double strength = 10.0, std::vector<int64_t> slash_offsets = {}) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  HeadSample s;
  s.num_tokens = n;
  s.q.resize(n * d), s.k.resize(n * d), s.v.resize(n * d);
  for (float& x : s.q) x = 0.3f * normal(*rng);
  for (float& x : s.k) x = 0.3f * normal(*rng);
  for (float& x : s.v) x = normal(*rng);
  auto unit = [&] {
    std::vector<float> u(d);
    double norm = 0;
    for (float& x : u) {
      x = normal(*rng);
      norm += double(x) * x;
    }
    for (float& x : u) x = static_cast<float>(x / std::sqrt(norm));
    return u;
  };
  // Adds `scale` * u to row r of x.
  auto add = [&](std::vector<float>* x, int64_t r, const std::vector<float>& u, double scale) {
    for (int64_t t = 0; t < d; ++t) (*x)[r * d + t] += static_cast<float>(scale * u[t]);
  };
  const double amplitude = std::sqrt(strength * std::sqrt(static_cast<double>(d)));
  switch (kind) {
    case Planted::kNone:
      break;
    case Planted::kVertical:
    case Planted::kSinkLocal: {
      // Columns every query attends to: a shared direction in all queries and in those keys.
      const std::vector<float> u = unit();
      std::vector<int64_t> columns = {0, 1, 2};
      if (kind == Planted::kVertical) {
        for (int64_t c = 7; c < n; c += n / 7 + 13) columns.push_back(c);
      }
      for (int64_t i = 0; i < n; ++i) add(&s.q, i, u, amplitude);
      for (int64_t c : columns) add(&s.k, c, u, amplitude);
      if (kind == Planted::kSinkLocal) {
        // Local window of 128 to 191 keys, wider than the diagonals vertical-slash candidates
        // keep: a code per 64-token chunk; keys carry their chunk's code, queries their own
        // chunk's and the two previous chunks' codes.
        std::vector<std::vector<float>> code(n / kLocalChunk + 1);
        for (auto& c : code) c = unit();
        for (int64_t i = 0; i < n; ++i) {
          add(&s.k, i, code[i / kLocalChunk], amplitude);
          for (int64_t chunk = std::max<int64_t>(0, i / kLocalChunk - 2); chunk <= i / kLocalChunk;
               ++chunk) {
            add(&s.q, i, code[chunk], amplitude);
          }
        }
      }
      break;
    }
    case Planted::kSlash: {
      // Query i attends to key i - o for o in the planted offsets: key j carries code e_j and
      // query i carries the sum of e_{i-o}.
      std::vector<std::vector<float>> code(n);
      for (auto& c : code) c = unit();
      for (int64_t j = 0; j < n; ++j) add(&s.k, j, code[j], amplitude);
      if (slash_offsets.empty()) slash_offsets = {0, n / 5 + 3, n / 2 + 1};
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t o : slash_offsets) {
          if (i - o >= 0) add(&s.q, i, code[i - o], amplitude);
        }
      }
      break;
    }
    case Planted::kBlock: {
      // Each query block attends to one earlier key block (and itself).
      const int64_t blocks = (n + kBlockSize - 1) / kBlockSize;
      for (int64_t b = 1; b < blocks; ++b) {
        const std::vector<float> u = unit();
        const int64_t target = static_cast<int64_t>((*rng)() % b);
        for (int64_t r = b * kBlockSize; r < std::min(n, (b + 1) * kBlockSize); ++r) {
          add(&s.q, r, u, amplitude);
        }
        for (int64_t r = target * kBlockSize; r < (target + 1) * kBlockSize; ++r) {
          add(&s.k, r, u, amplitude);
        }
      }
      break;
    }
  }
  return s;
}

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_SPARSE_PLANTED_H_
