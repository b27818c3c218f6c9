#ifndef SPARSEACCEL_KERNELS_PARALLEL_H_
#define SPARSEACCEL_KERNELS_PARALLEL_H_

#include <cstdint>

namespace sparseaccel {

// Below this many elements (or multiply-adds) a loop runs on the calling thread. Decode steps are
// made of such loops, and an OpenMP fork/join for each can cost far more than the work: on a
// loaded machine a barrier whose partner thread is descheduled spins for milliseconds. Measured
// on a busy 2-core box, per decoded token: tiny test model 1-90 ms with a fork/join per loop,
// 0.2-0.8 ms without; a 150M-parameter model 810-970 ms before, 230-300 ms after.
inline constexpr int64_t kMinParallelWork = int64_t{1} << 16;

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_PARALLEL_H_
