#include "decode_service/decode_server.h"

#include <cctype>
#include <chrono>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/status_macros.h"
#include "model/checkpoint/config.h"
#include "model/text/text_stream.h"
#include "proto/sampling.h"

namespace sparseaccel {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

const char* FinishName(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_EOS:
      return "eos";
    case v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    default:
      return "unspecified";
  }
}

}  // namespace

DecodeServer::DecodeServer(DecodeEngine* engine, const ModelConfig& config,
                           DecodeServerOptions options, prometheus::Registry* registry)
    : engine_(engine),
      config_(config),
      options_(std::move(options)),
      prefill_(RemotePrefillOptions{options_.prefill_addresses, options_.model_fingerprint,
                                    options_.kv_streams, options_.kv_receive_window_bytes,
                                    options_.prefill_credentials,
                                    options_.prefill_tls_server_name}),
      stream_limit_(options_.max_streams_per_connection),
      metrics_(registry) {
  UpdateGauges();
}

void DecodeServer::UpdateGauges() {
  const int64_t free_blocks = engine_->free_blocks();
  metrics_.pool_blocks.Add({{"state", "free"}}).Set(static_cast<double>(free_blocks));
  metrics_.pool_blocks.Add({{"state", "used"}})
      .Set(static_cast<double>(engine_->num_blocks() - free_blocks));
  const double block_bytes = static_cast<double>(engine_->model().kv_block_bytes());
  metrics_.pool_bytes.Add({{"state", "free"}}).Set(block_bytes * static_cast<double>(free_blocks));
  metrics_.pool_bytes.Add({{"state", "used"}})
      .Set(block_bytes * static_cast<double>(engine_->num_blocks() - free_blocks));
  metrics_.queue_depth.Set(static_cast<double>(engine_->waiting()));
  metrics_.running.Set(static_cast<double>(engine_->running()));
  metrics_.host_memory.Set(static_cast<double>(HostResidentBytes()));
  if (const std::optional<DeviceMemoryStats> memory = engine_->model().DeviceMemory()) {
    metrics_.gpu_memory.Set(static_cast<double>(memory->used));
  }
}

namespace {

// The request's fields against the kMax* limits (decode_server.h).
absl::Status CheckRequestLimits(const v1::GenerateRequest& request) {
  if (request.request_id().size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("request_id has ", request.request_id().size(),
                                                   " bytes; at most ", kMaxRequestIdBytes));
  }
  if (request.stop_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(
        absl::StrCat(request.stop_size(), " stop strings; at most ", kMaxStopStrings));
  }
  for (const std::string& stop : request.stop()) {
    if (stop.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("a stop string has ", stop.size(), " bytes; at most ", kMaxStopStringBytes));
    }
  }
  if (request.stop_token_ids_size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(
        absl::StrCat(request.stop_token_ids_size(), " stop token ids; at most ", kMaxStopTokenIds));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<int32_t>> DecodeServer::PromptTokens(
    const v1::GenerateRequest& request) const {
  RETURN_IF_ERROR(CheckRequestLimits(request));
  const Tokenizer* tokenizer = options_.tokenizer;
  const bool needs_tokenizer = request.prompt_case() == v1::GenerateRequest::kText ||
                               request.prompt_case() == v1::GenerateRequest::kChat ||
                               request.stop_size() > 0;
  if (needs_tokenizer && tokenizer == nullptr) {
    return absl::FailedPreconditionError(
        "text prompts, chat prompts and stop strings need the model's tokenizer.json, which "
        "this service's model directory lacks; send token_ids and stop_token_ids");
  }
  std::vector<int32_t> prompt;
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kTokenIds:
      prompt.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
      break;
    case v1::GenerateRequest::kText:
      if (!request.text().empty()) prompt = tokenizer->Encode(request.text());
      break;
    case v1::GenerateRequest::kChat: {
      if (request.chat().messages_size() == 0) break;
      std::vector<ChatMessage> messages;
      for (const v1::ChatMessage& message : request.chat().messages()) {
        messages.push_back({message.role(), message.content()});
      }
      absl::StatusOr<std::vector<int32_t>> ids = tokenizer->EncodeChat(messages);
      if (!ids.ok()) {
        // Unknown roles and the like are the caller's error; a template this build cannot
        // render is the model's.
        if (ids.status().code() == absl::StatusCode::kUnimplemented) return ids.status();
        return absl::InvalidArgumentError(ids.status().message());
      }
      prompt = *std::move(ids);
      break;
    }
    default:
      break;
  }
  if (prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  const int64_t n = static_cast<int64_t>(prompt.size());
  if (request.max_tokens() < 1 || request.max_tokens() > options_.max_new_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens must be in [1, ", options_.max_new_tokens, "], got ", request.max_tokens()));
  }
  const int64_t limit =
      std::min(options_.max_prompt_tokens, config_.max_position_embeddings - request.max_tokens());
  if (n > limit) {
    return absl::InvalidArgumentError(absl::StrCat("prompt has ", n, " tokens; with max_tokens ",
                                                   request.max_tokens(), " the limit is ", limit));
  }
  RETURN_IF_ERROR(CheckTokenIds(prompt, config_.vocab_size));
  for (const std::string& stop : request.stop()) {
    if (stop.empty()) return absl::InvalidArgumentError("empty stop string");
  }
  RETURN_IF_ERROR(ValidateSampling(request.sampling()));
  return prompt;
}

// One Generate call's token stream: decides when generation is over (EOS, a stop id, a stop
// string, max_tokens), writes each token with its text delta, and times them.
class TokenWriter {
 public:
  TokenWriter(const v1::GenerateRequest& request, const ModelConfig& config,
              const Tokenizer* tokenizer, grpc::ServerWriter<v1::GenerateResponse>* writer,
              DecodeRequestMetrics* metrics, Clock::time_point start, int64_t prompt_tokens)
      : request_(request),
        writer_(writer),
        metrics_(metrics),
        start_(start),
        last_sent_(start),
        prompt_tokens_(prompt_tokens),
        stop_ids_(request.stop_token_ids().begin(), request.stop_token_ids().end()),
        text_(tokenizer, {request.stop().begin(), request.stop().end()}) {
    if (!request.ignore_eos()) {
      eos_ids_.insert(config.eos_token_ids.begin(), config.eos_token_ids.end());
    }
  }

  // Sends one token; false once generation is over (finish() set), the client is gone
  // (CANCELLED) or the token has no text (status() set).
  bool Send(int32_t token) {
    if (eos_ids_.count(token) > 0) {
      finish_ = v1::FINISH_REASON_EOS;
    } else if (stop_ids_.count(token) > 0) {
      finish_ = v1::FINISH_REASON_STOP;
    } else if (generated_ + 1 >= request_.max_tokens()) {
      finish_ = v1::FINISH_REASON_LENGTH;
    }
    bool stopped = false;
    absl::StatusOr<std::string> delta =
        text_.Push(token, finish_ != v1::FINISH_REASON_UNSPECIFIED, &stopped);
    if (!delta.ok()) {
      status_ = absl::InternalError(
          absl::StrCat("generated token ", token, " has no text: ", delta.status().message()));
      return false;
    }
    if (stopped) finish_ = v1::FINISH_REASON_STOP;
    v1::GenerateResponse response;
    response.mutable_token()->set_token_id(token);
    response.mutable_token()->set_text(*std::move(delta));
    response.mutable_token()->set_index(static_cast<int32_t>(generated_));
    if (!writer_->Write(response)) {
      finish_ = v1::FINISH_REASON_CANCELLED;
      return false;
    }
    Timed(Clock::now());
    return finish_ == v1::FINISH_REASON_UNSPECIFIED;
  }

  v1::FinishReason finish() const { return finish_; }
  void set_finish(v1::FinishReason finish) { finish_ = finish; }
  const absl::Status& status() const { return status_; }
  int64_t generated() const { return generated_; }
  double ttft() const { return ttft_; }
  double mean_itl() const { return generated_ > 1 ? itl_sum_ / (generated_ - 1) : 0; }

 private:
  // The metrics of the token just written at `now`.
  void Timed(Clock::time_point now) {
    if (generated_ == 0) {
      ttft_ = std::chrono::duration<double>(now - start_).count();
      metrics_->ttft.Add({{"context", ContextBucket(prompt_tokens_)}}, LatencyBuckets())
          .Observe(ttft_);
    } else {
      const double gap = std::chrono::duration<double>(now - last_sent_).count();
      itl_sum_ += gap;
      metrics_->itl.Add({{"context", ContextBucket(prompt_tokens_ + generated_)}}, LatencyBuckets())
          .Observe(gap);
    }
    last_sent_ = now;
    ++generated_;
  }

  const v1::GenerateRequest& request_;
  grpc::ServerWriter<v1::GenerateResponse>* const writer_;
  DecodeRequestMetrics* const metrics_;
  const Clock::time_point start_;
  Clock::time_point last_sent_;
  const int64_t prompt_tokens_;
  const std::unordered_set<int32_t> stop_ids_;
  std::unordered_set<int32_t> eos_ids_;
  TextStream text_;
  v1::FinishReason finish_ = v1::FINISH_REASON_UNSPECIFIED;
  absl::Status status_;
  int64_t generated_ = 0;
  double ttft_ = 0;
  double itl_sum_ = 0;
};

namespace {

// Tokens after the first from the continuous batch, until `tokens` has sent the last one, the
// client has gone (CANCELLED finish) or the sequence ended; the sequence's error, if any.
absl::Status DecodeRest(grpc::ServerContext* context, DecodeSequence* sequence,
                        TokenWriter* tokens) {
  while (true) {
    if (context->IsCancelled()) {
      tokens->set_finish(v1::FINISH_REASON_CANCELLED);
      return absl::OkStatus();
    }
    DecodeSequence::Event event = sequence->WaitNext(absl::Milliseconds(50));
    if (event.kind == DecodeSequence::Event::Kind::kTimeout) continue;
    if (event.kind == DecodeSequence::Event::Kind::kFinished) return event.status;
    if (!tokens->Send(event.token)) return absl::OkStatus();
  }
}

}  // namespace

absl::StatusOr<RemotePrefillResult> DecodeServer::PrefillAndDecode(
    grpc::ServerContext* context, const std::string& request_id, const v1::GenerateRequest& request,
    const std::vector<int32_t>& prompt, std::shared_ptr<DecodeSequence> sequence,
    TokenWriter* tokens) {
  // The first token reaches the client while the rest of the KV cache is still arriving.
  bool first_sent = false;
  bool more = false;  // Whether generation goes on after the first token.
  absl::StatusOr<RemotePrefillResult> prefilled = prefill_.Run(
      context, request_id, prompt, request.sampling(), engine_, sequence.get(), [&](int32_t token) {
        first_sent = true;
        more = tokens->Send(token);
        return more;
      });
  if (!prefilled.ok() && (!first_sent || more)) return prefilled.status();
  absl::Status decoded = tokens->status();
  if (more) {
    engine_->Start(sequence, prefilled->first_token, ToSamplingParams(request.sampling()),
                   request.max_tokens() - 1);
    decoded = DecodeRest(context, sequence.get(), tokens);
    if (decoded.ok()) decoded = tokens->status();
  }
  sequence->Cancel();
  sequence.reset();  // The scheduler drops its reference at its next step.
  if (tokens->finish() == v1::FINISH_REASON_CANCELLED) {
    return absl::CancelledError("client cancelled or its deadline passed");
  }
  RETURN_IF_ERROR(decoded);
  if (tokens->finish() == v1::FINISH_REASON_UNSPECIFIED) {
    tokens->set_finish(v1::FINISH_REASON_LENGTH);
  }
  // A generation that ended with the first token stopped its KV transfer: no KV figures.
  return prefilled.ok() ? *prefilled : RemotePrefillResult{};
}

grpc::Status DecodeServer::Generate(grpc::ServerContext* context,
                                    const v1::GenerateRequest* request,
                                    grpc::ServerWriter<v1::GenerateResponse>* writer) {
  const Clock::time_point start = Clock::now();
  ++active_;
  const std::string request_id = request->request_id().empty()
                                     ? absl::StrCat("gen-", next_request_id_++)
                                     : request->request_id();
  absl::StatusOr<std::vector<int32_t>> prompt = PromptTokens(*request);
  const int64_t prompt_tokens = prompt.ok() ? static_cast<int64_t>(prompt->size()) : 0;
  TokenWriter tokens(*request, config_, options_.tokenizer, writer, &metrics_, start,
                     prompt_tokens);

  auto finish_request = [&](absl::Status status) {
    metrics_.requests
        .Add({{"outcome", OutcomeLabel(status)}, {"finish_reason", FinishName(tokens.finish())}})
        .Increment();
    UpdateGauges();
    LogInfo("generate.done", {{"request_id", request_id},
                              {"status", StatusForLog(status)},
                              {"finish_reason", FinishName(tokens.finish())},
                              {"prompt_tokens", prompt_tokens},
                              {"completion_tokens", tokens.generated()},
                              {"seconds", SecondsSince(start)}});
    --active_;
    return ToGrpcStatus(status);
  };

  absl::StatusOr<ConnectionStreamLimit::Slot> slot = stream_limit_.Acquire(context->peer());
  if (!slot.ok()) return finish_request(slot.status());
  if (!prompt.ok()) return finish_request(prompt.status());
  const auto cancelled = [context] { return context->IsCancelled(); };
  absl::StatusOr<std::shared_ptr<DecodeSequence>> sequence = engine_->Admit(
      prompt_tokens, request->max_tokens(), absl::FromChrono(context->deadline()), cancelled);
  if (!sequence.ok()) return finish_request(sequence.status());
  UpdateGauges();
  absl::StatusOr<RemotePrefillResult> transfer =
      PrefillAndDecode(context, request_id, *request, *prompt, *std::move(sequence), &tokens);
  if (!transfer.ok()) return finish_request(transfer.status());
  WriteResult(*transfer, prompt_tokens, SecondsSince(start), tokens, writer);
  return finish_request(absl::OkStatus());
}

void DecodeServer::WriteResult(const RemotePrefillResult& transfer, int64_t prompt_tokens,
                               double total_seconds, const TokenWriter& tokens,
                               grpc::ServerWriter<v1::GenerateResponse>* writer) {
  const std::string bucket = ContextBucket(prompt_tokens);
  if (transfer.kv_bytes > 0) {
    metrics_.prefill_seconds.Add({{"context", bucket}}, LatencyBuckets())
        .Observe(transfer.prefill_seconds);
    metrics_.kv_seconds.Add({{"context", bucket}}, LatencyBuckets()).Observe(transfer.kv_seconds);
    metrics_.kv_bytes.Add({{"context", bucket}}, ByteBuckets())
        .Observe(static_cast<double>(transfer.kv_bytes));
  }
  metrics_.e2e.Add({{"context", bucket}}, LatencyBuckets()).Observe(total_seconds);
  v1::GenerateResponse response;
  v1::GenerateResult* result = response.mutable_result();
  result->set_finish_reason(tokens.finish());
  result->set_prompt_tokens(static_cast<int32_t>(prompt_tokens));
  result->set_completion_tokens(static_cast<int32_t>(tokens.generated()));
  result->set_time_to_first_token_seconds(tokens.ttft());
  result->set_prefill_seconds(transfer.prefill_seconds);
  result->set_kv_transfer_seconds(transfer.kv_seconds);
  result->set_kv_transfer_bytes(transfer.kv_bytes);
  result->set_mean_inter_token_latency_seconds(tokens.mean_itl());
  result->set_total_seconds(total_seconds);
  result->set_prefill_address(transfer.address);
  writer->Write(response);
}

}  // namespace sparseaccel
