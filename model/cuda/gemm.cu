#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/cuda/gemm.cuh"

namespace sparseaccel {
namespace {

absl::Status LtStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cuBLASLt status ", static_cast<int>(status)));
}

#define LT_RETURN_IF_ERROR(expr)                       \
  do {                                                 \
    absl::Status lt_status_ = LtStatus((expr), #expr); \
    if (!lt_status_.ok()) return lt_status_;           \
  } while (0)

}  // namespace

// Column-major view of the row-major product: out^T [n x m] = w [k x n]^T * x^T [k x m], so
// cuBLASLt sees A = w (transposed), B = x, D = out, every leading dimension the row length.
struct LtGemm::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo;
  ~Plan() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

absl::StatusOr<std::unique_ptr<LtGemm>> LtGemm::Create(size_t workspace_bytes) {
  std::unique_ptr<LtGemm> gemm(new LtGemm());
  LT_RETURN_IF_ERROR(cublasLtCreate(&gemm->handle_));
  absl::Status status = gemm->workspace_.Reserve(workspace_bytes);
  if (!status.ok()) return status;
  return gemm;
}

LtGemm::~LtGemm() {
  plans_.clear();
  if (handle_) cublasLtDestroy(handle_);
}

absl::StatusOr<const LtGemm::Plan*> LtGemm::PlanFor(int64_t m, int64_t n, int64_t k,
                                                    cudaDataType_t out_type) {
  const Key key{m, n, k, static_cast<int>(out_type)};
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second.get();
  auto plan = std::make_unique<Plan>();
  LT_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t transpose = CUBLAS_OP_T;
  LT_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA,
                                                    &transpose, sizeof(transpose)));
  LT_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, k, n, k));
  LT_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, k, m, k));
  LT_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->d, out_type, n, m, n));
  cublasLtMatmulPreference_t preference = nullptr;
  LT_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&preference));
  const size_t workspace_bytes = workspace_.bytes();
  cublasStatus_t set =
      cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                           &workspace_bytes, sizeof(workspace_bytes));
  cublasLtMatmulHeuristicResult_t result = {};
  int returned = 0;
  cublasStatus_t heuristic =
      set != CUBLAS_STATUS_SUCCESS
          ? set
          : cublasLtMatmulAlgoGetHeuristic(handle_, plan->op, plan->a, plan->b, plan->d, plan->d,
                                           preference, 1, &result, &returned);
  cublasLtMatmulPreferenceDestroy(preference);
  LT_RETURN_IF_ERROR(heuristic);
  if (returned == 0) {
    return absl::InternalError(
        absl::StrCat("cuBLASLt has no algorithm for m=", m, " n=", n, " k=", k));
  }
  plan->algo = result.algo;
  const Plan* planned = plan.get();
  plans_.emplace(key, std::move(plan));
  return planned;
}

absl::Status LtGemm::Linear(const uint16_t* x, const uint16_t* w, void* out,
                            cudaDataType_t out_type, int64_t m, int64_t n, int64_t k,
                            bool accumulate, cudaStream_t stream) {
  if (m <= 0 || n <= 0 || k <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("bad GEMM shape m=", m, " n=", n, " k=", k));
  }
  ASSIGN_OR_RETURN(const Plan* const plan, PlanFor(m, n, k, out_type));
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  LT_RETURN_IF_ERROR(cublasLtMatmul(handle_, plan->op, &alpha, w, plan->a, x, plan->b, &beta, out,
                                    plan->d, out, plan->d, &plan->algo, workspace_.As<void>(),
                                    workspace_.bytes(), stream));
  return absl::OkStatus();
}

}  // namespace sparseaccel
