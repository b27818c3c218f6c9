#include "decode_service/decode_engine.h"

#include <algorithm>
#include <cstring>

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

DecodeEngine::DecodeEngine(LanguageModel* model, DecodeEngineOptions options)
    : model_(model),
      options_(options),
      pool_(model->kv_shape(), options.block_tokens, options.num_blocks),
      scheduler_([this] { SchedulerLoop(); }) {}

DecodeEngine::~DecodeEngine() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  scheduler_.join();
  absl::MutexLock lock(&mu_);
  for (auto& sequence : running_) sequence->Finish(absl::UnavailableError("decode engine stopped"));
  running_.clear();
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
    int64_t total_tokens, absl::Time deadline, const std::function<bool()>& cancelled) {
  const int64_t blocks = (total_tokens + options_.block_tokens - 1) / options_.block_tokens;
  if (blocks > options_.num_blocks) {
    return absl::ResourceExhaustedError(absl::StrCat(
        total_tokens, " tokens need ", blocks, " KV blocks; the pool has ", options_.num_blocks));
  }
  auto sequence = std::make_shared<DecodeSequence>(&pool_);
  if (sequence->kv()->Reserve(total_tokens).ok()) return sequence;
  {
    absl::MutexLock lock(&mu_);
    if (waiting_ >= options_.max_waiting) {
      return absl::ResourceExhaustedError(
          absl::StrCat("KV cache full and ", waiting_, " requests already waiting; retry later"));
    }
    ++waiting_;
  }
  absl::Status status;
  // Blocks come back when other sequences end; poll, since they return from many places.
  while (true) {
    if (sequence->kv()->Reserve(total_tokens).ok()) break;
    if (cancelled()) {
      status = absl::CancelledError("cancelled while waiting for KV cache space");
      break;
    }
    if (absl::Now() >= deadline) {
      status = absl::DeadlineExceededError("deadline passed while waiting for KV cache space");
      break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  absl::MutexLock lock(&mu_);
  --waiting_;
  if (!status.ok()) return status;
  return sequence;
}

absl::Status DecodeEngine::WriteKv(DecodeSequence* sequence, int64_t layer, int64_t first,
                                   int64_t count, const float* k, const float* v) {
  const KvShape shape = pool_.shape();
  if (layer < 0 || layer >= shape.num_layers || first < 0 || count < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV rows out of range: layer ", layer, " positions ", first, "+", count));
  }
  const int64_t reserved =
      static_cast<int64_t>(sequence->kv()->blocks().size()) * pool_.block_tokens();
  if (first + count > reserved) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV rows ", first, "+", count, " beyond the reserved ", reserved, " positions"));
  }
  absl::StatusOr<KvLayerView> view = sequence->kv()->Layer(layer, first + count);
  if (!view.ok()) return view.status();
  const size_t row_bytes = shape.RowSize() * sizeof(float);
  for (int64_t i = 0; i < count; ++i) {
    std::memcpy(view->KRow(first + i), k + i * shape.RowSize(), row_bytes);
    std::memcpy(view->VRow(first + i), v + i * shape.RowSize(), row_bytes);
  }
  return absl::OkStatus();
}

void DecodeEngine::Start(std::shared_ptr<DecodeSequence> sequence, int32_t last_token,
                         int64_t position, const SamplingParams& sampling, int64_t max_new_tokens) {
  sequence->last_token_ = last_token;
  sequence->position_ = position;
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
  const int64_t vocab = model_->config().vocab_size;
  std::vector<std::shared_ptr<DecodeSequence>> batch;
  std::vector<float> logits;
  while (true) {
    batch.clear();
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
      auto cancelled = std::remove_if(running_.begin(), running_.end(), [](const auto& s) {
        if (!s->cancelled()) return false;
        s->Finish(absl::CancelledError("cancelled"));
        return true;
      });
      running_.erase(cancelled, running_.end());
      const size_t n = running_.size();
      if (n == 0) continue;
      const size_t take = std::min<size_t>(n, options_.max_batch);
      if (next_ >= n) next_ = 0;
      for (size_t i = 0; i < take; ++i) batch.push_back(running_[(next_ + i) % n]);
      next_ = (next_ + take) % n;
    }
    std::vector<SequenceChunk> chunks;
    chunks.reserve(batch.size());
    for (const auto& s : batch) {
      chunks.push_back(SequenceChunk{absl::MakeConstSpan(&s->last_token_, 1), s->position_, s->kv(),
                                     LogitsFor::kLast});
    }
    logits.clear();
    absl::Status status = model_->Forward(chunks, &logits);
    std::vector<DecodeSequence*> done;
    for (size_t i = 0; i < batch.size(); ++i) {
      DecodeSequence* s = batch[i].get();
      if (!status.ok()) {
        LogError("decode.step_failed", {{"error", status.ToString()}});
        s->Finish(status);
        done.push_back(s);
        continue;
      }
      const int32_t token =
          SampleTokenCpu(logits.data() + i * vocab, vocab, s->sampling_, s->step_);
      ++s->step_;
      ++s->position_;
      s->last_token_ = token;
      s->Push(token);
      if (--s->remaining_ == 0) {
        s->Finish(absl::OkStatus());
        done.push_back(s);
      }
    }
    // Drop this step's references now, so finished sequences free their blocks at once.
    batch.clear();
    if (!done.empty()) {
      absl::MutexLock lock(&mu_);
      running_.erase(std::remove_if(running_.begin(), running_.end(),
                                    [&](const auto& s) {
                                      return std::find(done.begin(), done.end(), s.get()) !=
                                             done.end();
                                    }),
                     running_.end());
    }
  }
}

}  // namespace sparseaccel
