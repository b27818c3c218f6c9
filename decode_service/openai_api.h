#ifndef SPARSEACCEL_DECODE_SERVICE_OPENAI_API_H_
#define SPARSEACCEL_DECODE_SERVICE_OPENAI_API_H_

// The JSON of the OpenAI-compatible HTTP API, without any networking: bodies of
// POST /v1/completions and /v1/chat/completions translated into a v1::GenerateRequest,
// responses and server-sent events built from what DecodeService.Generate streams, and errors
// as OpenAI's {"error": {"message", "type", "param", "code"}} with their HTTP status.
// Which fields are served, ignored or rejected: docs/services.md, "OpenAI-compatible HTTP API".

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "proto/sparseaccel.pb.h"

namespace sparseaccel {

enum class OpenAiEndpoint { kCompletions, kChatCompletions };

struct OpenAiApiOptions {
  // The one model served: what GET /v1/models lists and what `model` must name.
  std::string served_model_name;
  // max_tokens of a chat request that gives none (a text completion's default is OpenAI's 16).
  int32_t default_chat_max_tokens = 4096;
};

// A request body, translated.
struct OpenAiRequest {
  v1::GenerateRequest generate;
  bool stream = false;
  // stream_options.include_usage: a last chunk with the usage, before [DONE].
  bool include_usage = false;
  // Whether the body gave a seed; without one the caller picks a random seed, as OpenAI
  // samples differently on every call.
  bool has_seed = false;
};

// Parses and checks a body. INVALID_ARGUMENT for JSON that does not parse, a field of the wrong
// type or value, a missing prompt or messages, or a field this server does not implement
// (n > 1, logprobs, tools, ...); NOT_FOUND when `model` names another model. The field at fault,
// if one is, travels in the status (OpenAiErrorParam). What the gRPC path checks (max_tokens
// against the server's limit, the prompt's length, chat roles) is left to it.
absl::StatusOr<OpenAiRequest> ParseOpenAiRequest(OpenAiEndpoint endpoint, absl::string_view body,
                                                 const OpenAiApiOptions& options);

// `status` naming the request field it is about (the error's "param").
absl::Status WithOpenAiParam(absl::Status status, absl::string_view param);
// The field a status names; empty when none.
std::string OpenAiErrorParam(const absl::Status& status);

// An error response: 400 for INVALID_ARGUMENT and OUT_OF_RANGE, 404 for NOT_FOUND (an unknown
// model: code "model_not_found"), 429 for RESOURCE_EXHAUSTED, 503 for UNAVAILABLE, 504 for
// DEADLINE_EXCEEDED, 500 for anything else.
struct OpenAiError {
  int http_status = 500;
  nlohmann::json body;
};
OpenAiError OpenAiErrorFromStatus(const absl::Status& status);
// An error about the route itself (unknown URL, wrong method, body too large).
OpenAiError OpenAiHttpError(int http_status, absl::string_view message);

// What every response of one request carries.
struct OpenAiResponseMeta {
  OpenAiEndpoint endpoint = OpenAiEndpoint::kCompletions;
  std::string id;  // "cmpl-..." or "chatcmpl-..."
  int64_t created = 0;
  std::string model;
};
// A fresh random id for `endpoint`'s responses.
std::string NewOpenAiResponseId(OpenAiEndpoint endpoint);

// "stop" (stop string, stop token or end of sequence) or "length".
const char* OpenAiFinishReason(v1::FinishReason reason);
// {"prompt_tokens", "completion_tokens", "total_tokens"}.
nlohmann::json OpenAiUsage(const v1::GenerateResult& result);

// The whole response of a request without `stream`: a "text_completion" or "chat.completion".
nlohmann::json OpenAiResponse(const OpenAiResponseMeta& meta, absl::string_view text,
                              const v1::GenerateResult& result);

// The server-sent events of one streamed response: Begin(), Text() for every token, then End()
// (ending with "data: [DONE]") or, when the call fails after its first token, Error().
class OpenAiStreamEncoder {
 public:
  OpenAiStreamEncoder(OpenAiResponseMeta meta, bool include_usage)
      : meta_(std::move(meta)), include_usage_(include_usage) {}

  // Chat: a chunk whose delta is the assistant's role. Completions: nothing.
  std::string Begin() const;
  // A chunk with `text`; nothing for empty text.
  std::string Text(absl::string_view text) const;
  // The chunk with the finish reason, the usage chunk when include_usage, and [DONE].
  std::string End(const v1::GenerateResult& result) const;
  // An {"error": ...} event; no [DONE] follows (OpenAI's clients raise it as an APIError).
  std::string Error(const absl::Status& status) const;

 private:
  nlohmann::json Chunk(nlohmann::json choice) const;
  const OpenAiResponseMeta meta_;
  const bool include_usage_;
};

// One server-sent event: "data: <json>\n\n".
std::string SseEvent(const nlohmann::json& data);
inline constexpr absl::string_view kSseDone = "data: [DONE]\n\n";

// JSON text; invalid UTF-8 is replaced by U+FFFD rather than failing.
std::string JsonText(const nlohmann::json& value);

// GET /v1/models and /v1/models/{id}: the served model.
nlohmann::json OpenAiModel(const std::string& name, int64_t created);
nlohmann::json OpenAiModelList(const std::string& name, int64_t created);

// The default served model name: the model directory's base name ("/m/Llama-3.1-8B/" ->
// "Llama-3.1-8B").
std::string ModelNameOfDirectory(absl::string_view model_dir);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_DECODE_SERVICE_OPENAI_API_H_
