#include "decode_service/decode_engine.h"

#include <algorithm>
#include <chrono>
#include <iterator>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace sparseaccel {

DecodeSequence::Event DecodeSequence::WaitNext(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(
                           +[](DecodeSequence* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) {
                             return !s->tokens_.empty() || s->finished_;
                           },
                           this),
                       timeout);
  Event event;
  if (!tokens_.empty()) {
    event.kind = Event::Kind::kToken;
    event.token = tokens_.front();
    tokens_.pop_front();
  } else if (finished_) {
    event.kind = Event::Kind::kFinished;
    event.status = status_;
  }
  return event;
}

void DecodeSequence::Cancel() {
  absl::MutexLock lock(&mu_);
  cancelled_ = true;
}

bool DecodeSequence::cancelled() const {
  absl::MutexLock lock(&mu_);
  return cancelled_;
}

void DecodeSequence::Push(int32_t token) {
  absl::MutexLock lock(&mu_);
  tokens_.push_back(token);
}

void DecodeSequence::Finish(absl::Status status) {
  absl::MutexLock lock(&mu_);
  finished_ = true;
  status_ = std::move(status);
}

DecodeSequence::~DecodeSequence() { engine_->Release(id_, blocks_); }

DecodeEngine::DecodeEngine(SequenceModel* model, DecodeEngineOptions options)
    : model_(model), options_(options), scheduler_([this] { SchedulerLoop(); }) {}

DecodeEngine::~DecodeEngine() {
  std::vector<std::shared_ptr<DecodeSequence>> stopped;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  scheduler_.join();
  {
    absl::MutexLock lock(&mu_);
    stopped.swap(running_);
  }
  // Outside the lock: a last reference releases its sequence through Release().
  for (auto& sequence : stopped) sequence->Finish(absl::UnavailableError("decode engine stopped"));
}

int64_t DecodeEngine::free_blocks() const {
  absl::MutexLock lock(&mu_);
  return model_->kv_pool_blocks() - reserved_blocks_;
}

int64_t DecodeEngine::running() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(running_.size());
}

int64_t DecodeEngine::waiting() const {
  absl::MutexLock lock(&mu_);
  return waiting_;
}

absl::StatusOr<std::shared_ptr<DecodeSequence>> DecodeEngine::Admit(
    int64_t prompt_tokens, int64_t max_new_tokens, absl::Time deadline,
    const std::function<bool()>& cancelled) {
  // Every admitted sequence holds at most its reservation (blocks are taken as positions are
  // reached), so reservations that fit the pool never leave a running sequence without room.
  const int64_t total_tokens = prompt_tokens + max_new_tokens;
  const int64_t block_tokens = model_->kv_block_tokens();
  const int64_t pool_blocks = model_->kv_pool_blocks();
  const int64_t blocks = (total_tokens + block_tokens - 1) / block_tokens;
  if (blocks > pool_blocks) {
    return absl::ResourceExhaustedError(absl::StrCat(total_tokens, " tokens need ", blocks,
                                                     " KV blocks; the pool has ", pool_blocks));
  }
  {
    absl::MutexLock lock(&mu_);
    auto fits = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return reserved_blocks_ + blocks <= pool_blocks;
    };
    if (!fits()) {
      if (waiting_ >= options_.max_waiting) {
        return absl::ResourceExhaustedError(
            absl::StrCat("KV cache full and ", waiting_, " requests already waiting; retry later"));
      }
      ++waiting_;
      // Woken when blocks are released; polls `cancelled` since nothing signals it.
      while (!fits()) {
        if (cancelled()) {
          --waiting_;
          return absl::CancelledError("cancelled while waiting for KV cache space");
        }
        const absl::Time now = absl::Now();
        if (now >= deadline) {
          --waiting_;
          return absl::DeadlineExceededError("deadline passed while waiting for KV cache space");
        }
        mu_.AwaitWithTimeout(absl::Condition(&fits),
                             std::min(absl::Milliseconds(5), deadline - now));
      }
      --waiting_;
    }
    reserved_blocks_ += blocks;
  }
  absl::StatusOr<int64_t> id = model_->ImportSequence(prompt_tokens);
  if (!id.ok()) {
    absl::MutexLock lock(&mu_);
    reserved_blocks_ -= blocks;
    return id.status();
  }
  return std::shared_ptr<DecodeSequence>(new DecodeSequence(this, *id, blocks));
}

void DecodeEngine::Release(int64_t id, int64_t blocks) {
  const absl::Status ended = model_->EndSequence(id);
  if (!ended.ok()) LogError("decode.end_sequence_failed", {{"error", ended.ToString()}});
  absl::MutexLock lock(&mu_);
  reserved_blocks_ -= blocks;
}

absl::Status DecodeEngine::WriteKv(DecodeSequence* sequence, int64_t layer, int64_t first,
                                   int64_t count, KvDtype dtype, const void* k, const void* v) {
  return model_->WriteKv(sequence->id_, layer, first, count, dtype, k, v);
}

absl::Status DecodeEngine::FinishImport(DecodeSequence* sequence) {
  return model_->FinishImport(sequence->id_);
}

void DecodeEngine::Start(std::shared_ptr<DecodeSequence> sequence, int32_t last_token,
                         const SamplingParams& sampling, int64_t max_new_tokens) {
  sequence->last_token_ = last_token;
  sequence->sampling_ = sampling;
  sequence->remaining_ = max_new_tokens;
  if (max_new_tokens <= 0) {
    sequence->Finish(absl::OkStatus());
    return;
  }
  absl::MutexLock lock(&mu_);
  running_.push_back(std::move(sequence));
}

void DecodeEngine::SchedulerLoop() {
  std::vector<std::shared_ptr<DecodeSequence>> batch, dropped;
  std::vector<int64_t> ids;
  std::vector<int32_t> tokens, next;
  std::vector<SamplingParams> params;
  std::vector<uint64_t> steps;
  // Start of the previous step while sequences kept running (none after an idle wait).
  std::optional<std::chrono::steady_clock::time_point> previous_start;
  while (true) {
    batch.clear();
    // Dropped sequences may hold the last reference: release them outside the lock.
    dropped.clear();
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(
                               +[](DecodeEngine* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(e->mu_) {
                                 return e->stopping_ || !e->running_.empty();
                               },
                               this),
                           absl::Milliseconds(100));
      if (stopping_) return;
      // Drop cancelled sequences; their handlers already gave up on them.
      auto cancelled = std::stable_partition(running_.begin(), running_.end(),
                                             [](const auto& s) { return !s->cancelled(); });
      for (auto it = cancelled; it != running_.end(); ++it) {
        (*it)->Finish(absl::CancelledError("cancelled"));
        dropped.push_back(std::move(*it));
      }
      running_.erase(cancelled, running_.end());
      const size_t n = running_.size();
      if (n == 0) {
        previous_start.reset();
        continue;
      }
      const size_t take = std::min<size_t>(n, options_.max_batch);
      if (next_ >= n) next_ = 0;
      for (size_t i = 0; i < take; ++i) batch.push_back(running_[(next_ + i) % n]);
      next_ = (next_ + take) % n;
    }
    ids.clear();
    tokens.clear();
    params.clear();
    steps.clear();
    for (const auto& s : batch) {
      ids.push_back(s->id_);
      tokens.push_back(s->last_token_);
      params.push_back(s->sampling_);
      steps.push_back(s->step_);
    }
    const auto start = std::chrono::steady_clock::now();
    const absl::Status status = model_->DecodeAndSample(ids, tokens, params, steps, &next);
    if (options_.on_step) {
      const auto end = std::chrono::steady_clock::now();
      DecodeStepTiming timing;
      timing.batch = static_cast<int64_t>(batch.size());
      timing.model_seconds = std::chrono::duration<double>(end - start).count();
      if (previous_start) {
        timing.interval_seconds = std::chrono::duration<double>(start - *previous_start).count();
      }
      options_.on_step(timing);
    }
    previous_start = start;
    if (!status.ok()) LogError("decode.step_failed", {{"error", status.ToString()}});
    std::vector<DecodeSequence*> done;
    for (size_t i = 0; i < batch.size(); ++i) {
      DecodeSequence* s = batch[i].get();
      if (!status.ok()) {
        s->Finish(status);
        done.push_back(s);
        continue;
      }
      ++s->step_;
      s->last_token_ = next[i];
      s->Push(next[i]);
      if (--s->remaining_ == 0) {
        s->Finish(absl::OkStatus());
        done.push_back(s);
      }
    }
    if (!done.empty()) {
      absl::MutexLock lock(&mu_);
      auto finished = std::stable_partition(running_.begin(), running_.end(), [&](const auto& s) {
        return std::find(done.begin(), done.end(), s.get()) == done.end();
      });
      std::move(finished, running_.end(), std::back_inserter(dropped));
      running_.erase(finished, running_.end());
    }
    // Drop this step's references now, so finished sequences free their blocks at once.
    batch.clear();
    dropped.clear();
  }
}

}  // namespace sparseaccel
