#include "model/backend.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/host_sequence_model.h"
#include "model/llama_cpu.h"
#include "model/sparse/sparse_prefill.h"
#ifdef SPARSEACCEL_WITH_CUDA
#include "model/cuda/llama_cuda.h"
#endif

namespace sparseaccel {
namespace {

// LlamaCpu with a SparsePrefillAttention installed; owns both.
class SparseLlamaCpu : public LanguageModel {
 public:
  SparseLlamaCpu(std::unique_ptr<LlamaCpu> model, std::unique_ptr<SparsePrefillAttention> sparse)
      : model_(std::move(model)), sparse_(std::move(sparse)) {
    model_->SetAttentionOverride(sparse_.get());
  }
  const ModelConfig& config() const override { return model_->config(); }
  KvShape kv_shape() const override { return model_->kv_shape(); }
  absl::Status Forward(absl::Span<const SequenceChunk> batch, std::vector<float>* logits) override {
    return model_->Forward(batch, logits);
  }

 private:
  std::unique_ptr<LlamaCpu> model_;
  std::unique_ptr<SparsePrefillAttention> sparse_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<LanguageModel>> LoadLanguageModel(const std::string& device,
                                                                 const std::string& model_dir,
                                                                 std::optional<SparseConfig> sparse,
                                                                 int64_t gpus) {
  if (gpus != 0 && device != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("--gpus ", gpus, " needs --device=cuda"));
  }
  if (device == "cpu") {
    ASSIGN_OR_RETURN(std::unique_ptr<LlamaCpu> model, LlamaCpu::Load(model_dir));
    if (!sparse.has_value()) return std::unique_ptr<LanguageModel>(std::move(model));
    ASSIGN_OR_RETURN(std::unique_ptr<SparsePrefillAttention> attention,
                     SparsePrefillAttention::Create(model->config(), *std::move(sparse)));
    return std::unique_ptr<LanguageModel>(
        std::make_unique<SparseLlamaCpu>(std::move(model), std::move(attention)));
  }
  if (device == "cuda") {
#ifdef SPARSEACCEL_WITH_CUDA
    LlamaCudaOptions options;
    options.sparse = std::move(sparse);
    options.gpus = gpus;
    ASSIGN_OR_RETURN(std::unique_ptr<LlamaCuda> model, LlamaCuda::Load(model_dir, options));
    return std::unique_ptr<LanguageModel>(std::move(model));
#else
    return absl::UnimplementedError("--device=cuda: this build has no CUDA backend (no nvcc)");
#endif
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown --device '", device, "' (cpu, cuda)"));
}

std::unique_ptr<HostMemoryPinner> NewHostMemoryPinner(const std::string& device) {
#ifdef SPARSEACCEL_WITH_CUDA
  if (device == "cuda") return LlamaCuda::NewHostMemoryPinner();
#endif
  (void)device;
  return nullptr;
}

absl::StatusOr<std::unique_ptr<SequenceModel>> LoadSequenceModel(
    const std::string& device, const std::string& model_dir, const SequencePoolOptions& options) {
  if (options.block_tokens <= 0 || options.num_blocks <= 0 || options.max_batch <= 0) {
    return absl::InvalidArgumentError("KV pool block size, block count and batch must be positive");
  }
#ifdef SPARSEACCEL_WITH_CUDA
  if (device == "cuda") {
    LlamaCudaOptions cuda_options;
    cuda_options.kv_pool_tokens = options.block_tokens * options.num_blocks;
    cuda_options.kv_block_tokens = options.block_tokens;
    cuda_options.max_decode_batch = options.max_batch;
    ASSIGN_OR_RETURN(std::unique_ptr<LlamaCuda> model, LlamaCuda::Load(model_dir, cuda_options));
    return std::unique_ptr<SequenceModel>(std::move(model));
  }
#endif
  ASSIGN_OR_RETURN(std::unique_ptr<LanguageModel> model, LoadLanguageModel(device, model_dir));
  return std::unique_ptr<SequenceModel>(std::make_unique<HostSequenceModel>(
      std::move(model), options.block_tokens, options.num_blocks));
}

}  // namespace sparseaccel
