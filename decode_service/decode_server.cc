#include "decode_service/decode_server.h"

#include <cctype>
#include <chrono>
#include <unordered_set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/status_macros.h"
#include "model/checkpoint/config.h"
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

// Turns generated tokens into the text deltas sent to the client. Text that may be the start
// of a stop string is held back until it is not (or until the stream ends).
class TextStream {
 public:
  TextStream(const Tokenizer* tokenizer, std::vector<std::string> stops)
      : tokenizer_(tokenizer),
        decoder_(tokenizer, /*skip_special_tokens=*/true),
        stops_(std::move(stops)) {}

  // The text to send with `token`. `last`: no token follows, so nothing is held back. Sets
  // *stopped when a stop string appeared; the text then ends before it.
  absl::StatusOr<std::string> Push(int32_t token, bool last, bool* stopped) {
    *stopped = false;
    if (tokenizer_ == nullptr) return std::string();
    ASSIGN_OR_RETURN(std::string piece, decoder_.Push(token));
    text_ += piece;
    // Text sent so far was never a possible stop prefix, so a match starts at or after sent_.
    size_t end = text_.size();
    for (const std::string& stop : stops_) {
      const size_t at = text_.find(stop, sent_);
      if (at != std::string::npos && at < end) {
        end = at;
        *stopped = true;
      }
    }
    if (!*stopped && last) {
      text_ += decoder_.Flush();
      end = text_.size();
    } else if (!*stopped) {
      end -= HeldBack();
    }
    std::string delta = text_.substr(sent_, end - sent_);
    sent_ = end;
    return delta;
  }

 private:
  // Length of the longest end of the unsent text that is a proper prefix of a stop string.
  size_t HeldBack() const {
    const absl::string_view unsent = absl::string_view(text_).substr(sent_);
    size_t held = 0;
    for (const std::string& stop : stops_) {
      for (size_t k = std::min(stop.size() - 1, unsent.size()); k > held; --k) {
        if (absl::EndsWith(unsent, absl::string_view(stop).substr(0, k))) {
          held = k;
          break;
        }
      }
    }
    return held;
  }

  const Tokenizer* tokenizer_;
  StreamDecoder decoder_;
  const std::vector<std::string> stops_;
  std::string text_;  // Everything decoded so far.
  size_t sent_ = 0;   // Bytes of text_ sent.
};

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
      requests_(prometheus::BuildCounter()
                    .Name("sparseaccel_generate_requests_total")
                    .Help("Generate requests by outcome (gRPC code) and finish reason.")
                    .Register(*registry)),
      ttft_(prometheus::BuildHistogram()
                .Name("sparseaccel_time_to_first_token_seconds")
                .Help("Request arrival to first token sent, by prompt length bucket.")
                .Register(*registry)),
      itl_(prometheus::BuildHistogram()
               .Name("sparseaccel_inter_token_latency_seconds")
               .Help("Time between consecutive tokens sent, by context length bucket.")
               .Register(*registry)),
      e2e_(prometheus::BuildHistogram()
               .Name("sparseaccel_request_duration_seconds")
               .Help("End-to-end Generate latency, by prompt length bucket.")
               .Register(*registry)),
      prefill_seconds_(prometheus::BuildHistogram()
                           .Name("sparseaccel_remote_prefill_duration_seconds")
                           .Help("Prefill compute time reported by the prefill service.")
                           .Register(*registry)),
      kv_seconds_(prometheus::BuildHistogram()
                      .Name("sparseaccel_kv_transfer_duration_seconds")
                      .Help("First to last KV byte received from the prefill service.")
                      .Register(*registry)),
      kv_bytes_(prometheus::BuildHistogram()
                    .Name("sparseaccel_kv_transfer_bytes")
                    .Help("KV cache bytes received per request.")
                    .Register(*registry)),
      pool_blocks_(prometheus::BuildGauge()
                       .Name("sparseaccel_kv_pool_blocks")
                       .Help("Paged KV pool blocks by state (used, free).")
                       .Register(*registry)),
      queue_depth_(prometheus::BuildGauge()
                       .Name("sparseaccel_decode_queue_depth")
                       .Help("Requests waiting for KV cache space.")
                       .Register(*registry)
                       .Add({})),
      running_(prometheus::BuildGauge()
                   .Name("sparseaccel_decode_running_sequences")
                   .Help("Sequences in the continuous batch.")
                   .Register(*registry)
                   .Add({})),
      pool_bytes_(prometheus::BuildGauge()
                      .Name("sparseaccel_kv_pool_bytes")
                      .Help("Paged KV pool bytes by state (used, free).")
                      .Register(*registry)),
      host_memory_(prometheus::BuildGauge()
                       .Name("sparseaccel_host_memory_bytes")
                       .Help("Resident host memory of the process.")
                       .Register(*registry)
                       .Add({{"service", "decode"}})),
      gpu_memory_(prometheus::BuildGauge()
                      .Name("sparseaccel_gpu_memory_used_bytes")
                      .Help("GPU memory in use on the service's device (all processes).")
                      .Register(*registry)
                      .Add({{"service", "decode"}})) {
  UpdateGauges();
}

void DecodeServer::UpdateGauges() {
  const int64_t free_blocks = engine_->free_blocks();
  pool_blocks_.Add({{"state", "free"}}).Set(static_cast<double>(free_blocks));
  pool_blocks_.Add({{"state", "used"}})
      .Set(static_cast<double>(engine_->num_blocks() - free_blocks));
  const double block_bytes = static_cast<double>(engine_->model().kv_block_bytes());
  pool_bytes_.Add({{"state", "free"}}).Set(block_bytes * static_cast<double>(free_blocks));
  pool_bytes_.Add({{"state", "used"}})
      .Set(block_bytes * static_cast<double>(engine_->num_blocks() - free_blocks));
  queue_depth_.Set(static_cast<double>(engine_->waiting()));
  running_.Set(static_cast<double>(engine_->running()));
  host_memory_.Set(static_cast<double>(HostResidentBytes()));
  if (const std::optional<DeviceMemoryStats> memory = engine_->model().DeviceMemory()) {
    gpu_memory_.Set(static_cast<double>(memory->used));
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
  const std::string bucket = ContextBucket(prompt_tokens);
  v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
  int64_t generated = 0;

  auto finish_request = [&](absl::Status status) {
    requests_.Add({{"outcome", OutcomeLabel(status)}, {"finish_reason", FinishName(finish)}})
        .Increment();
    UpdateGauges();
    LogInfo("generate.done", {{"request_id", request_id},
                              {"status", StatusForLog(status)},
                              {"finish_reason", FinishName(finish)},
                              {"prompt_tokens", prompt_tokens},
                              {"completion_tokens", generated},
                              {"seconds", SecondsSince(start)}});
    --active_;
    return ToGrpcStatus(status);
  };

  absl::StatusOr<ConnectionStreamLimit::Slot> slot = stream_limit_.Acquire(context->peer());
  if (!slot.ok()) return finish_request(slot.status());
  if (!prompt.ok()) return finish_request(prompt.status());
  const auto cancelled = [context] { return context->IsCancelled(); };
  absl::Time deadline = absl::FromChrono(context->deadline());
  absl::StatusOr<std::shared_ptr<DecodeSequence>> sequence =
      engine_->Admit(prompt_tokens, request->max_tokens(), deadline, cancelled);
  if (!sequence.ok()) return finish_request(sequence.status());
  UpdateGauges();

  std::unordered_set<int32_t> stop_ids(request->stop_token_ids().begin(),
                                       request->stop_token_ids().end());
  std::unordered_set<int32_t> eos_ids;
  if (!request->ignore_eos())
    eos_ids.insert(config_.eos_token_ids.begin(), config_.eos_token_ids.end());
  double ttft = 0;
  Clock::time_point last_sent = start;
  double itl_sum = 0;
  const int64_t context_tokens = prompt_tokens;
  TextStream text(options_.tokenizer, {request->stop().begin(), request->stop().end()});
  absl::Status status;

  // Sends one token; returns false once generation is over (finish set), the client is gone or
  // the token has no text (status set).
  auto send = [&](int32_t token) -> bool {
    if (eos_ids.count(token) > 0) {
      finish = v1::FINISH_REASON_EOS;
    } else if (stop_ids.count(token) > 0) {
      finish = v1::FINISH_REASON_STOP;
    } else if (generated + 1 >= request->max_tokens()) {
      finish = v1::FINISH_REASON_LENGTH;
    }
    bool stopped = false;
    absl::StatusOr<std::string> delta =
        text.Push(token, finish != v1::FINISH_REASON_UNSPECIFIED, &stopped);
    if (!delta.ok()) {
      status = absl::InternalError(
          absl::StrCat("generated token ", token, " has no text: ", delta.status().message()));
      return false;
    }
    if (stopped) finish = v1::FINISH_REASON_STOP;
    v1::GenerateResponse response;
    response.mutable_token()->set_token_id(token);
    response.mutable_token()->set_text(*std::move(delta));
    response.mutable_token()->set_index(static_cast<int32_t>(generated));
    if (!writer->Write(response)) {
      finish = v1::FINISH_REASON_CANCELLED;
      return false;
    }
    const Clock::time_point now = Clock::now();
    if (generated == 0) {
      ttft = std::chrono::duration<double>(now - start).count();
      ttft_.Add({{"context", bucket}}, LatencyBuckets()).Observe(ttft);
    } else {
      const double gap = std::chrono::duration<double>(now - last_sent).count();
      itl_sum += gap;
      itl_.Add({{"context", ContextBucket(context_tokens + generated)}}, LatencyBuckets())
          .Observe(gap);
    }
    last_sent = now;
    ++generated;
    return finish == v1::FINISH_REASON_UNSPECIFIED;
  };

  // The first token reaches the client while the rest of the KV cache is still arriving.
  bool first_sent = false;
  bool more = false;  // Whether generation goes on after the first token.
  absl::StatusOr<RemotePrefillResult> prefilled =
      prefill_.Run(context, request_id, *prompt, request->sampling(), engine_, sequence->get(),
                   [&](int32_t token) {
                     first_sent = true;
                     more = send(token);
                     return more;
                   });
  if (!prefilled.ok() && (!first_sent || more)) return finish_request(prefilled.status());
  if (more) {
    engine_->Start(*sequence, prefilled->first_token, ToSamplingParams(request->sampling()),
                   request->max_tokens() - 1);
    while (true) {
      if (context->IsCancelled()) {
        finish = v1::FINISH_REASON_CANCELLED;
        break;
      }
      DecodeSequence::Event event = (*sequence)->WaitNext(absl::Milliseconds(50));
      if (event.kind == DecodeSequence::Event::Kind::kTimeout) continue;
      if (event.kind == DecodeSequence::Event::Kind::kFinished) {
        status = event.status;
        break;
      }
      if (!send(event.token)) break;
    }
  }
  (*sequence)->Cancel();
  sequence->reset();  // The scheduler drops its reference at its next step.
  if (finish == v1::FINISH_REASON_CANCELLED) {
    status = absl::CancelledError("client cancelled or its deadline passed");
  }
  if (!status.ok()) return finish_request(status);
  if (finish == v1::FINISH_REASON_UNSPECIFIED) finish = v1::FINISH_REASON_LENGTH;

  const double total = SecondsSince(start);
  // A generation that ended with the first token stopped its KV transfer: no KV figures.
  const RemotePrefillResult transfer = prefilled.ok() ? *prefilled : RemotePrefillResult{};
  if (prefilled.ok()) {
    prefill_seconds_.Add({{"context", bucket}}, LatencyBuckets()).Observe(transfer.prefill_seconds);
    kv_seconds_.Add({{"context", bucket}}, LatencyBuckets()).Observe(transfer.kv_seconds);
    kv_bytes_.Add({{"context", bucket}}, ByteBuckets())
        .Observe(static_cast<double>(transfer.kv_bytes));
  }
  e2e_.Add({{"context", bucket}}, LatencyBuckets()).Observe(total);
  v1::GenerateResponse response;
  v1::GenerateResult* result = response.mutable_result();
  result->set_finish_reason(finish);
  result->set_prompt_tokens(static_cast<int32_t>(prompt_tokens));
  result->set_completion_tokens(static_cast<int32_t>(generated));
  result->set_time_to_first_token_seconds(ttft);
  result->set_prefill_seconds(transfer.prefill_seconds);
  result->set_kv_transfer_seconds(transfer.kv_seconds);
  result->set_kv_transfer_bytes(transfer.kv_bytes);
  result->set_mean_inter_token_latency_seconds(generated > 1 ? itl_sum / (generated - 1) : 0);
  result->set_total_seconds(total);
  result->set_prefill_address(transfer.address);
  writer->Write(response);
  return finish_request(absl::OkStatus());
}

}  // namespace sparseaccel
