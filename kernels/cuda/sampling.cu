// Token sampling on the GPU, the twin of SampleTokenCpu. Greedy rows take a block argmax.
// Sampled rows need the candidates in the CPU's order (logit descending, ties to the lower
// id): a stable segmented radix sort of (logit, id) pairs gives exactly that order; then one
// block per row forms the weights exp((logit - max) / T) in double over the top-k prefix,
// finds the top-p cut and the drawn token with block-wide prefix sums.

#include <climits>
#include <cub/cub.cuh>
#include <vector>

#include "absl/status/statusor.h"
#include "common/counter_random.h"
#include "common/status_macros.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace sparseaccel {
namespace cuda {
namespace {

constexpr int kSampleThreads = 1024;

struct RowParams {
  float temperature;
  int32_t top_k;
  float top_p;
  int32_t greedy;
  uint64_t seed;
  uint64_t step;
};

size_t Align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Workspace: params, sorted logits, sorted ids, input ids, segment offsets, CUB scratch.
struct SampleLayout {
  size_t params = 0, sorted_logits = 0, sorted_ids = 0, ids = 0, offsets = 0, cub = 0;
  size_t cub_bytes = 0, total = 0;
};

absl::StatusOr<SampleLayout> LayoutFor(int64_t rows, int64_t vocab_size) {
  SampleLayout layout;
  const size_t items = static_cast<size_t>(rows * vocab_size);
  size_t at = 0;
  layout.params = at;
  at += Align256(rows * sizeof(RowParams));
  layout.sorted_logits = at;
  at += Align256(items * sizeof(float));
  layout.sorted_ids = at;
  at += Align256(items * sizeof(int32_t));
  layout.ids = at;
  at += Align256(items * sizeof(int32_t));
  layout.offsets = at;
  at += Align256((rows + 1) * sizeof(int32_t));
  layout.cub = at;
  CUDA_RETURN_IF_ERROR(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, layout.cub_bytes, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), static_cast<int>(items),
      static_cast<int>(rows), static_cast<const int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr)));
  layout.total = at + Align256(layout.cub_bytes);
  return layout;
}

__global__ void FillIdsKernel(int64_t rows, int64_t vocab_size, int32_t* ids, int32_t* offsets) {
  const int64_t count = rows * vocab_size;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    ids[i] = static_cast<int32_t>(i % vocab_size);
  }
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r <= rows;
       r += int64_t{gridDim.x} * blockDim.x) {
    offsets[r] = static_cast<int32_t>(r * vocab_size);
  }
}

using BlockScanDouble = cub::BlockScan<double, kSampleThreads>;
using BlockReduceDouble = cub::BlockReduce<double, kSampleThreads>;

struct SampleShared {
  union {
    BlockScanDouble::TempStorage scan;
    BlockReduceDouble::TempStorage reduce;
  } cub;
  double carry;
  double found_mass;
  int found;
  float best_logit[kSampleThreads / 32];
  int best_id[kSampleThreads / 32];
};

// First i in [0, count) whose prefix mass w(0) + .. + w(i) satisfies `hit(mass)` (count if
// none); *mass_at gets that prefix (the full sum if none). Prefix sums run over chunks of the
// block's width with a carried total.
template <typename Weight, typename Hit>
__device__ int64_t FirstPrefix(int64_t count, Weight weight, Hit hit, double* mass_at,
                               SampleShared& shared) {
  if (threadIdx.x == 0) {
    shared.carry = 0;
    shared.found = INT_MAX;
  }
  __syncthreads();
  for (int64_t base = 0; base < count; base += kSampleThreads) {
    const int64_t i = base + threadIdx.x;
    double prefix;
    BlockScanDouble(shared.cub.scan).InclusiveSum(i < count ? weight(i) : 0.0, prefix);
    prefix += shared.carry;
    const bool is_hit = i < count && hit(prefix);
    if (is_hit) atomicMin(&shared.found, static_cast<int>(threadIdx.x));
    __syncthreads();
    const int found = shared.found;
    if (found != INT_MAX) {
      if (threadIdx.x == found) shared.found_mass = prefix;
      __syncthreads();
      *mass_at = shared.found_mass;
      return base + found;
    }
    if (threadIdx.x == kSampleThreads - 1) shared.carry = prefix;
    __syncthreads();
  }
  *mass_at = shared.carry;
  return count;
}

__global__ void __launch_bounds__(kSampleThreads)
    SampleRowKernel(const float* logits, int64_t vocab_size, const RowParams* params,
                    const float* sorted_logits, const int32_t* sorted_ids, int32_t* tokens) {
  __shared__ SampleShared shared;
  const int64_t row = blockIdx.x;
  const RowParams p = params[row];
  if (p.greedy) {
    // Argmax with ties to the lowest id: each thread keeps its first maximum.
    const float* x = logits + row * vocab_size;
    float best = -INFINITY;
    int best_id = INT_MAX;
    for (int64_t i = threadIdx.x; i < vocab_size; i += kSampleThreads) {
      if (x[i] > best || best_id == INT_MAX) {
        best = x[i];
        best_id = static_cast<int>(i);
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(~0u, best, offset);
      const int other_id = __shfl_xor_sync(~0u, best_id, offset);
      if (other > best || (other == best && other_id < best_id)) {
        best = other;
        best_id = other_id;
      }
    }
    if (threadIdx.x % 32 == 0) {
      shared.best_logit[threadIdx.x / 32] = best;
      shared.best_id[threadIdx.x / 32] = best_id;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kSampleThreads / 32; ++w) {
        if (shared.best_logit[w] > best ||
            (shared.best_logit[w] == best && shared.best_id[w] < best_id)) {
          best = shared.best_logit[w];
          best_id = shared.best_id[w];
        }
      }
      tokens[row] = best_id;
    }
    return;
  }
  const float* sorted = sorted_logits + row * vocab_size;
  const int32_t* ids = sorted_ids + row * vocab_size;
  int64_t keep = p.top_k > 0 && p.top_k < vocab_size ? p.top_k : vocab_size;
  const double inv_t = 1.0 / p.temperature;
  const double max_logit = sorted[0];
  auto weight = [&](int64_t i) { return exp((sorted[i] - max_logit) * inv_t); };
  double total = 0;
  for (int64_t base = 0; base < keep; base += kSampleThreads) {
    const int64_t i = base + threadIdx.x;
    total += BlockReduceDouble(shared.cub.reduce).Sum(i < keep ? weight(i) : 0.0);
    __syncthreads();
  }
  if (threadIdx.x == 0) shared.carry = total;  // The reduction's result lives in thread 0.
  __syncthreads();
  total = shared.carry;
  __syncthreads();
  if (p.top_p < 1) {
    const double threshold = p.top_p * total;
    double mass;
    const int64_t last = FirstPrefix(
        keep, weight, [&](double prefix) { return prefix >= threshold; }, &mass, shared);
    keep = last < keep ? last + 1 : keep;
    total = mass;
  }
  const double target = CounterUniform(p.seed, p.step) * total;
  double mass;
  int64_t pick = FirstPrefix(
      keep, weight, [&](double prefix) { return target < prefix; }, &mass, shared);
  if (pick >= keep) pick = keep - 1;
  if (threadIdx.x == 0) tokens[row] = ids[pick];
}

}  // namespace

size_t SampleTokensWorkspaceBytes(int64_t rows, int64_t vocab_size) {
  const absl::StatusOr<SampleLayout> layout = LayoutFor(rows, vocab_size);
  return layout.ok() ? layout->total : 0;
}

absl::Status SampleTokens(const float* logits, int64_t rows, int64_t vocab_size,
                          const SamplingParams* params, const uint64_t* steps, void* workspace,
                          int32_t* tokens, void* stream) {
  if (rows < 0 || vocab_size <= 0 || rows * vocab_size > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("SampleTokens: bad shape rows=", rows, " vocab=", vocab_size));
  }
  if (rows == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(const SampleLayout layout, LayoutFor(rows, vocab_size));
  std::vector<RowParams> row_params(rows);
  bool any_sampled = false;
  for (int64_t r = 0; r < rows; ++r) {
    const SamplingParams& in = params[r];
    const bool greedy = in.temperature <= 0 || in.top_k == 1;
    if (!greedy && !(in.top_p > 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("SampleTokens: row ", r, ": top_p must be > 0, got ", in.top_p));
    }
    any_sampled |= !greedy;
    row_params[r] = {in.temperature, in.top_k, in.top_p, greedy ? 1 : 0, in.seed, steps[r]};
  }
  const cudaStream_t s = AsStream(stream);
  char* base = static_cast<char*>(workspace);
  auto* d_params = reinterpret_cast<RowParams*>(base + layout.params);
  auto* sorted_logits = reinterpret_cast<float*>(base + layout.sorted_logits);
  auto* sorted_ids = reinterpret_cast<int32_t*>(base + layout.sorted_ids);
  auto* ids = reinterpret_cast<int32_t*>(base + layout.ids);
  auto* offsets = reinterpret_cast<int32_t*>(base + layout.offsets);
  // From pageable memory: returns once row_params is staged, so the vector may go.
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d_params, row_params.data(), rows * sizeof(RowParams),
                                       cudaMemcpyHostToDevice, s));
  if (any_sampled) {
    FillIdsKernel<<<static_cast<int>(std::min<int64_t>(CeilDiv(rows * vocab_size, 256), 4096)), 256,
                    0, s>>>(rows, vocab_size, ids, offsets);
    RETURN_IF_LAUNCH_FAILED("FillIdsKernel");
    size_t cub_bytes = layout.cub_bytes;
    CUDA_RETURN_IF_ERROR(cub::DeviceSegmentedRadixSort::SortPairsDescending(
        base + layout.cub, cub_bytes, logits, sorted_logits, ids, sorted_ids,
        static_cast<int>(rows * vocab_size), static_cast<int>(rows), offsets, offsets + 1, 0, 32,
        s));
  }
  SampleRowKernel<<<static_cast<unsigned>(rows), kSampleThreads, 0, s>>>(
      logits, vocab_size, d_params, sorted_logits, sorted_ids, tokens);
  return LaunchStatus("SampleRowKernel");
}

}  // namespace cuda
}  // namespace sparseaccel
