#ifndef SPARSEACCEL_MODEL_HOST_SEQUENCE_MODEL_H_
#define SPARSEACCEL_MODEL_HOST_SEQUENCE_MODEL_H_

// SequenceModel over any LanguageModel: each sequence's K/V in fp32 blocks of a host
// KvBlockPool (bf16 rows are widened as they arrive), one LanguageModel::Forward per step,
// next tokens sampled with SampleTokenCpu. The CPU engine's decode path.

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "model/kv_cache.h"
#include "model/language_model.h"
#include "model/sequence_model.h"

namespace sparseaccel {

class HostSequenceModel : public SequenceModel {
 public:
  // Over `model` (not owned).
  HostSequenceModel(LanguageModel* model, int64_t block_tokens, int64_t num_blocks);
  // Over `model`, owned.
  HostSequenceModel(std::unique_ptr<LanguageModel> model, int64_t block_tokens,
                    int64_t num_blocks);

  const ModelConfig& config() const override { return model_->config(); }
  KvShape kv_shape() const override { return model_->kv_shape(); }
  int64_t kv_block_tokens() const override { return pool_.block_tokens(); }
  int64_t kv_pool_blocks() const override { return pool_.num_blocks(); }
  int64_t kv_block_bytes() const override { return pool_.BytesPerBlock(); }

  absl::StatusOr<int64_t> ImportSequence(int64_t length) override;
  absl::Status WriteKv(int64_t id, int64_t layer, int64_t first, int64_t count, KvDtype dtype,
                       const void* k, const void* v) override;
  absl::Status DecodeAndSample(absl::Span<const int64_t> ids, absl::Span<const int32_t> tokens,
                               absl::Span<const SamplingParams> params,
                               absl::Span<const uint64_t> steps,
                               std::vector<int32_t>* next) override;
  absl::Status EndSequence(int64_t id) override;

  // Blocks of the host pool not held by any sequence.
  int64_t free_blocks() const { return pool_.free_blocks(); }

 private:
  struct Sequence {
    explicit Sequence(KvBlockPool* pool) : kv(pool) {}
    PagedKvStore kv;
    int64_t length = 0;
  };
  // The sequence `id`, or NotFound. Entries stay put until EndSequence, and the caller uses
  // one sequence from one thread at a time, so the pointer is used without the lock.
  absl::StatusOr<Sequence*> Find(int64_t id);

  std::unique_ptr<LanguageModel> owned_;
  LanguageModel* const model_;
  KvBlockPool pool_;
  absl::Mutex mu_;
  std::map<int64_t, std::unique_ptr<Sequence>> sequences_ ABSL_GUARDED_BY(mu_);
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_HOST_SEQUENCE_MODEL_H_
