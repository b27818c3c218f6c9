#ifndef SPARSEACCEL_MODEL_CUDA_GEMM_CUH_
#define SPARSEACCEL_MODEL_CUDA_GEMM_CUH_

// The engine's linear layers through cuBLASLt: bf16 operands, fp32 accumulation and scaling,
// bf16 or fp32 output. The algorithm for a shape is picked by cuBLASLt's heuristic the first
// time that shape is seen and cached, so steady-state calls do no planning.

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "absl/status/statusor.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/device_memory.h"

namespace sparseaccel {

class LtGemm {
 public:
  static absl::StatusOr<std::unique_ptr<LtGemm>> Create(size_t workspace_bytes = 32 << 20);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // out[m][n] = x[m][k] * w[n][k]^T (+ out[m][n] when `accumulate`): a PyTorch Linear with the
  // weight in its [out_features][in_features] layout. x and w are bf16 (raw bits); row strides
  // are the row lengths. `out` is bf16 or fp32 (out_type CUDA_R_16BF / CUDA_R_32F) and may not
  // overlap x or w.
  absl::Status Linear(const uint16_t* x, const uint16_t* w, void* out, cudaDataType_t out_type,
                      int64_t m, int64_t n, int64_t k, bool accumulate, cudaStream_t stream);

  // Shapes planned so far (tests check the cache is used).
  size_t num_plans() const { return plans_.size(); }

 private:
  struct Plan;
  using Key = std::tuple<int64_t, int64_t, int64_t, int>;
  LtGemm() = default;
  absl::StatusOr<const Plan*> PlanFor(int64_t m, int64_t n, int64_t k, cudaDataType_t out_type);

  cublasLtHandle_t handle_ = nullptr;
  cuda::DeviceBuffer workspace_;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_CUDA_GEMM_CUH_
