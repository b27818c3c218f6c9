#ifndef SPARSEACCEL_DECODE_SERVICE_DECODE_ENGINE_H_
#define SPARSEACCEL_DECODE_SERVICE_DECODE_ENGINE_H_

// Continuous batching over a paged KV cache: every admitted sequence holds blocks of one
// preallocated pool for its prompt plus its whole token budget (so decoding never runs out
// mid-way), and one scheduler thread steps all running sequences together, one token each per
// model call. Sequences join and leave between steps. No network: the gRPC layer feeds the
// prompt's KV cache in and reads tokens out.

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kernels/sampling.h"
#include "model/kv_cache.h"
#include "model/language_model.h"

namespace sparseaccel {

struct DecodeEngineOptions {
  int64_t block_tokens = 16;
  int64_t num_blocks = 4096;
  // Sequences stepped together per model call (more wait their turn, round robin).
  int64_t max_batch = 32;
  // Requests allowed to wait for KV blocks; beyond that, ResourceExhausted at once.
  int64_t max_waiting = 64;
};

// One sequence, shared by its request handler and the scheduler.
class DecodeSequence {
 public:
  explicit DecodeSequence(KvBlockPool* pool) : kv_(pool) {}
  DecodeSequence(const DecodeSequence&) = delete;
  DecodeSequence& operator=(const DecodeSequence&) = delete;

  PagedKvStore* kv() { return &kv_; }

  // What WaitNext saw: a token, the end (ok or an error), or nothing before the timeout.
  struct Event {
    enum class Kind { kToken, kFinished, kTimeout } kind = Kind::kTimeout;
    int32_t token = 0;
    absl::Status status;
  };
  Event WaitNext(absl::Duration timeout);

  // Asks the scheduler to drop the sequence; its KV blocks return to the pool once the handler
  // releases its reference too.
  void Cancel();

 private:
  friend class DecodeEngine;
  void Push(int32_t token);
  void Finish(absl::Status status);
  bool cancelled() const;

  PagedKvStore kv_;
  // Scheduler-only state.
  int32_t last_token_ = 0;
  int64_t position_ = 0;
  uint64_t step_ = 1;  // Draw 0 sampled the first token on the prefill side.
  int64_t remaining_ = 0;
  SamplingParams sampling_;

  mutable absl::Mutex mu_;
  std::deque<int32_t> tokens_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
};

class DecodeEngine {
 public:
  DecodeEngine(LanguageModel* model, DecodeEngineOptions options);
  ~DecodeEngine();

  // A sequence with KV blocks reserved for `total_tokens` positions. Waits for free blocks
  // (bounded queue) until `deadline` or until `cancelled()` is true. ResourceExhausted when the
  // queue is full or the request could never fit; DeadlineExceeded / Cancelled otherwise.
  absl::StatusOr<std::shared_ptr<DecodeSequence>> Admit(int64_t total_tokens, absl::Time deadline,
                                                        const std::function<bool()>& cancelled);

  // Copies received fp32 K/V rows of positions [first, first + count) of `layer` into the
  // sequence's cache (positions must be within what Admit reserved).
  absl::Status WriteKv(DecodeSequence* sequence, int64_t layer, int64_t first, int64_t count,
                       const float* k, const float* v);

  // Begins decoding after the prompt: `last_token` (the first generated token) sits at
  // `position`; up to `max_new_tokens` more tokens are produced.
  void Start(std::shared_ptr<DecodeSequence> sequence, int32_t last_token, int64_t position,
             const SamplingParams& sampling, int64_t max_new_tokens);

  const KvBlockPool& pool() const { return pool_; }
  int64_t running() const;
  int64_t waiting() const;

 private:
  void SchedulerLoop();

  LanguageModel* model_;
  const DecodeEngineOptions options_;
  KvBlockPool pool_;
  mutable absl::Mutex mu_;
  std::vector<std::shared_ptr<DecodeSequence>> running_ ABSL_GUARDED_BY(mu_);
  size_t next_ ABSL_GUARDED_BY(mu_) = 0;  // Round-robin start when running_ > max_batch.
  int64_t waiting_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread scheduler_;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_DECODE_SERVICE_DECODE_ENGINE_H_
