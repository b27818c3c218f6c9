#ifndef SPARSEACCEL_COMMON_COUNTER_RANDOM_H_
#define SPARSEACCEL_COMMON_COUNTER_RANDOM_H_

// Counter-based random bits, the same on the host and in CUDA kernels: every value is a pure
// function of its key and counter, so work split over threads, shards or devices draws exactly
// what one thread drawing in order would (seeded sampling, random checkpoints).

#include <cstdint>

#include "common/host_device.h"

namespace sparseaccel {

// splitmix64's finalizer: a bijective mix of 64 bits.
SPARSEACCEL_HOST_DEVICE constexpr uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Draw `step` of the stream `seed`, uniform in [0, 1) with 53 random bits.
SPARSEACCEL_HOST_DEVICE constexpr double CounterUniform(uint64_t seed, uint64_t step) {
  return static_cast<double>(SplitMix64(SplitMix64(seed) ^ step) >> 11) *
         (1.0 / 9007199254740992.0);
}

}  // namespace sparseaccel

#endif  // SPARSEACCEL_COMMON_COUNTER_RANDOM_H_
