#ifndef SPARSEACCEL_MODEL_LLAMA_CPU_H_
#define SPARSEACCEL_MODEL_LLAMA_CPU_H_

// The reference Llama forward pass on the CPU, in fp32: embedding, RMSNorm, RoPE (with llama3
// scaling), GQA attention over a KvStore, SwiGLU MLP, final norm, LM head. GEMMs through
// OpenBLAS, the rest multi-threaded with OpenMP. Every GPU kernel and service test is checked
// against this.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/attention.h"
#include "model/checkpoint/config.h"
#include "model/kv_cache.h"
#include "model/language_model.h"

namespace sparseaccel {

// Replaces the dense attention of some layers/heads (sparse prefill plugs in here). Attend
// computes `out` for `n` query rows at positions start_pos.. against `kv` (already holding this
// chunk's keys), or returns false to let the dense path run.
class AttentionOverride {
 public:
  virtual ~AttentionOverride() = default;
  virtual absl::StatusOr<bool> Attend(int64_t layer, const float* q, int64_t n, int64_t start_pos,
                                      const AttentionShape& shape, const KvLayerView& kv,
                                      float* out) = 0;
};

struct LlamaCpuOptions {
  // Tensor-parallel shards, computed one after the other in this process: shard r holds query
  // heads [r H/N, (r+1) H/N), their KV heads, the same slice of the MLP's intermediate columns
  // and the matching columns of o_proj and down_proj; the shards' partial outputs of o_proj
  // and of down_proj are summed (the all-reduce of a multi-GPU run) before the residual add.
  // Heads, KV heads and intermediate_size must divide by it. The KV cache layout is the same
  // for every N. With an AttentionOverride installed it must be 1.
  int64_t tensor_parallel = 1;
};

class LlamaCpu : public LanguageModel {
 public:
  // Loads config.json and the safetensors weights of `model_dir` (converted to fp32).
  static absl::StatusOr<std::unique_ptr<LlamaCpu>> Load(const std::string& model_dir,
                                                        const LlamaCpuOptions& options = {});

  const ModelConfig& config() const override;
  KvShape kv_shape() const override;

  // Rows of all chunks are concatenated for the GEMMs; attention runs per chunk.
  absl::Status Forward(absl::Span<const SequenceChunk> batch, std::vector<float>* logits) override;
  ~LlamaCpu() override;

  // Not owned; nullptr (the default) runs dense attention everywhere.
  void SetAttentionOverride(AttentionOverride* attention);

 private:
  struct Weights;
  LlamaCpu();
  // One layer's attention or MLP over all shards, the partials summed into `x`.
  absl::Status AttentionBlock(int64_t layer, absl::Span<const SequenceChunk> batch,
                              const std::vector<int64_t>& positions, std::vector<float>* x);
  void MlpBlock(int64_t layer, std::vector<float>* x);

  ModelConfig config_;
  int64_t shards_ = 1;
  std::unique_ptr<Weights> weights_;
  AttentionOverride* attention_ = nullptr;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_LLAMA_CPU_H_
