#ifndef SPARSEACCEL_DECODE_SERVICE_DECODE_ENGINE_H_
#define SPARSEACCEL_DECODE_SERVICE_DECODE_ENGINE_H_

// Continuous batching over the model's paged KV pool (SequenceModel: host blocks on the CPU
// engine, the device pool on the GPU engine): every admitted sequence reserves pool blocks for
// its prompt plus its whole token budget (so decoding never runs out mid-way), and one
// scheduler thread steps all running sequences together, one token each per model call, the
// model sampling the next tokens. Sequences join and leave between steps. No network: the gRPC
// layer feeds the prompt's KV cache in and reads tokens out.

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
#include "model/sequence_model.h"

namespace sparseaccel {

// One scheduler step, for metrics: the model call (every running sequence of the batch, one
// token each, sampled on the model's device) and the time from the previous step's start.
struct DecodeStepTiming {
  int64_t batch = 0;
  double model_seconds = 0;
  // 0 for the first step after the scheduler had nothing to run.
  double interval_seconds = 0;
};

struct DecodeEngineOptions {
  // Sequences stepped together per model call (more wait their turn, round robin); at most what
  // the model takes in one step (LlamaCudaOptions::max_decode_batch on the GPU engine).
  int64_t max_batch = 32;
  // Requests allowed to wait for KV blocks; beyond that, ResourceExhausted at once.
  int64_t max_waiting = 64;
  // Called on the scheduler thread after every step (must not block).
  std::function<void(const DecodeStepTiming&)> on_step;
};

class DecodeEngine;

// One sequence, shared by its request handler and the scheduler. The last reference ends the
// model's sequence and returns its reserved blocks.
class DecodeSequence {
 public:
  ~DecodeSequence();
  DecodeSequence(const DecodeSequence&) = delete;
  DecodeSequence& operator=(const DecodeSequence&) = delete;

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
  DecodeSequence(DecodeEngine* engine, int64_t id, int64_t blocks)
      : engine_(engine), id_(id), blocks_(blocks) {}
  void Push(int32_t token);
  void Finish(absl::Status status);
  bool cancelled() const;

  DecodeEngine* const engine_;
  const int64_t id_;      // The model's sequence.
  const int64_t blocks_;  // Reserved for it.
  // Scheduler-only state.
  int32_t last_token_ = 0;
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
  // `model` outlives the engine and every sequence it admitted.
  DecodeEngine(SequenceModel* model, DecodeEngineOptions options);
  ~DecodeEngine();

  // A model sequence for a prompt of `prompt_tokens` positions, with pool blocks reserved for
  // `prompt_tokens + max_new_tokens`. Waits for blocks (bounded queue) until `deadline` or
  // until `cancelled()` is true. ResourceExhausted when the queue is full or the request could
  // never fit; DeadlineExceeded / Cancelled otherwise.
  absl::StatusOr<std::shared_ptr<DecodeSequence>> Admit(int64_t prompt_tokens,
                                                        int64_t max_new_tokens, absl::Time deadline,
                                                        const std::function<bool()>& cancelled);

  // Writes received K/V rows of positions [first, first + count) of `layer` of the prompt into
  // the sequence (SequenceModel::WriteKv).
  absl::Status WriteKv(DecodeSequence* sequence, int64_t layer, int64_t first, int64_t count,
                       KvDtype dtype, const void* k, const void* v);

  // Returns once the rows of every WriteKv call are in the pool (SequenceModel::FinishImport).
  absl::Status FinishImport(DecodeSequence* sequence);

  // Begins decoding after the prompt: `last_token` (the first generated token) follows it; up
  // to `max_new_tokens` more tokens are produced.
  void Start(std::shared_ptr<DecodeSequence> sequence, int32_t last_token,
             const SamplingParams& sampling, int64_t max_new_tokens);

  const SequenceModel& model() const { return *model_; }
  // Pool blocks in all, and not reserved by an admitted sequence.
  int64_t num_blocks() const { return model_->kv_pool_blocks(); }
  int64_t free_blocks() const;
  int64_t running() const;
  int64_t waiting() const;

 private:
  friend class DecodeSequence;
  // Ends the model's sequence and returns its reservation (from ~DecodeSequence).
  void Release(int64_t id, int64_t blocks);
  void SchedulerLoop();

  SequenceModel* model_;
  const DecodeEngineOptions options_;
  mutable absl::Mutex mu_;
  int64_t reserved_blocks_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::shared_ptr<DecodeSequence>> running_ ABSL_GUARDED_BY(mu_);
  size_t next_ ABSL_GUARDED_BY(mu_) = 0;  // Round-robin start when running_ > max_batch.
  int64_t waiting_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread scheduler_;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_DECODE_SERVICE_DECODE_ENGINE_H_
