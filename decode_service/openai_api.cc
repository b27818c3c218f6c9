#include "decode_service/openai_api.h"

#include <cstdint>
#include <limits>
#include <optional>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"

namespace sparseaccel {
namespace {

using Json = nlohmann::json;

constexpr absl::string_view kParamPayload = "type.googleapis.com/sparseaccel.OpenAiParam";

absl::Status Invalid(absl::string_view param, absl::string_view message) {
  return WithOpenAiParam(absl::InvalidArgumentError(message), param);
}

// Typed reads of one JSON object's fields. An absent field and a null one both give the
// fallback; a field of another type is INVALID_ARGUMENT naming it (with `prefix`).
class Fields {
 public:
  explicit Fields(const Json& object, std::string prefix = "")
      : object_(object), prefix_(std::move(prefix)) {}

  const Json* Find(const char* name) const {
    const auto it = object_.find(name);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }

  absl::StatusOr<bool> Bool(const char* name, bool fallback) const {
    const Json* value = Find(name);
    if (value == nullptr) return fallback;
    if (!value->is_boolean()) return Wrong(name, "a boolean");
    return value->get<bool>();
  }

  // An integer in [lo, hi].
  absl::StatusOr<int64_t> Int(const char* name, int64_t fallback, int64_t lo, int64_t hi) const {
    const Json* value = Find(name);
    if (value == nullptr) return fallback;
    if (!value->is_number_integer()) return Wrong(name, "an integer");
    if (value->is_number_unsigned() &&
        value->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return OutOfRange(name, lo, hi);
    }
    const int64_t v = value->get<int64_t>();
    if (v < lo || v > hi) return OutOfRange(name, lo, hi);
    return v;
  }

  // A number in [lo, hi].
  absl::StatusOr<double> Number(const char* name, double fallback, double lo, double hi) const {
    const Json* value = Find(name);
    if (value == nullptr) return fallback;
    if (!value->is_number()) return Wrong(name, "a number");
    const double v = value->get<double>();
    if (!(v >= lo && v <= hi)) return OutOfRange(name, lo, hi);
    return v;
  }

  // A field of which only the default is served: absent, null, or `allowed` if given, else
  // false, 0, "", [] or {}. Anything else is INVALID_ARGUMENT rather than silently ignored.
  absl::Status OnlyDefault(const char* name, absl::string_view what,
                           const Json& allowed = nullptr) const {
    const Json* value = Find(name);
    if (value == nullptr) return absl::OkStatus();
    const bool empty =
        *value == false || (value->is_number() && *value == 0) ||
        ((value->is_string() || value->is_array() || value->is_object()) && value->empty());
    if (allowed.is_null() ? empty : *value == allowed) return absl::OkStatus();
    return Invalid(Param(name), absl::StrCat(what, " not supported by this server"));
  }

  std::string Param(const char* name) const { return absl::StrCat(prefix_, name); }

 private:
  absl::Status Wrong(const char* name, absl::string_view type) const {
    return Invalid(Param(name), absl::StrCat(Param(name), " must be ", type));
  }
  template <typename T>
  absl::Status OutOfRange(const char* name, T lo, T hi) const {
    return Invalid(Param(name), absl::StrCat(Param(name), " must be in [", lo, ", ", hi, "]"));
  }

  const Json& object_;
  const std::string prefix_;
};

absl::Status SetTokenIds(const Json& ids, v1::GenerateRequest* request) {
  v1::TokenIds* out = request->mutable_token_ids();
  for (const Json& id : ids) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      return Invalid("prompt", "prompt token ids must be integers in [0, 2^31)");
    }
    out->add_ids(id.get<int32_t>());
  }
  return absl::OkStatus();
}

// `prompt`: a string, an array of token ids, or an array holding one of them.
absl::Status SetPrompt(const Json* prompt, v1::GenerateRequest* request) {
  if (prompt == nullptr) return Invalid("prompt", "prompt is required");
  if (prompt->is_string()) {
    request->set_text(prompt->get<std::string>());
    return absl::OkStatus();
  }
  constexpr absl::string_view kShape =
      "prompt must be a string, an array of token ids, or an array of one of them";
  if (!prompt->is_array() || prompt->empty()) return Invalid("prompt", kShape);
  const Json& first = prompt->front();
  if (first.is_number()) return SetTokenIds(*prompt, request);
  if (prompt->size() > 1) {
    return Invalid("prompt", absl::StrCat("one prompt per request, got ", prompt->size(),
                                          "; send them as separate requests"));
  }
  if (first.is_string()) {
    request->set_text(first.get<std::string>());
    return absl::OkStatus();
  }
  if (first.is_array()) return SetTokenIds(first, request);
  return Invalid("prompt", kShape);
}

// A message's content: a string, or an array of {"type": "text", "text": ...} parts, joined.
absl::StatusOr<std::string> MessageContent(const Json& message) {
  const Fields fields(message);
  const Json* content = fields.Find("content");
  if (content != nullptr && content->is_string()) return content->get<std::string>();
  constexpr absl::string_view kShape =
      "each message's content must be a string or an array of text parts";
  if (content == nullptr || !content->is_array()) return Invalid("messages", kShape);
  std::string text;
  for (const Json& part : *content) {
    if (!part.is_object() || part.value("type", Json()) != "text" || !part.contains("text") ||
        !part["text"].is_string()) {
      return Invalid("messages", absl::StrCat(kShape, " (only text parts are supported)"));
    }
    text += part["text"].get<std::string>();
  }
  return text;
}

absl::Status SetMessages(const Json* messages, v1::GenerateRequest* request) {
  if (messages == nullptr || !messages->is_array() || messages->empty()) {
    return Invalid("messages", "messages must be a non-empty array");
  }
  v1::ChatMessages* chat = request->mutable_chat();
  for (const Json& message : *messages) {
    if (!message.is_object() || !message.contains("role") || !message["role"].is_string()) {
      return Invalid("messages", "each message must be an object with a string role");
    }
    ASSIGN_OR_RETURN(std::string content, MessageContent(message));
    v1::ChatMessage* out = chat->add_messages();
    const std::string role = message["role"].get<std::string>();
    out->set_role(role == "developer" ? "system" : role);  // OpenAI's newer name for system.
    out->set_content(std::move(content));
  }
  return absl::OkStatus();
}

// `stop`: a string or an array of strings.
absl::Status SetStop(const Json* stop, v1::GenerateRequest* request) {
  if (stop == nullptr) return absl::OkStatus();
  if (stop->is_string()) {
    request->add_stop(stop->get<std::string>());
    return absl::OkStatus();
  }
  if (!stop->is_array()) return Invalid("stop", "stop must be a string or an array of strings");
  for (const Json& s : *stop) {
    if (!s.is_string()) return Invalid("stop", "stop must be a string or an array of strings");
    request->add_stop(s.get<std::string>());
  }
  return absl::OkStatus();
}

// temperature (OpenAI's default 1), top_p, top_k (an extension; -1 as 0: no cut) and seed.
absl::Status SetSampling(const Fields& fields, OpenAiRequest* out) {
  v1::SamplingParams* sampling = out->generate.mutable_sampling();
  ASSIGN_OR_RETURN(const double temperature, fields.Number("temperature", 1.0, 0.0, 2.0));
  ASSIGN_OR_RETURN(const double top_p, fields.Number("top_p", 1.0, 0.0, 1.0));
  ASSIGN_OR_RETURN(const int64_t top_k,
                   fields.Int("top_k", 0, -1, std::numeric_limits<int32_t>::max()));
  sampling->set_temperature(static_cast<float>(temperature));
  sampling->set_top_p(static_cast<float>(top_p));
  sampling->set_top_k(static_cast<int32_t>(std::max<int64_t>(top_k, 0)));
  const Json* seed = fields.Find("seed");
  if (seed == nullptr) return absl::OkStatus();
  if (!seed->is_number_integer()) return Invalid("seed", "seed must be an integer");
  out->has_seed = true;
  sampling->set_seed(seed->is_number_unsigned() ? seed->get<uint64_t>()
                                                : static_cast<uint64_t>(seed->get<int64_t>()));
  return absl::OkStatus();
}

// Fields whose only served value is their default (Fields::OnlyDefault).
absl::Status CheckUnsupported(OpenAiEndpoint endpoint, const Fields& fields) {
  RETURN_IF_ERROR(fields.OnlyDefault("n", "n other than 1 is", 1));
  RETURN_IF_ERROR(fields.OnlyDefault("logprobs", "logprobs are"));
  RETURN_IF_ERROR(fields.OnlyDefault("presence_penalty", "presence_penalty is"));
  RETURN_IF_ERROR(fields.OnlyDefault("frequency_penalty", "frequency_penalty is"));
  RETURN_IF_ERROR(fields.OnlyDefault("logit_bias", "logit_bias is"));
  if (endpoint == OpenAiEndpoint::kCompletions) {
    RETURN_IF_ERROR(fields.OnlyDefault("best_of", "best_of other than 1 is", 1));
    RETURN_IF_ERROR(fields.OnlyDefault("echo", "echo is"));
    return fields.OnlyDefault("suffix", "suffix is");
  }
  RETURN_IF_ERROR(fields.OnlyDefault("top_logprobs", "top_logprobs are"));
  RETURN_IF_ERROR(fields.OnlyDefault("tools", "tools are"));
  RETURN_IF_ERROR(fields.OnlyDefault("functions", "functions are"));
  return fields.OnlyDefault("response_format", "a response_format other than text is",
                            Json{{"type", "text"}});
}

absl::Status SetStreaming(const Fields& fields, OpenAiRequest* out) {
  ASSIGN_OR_RETURN(out->stream, fields.Bool("stream", false));
  const Json* options = fields.Find("stream_options");
  if (options == nullptr) return absl::OkStatus();
  if (!options->is_object()) return Invalid("stream_options", "stream_options must be an object");
  ASSIGN_OR_RETURN(out->include_usage,
                   Fields(*options, "stream_options.").Bool("include_usage", false));
  return absl::OkStatus();
}

absl::Status SetMaxTokens(OpenAiEndpoint endpoint, const Fields& fields,
                          const OpenAiApiOptions& options, v1::GenerateRequest* request) {
  // Values in int32 go on to the gRPC path, which checks them against the server's limit.
  constexpr int64_t kLo = std::numeric_limits<int32_t>::min();
  constexpr int64_t kHi = std::numeric_limits<int32_t>::max();
  int64_t max_tokens = 16;
  if (endpoint == OpenAiEndpoint::kCompletions) {
    ASSIGN_OR_RETURN(max_tokens, fields.Int("max_tokens", 16, kLo, kHi));
  } else {
    ASSIGN_OR_RETURN(max_tokens,
                     fields.Int("max_tokens", options.default_chat_max_tokens, kLo, kHi));
    // The newer name wins.
    ASSIGN_OR_RETURN(max_tokens, fields.Int("max_completion_tokens", max_tokens, kLo, kHi));
  }
  request->set_max_tokens(static_cast<int32_t>(max_tokens));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<OpenAiRequest> ParseOpenAiRequest(OpenAiEndpoint endpoint, absl::string_view body,
                                                 const OpenAiApiOptions& options) {
  const Json json = Json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) {
    return absl::InvalidArgumentError("the request body is not valid JSON");
  }
  if (!json.is_object()) return absl::InvalidArgumentError("the request body must be an object");
  const Fields fields(json);
  if (const Json* model = fields.Find("model"); model != nullptr) {
    if (!model->is_string()) return Invalid("model", "model must be a string");
    if (*model != options.served_model_name) {
      return WithOpenAiParam(
          absl::NotFoundError(absl::StrCat("The model '", model->get<std::string>(),
                                           "' does not exist; this server serves '",
                                           options.served_model_name, "'")),
          "model");
    }
  }
  OpenAiRequest out;
  if (endpoint == OpenAiEndpoint::kCompletions) {
    RETURN_IF_ERROR(SetPrompt(fields.Find("prompt"), &out.generate));
  } else {
    RETURN_IF_ERROR(SetMessages(fields.Find("messages"), &out.generate));
  }
  RETURN_IF_ERROR(CheckUnsupported(endpoint, fields));
  RETURN_IF_ERROR(SetMaxTokens(endpoint, fields, options, &out.generate));
  RETURN_IF_ERROR(SetStop(fields.Find("stop"), &out.generate));
  RETURN_IF_ERROR(SetSampling(fields, &out));
  RETURN_IF_ERROR(SetStreaming(fields, &out));
  ASSIGN_OR_RETURN(const bool ignore_eos, fields.Bool("ignore_eos", false));
  out.generate.set_ignore_eos(ignore_eos);
  return out;
}

absl::Status WithOpenAiParam(absl::Status status, absl::string_view param) {
  status.SetPayload(kParamPayload, absl::Cord(param));
  return status;
}

std::string OpenAiErrorParam(const absl::Status& status) {
  const auto param = status.GetPayload(kParamPayload);  // absl::optional<absl::Cord>
  return param.has_value() ? std::string(*param) : std::string();
}

namespace {

Json ErrorBody(absl::string_view message, const char* type, const std::string& param,
               const char* code) {
  return {{"error",
           {{"message", std::string(message)},
            {"type", type},
            {"param", param.empty() ? Json(nullptr) : Json(param)},
            {"code", code == nullptr ? Json(nullptr) : Json(code)}}}};
}

}  // namespace

OpenAiError OpenAiErrorFromStatus(const absl::Status& status) {
  struct Kind {
    int http_status;
    const char* type;
    const char* code;
  };
  Kind kind = {500, "server_error", nullptr};
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      kind = {400, "invalid_request_error", nullptr};
      break;
    case absl::StatusCode::kNotFound:
      kind = {404, "invalid_request_error", "model_not_found"};
      break;
    case absl::StatusCode::kResourceExhausted:
      kind = {429, "rate_limit_error", "rate_limit_exceeded"};
      break;
    case absl::StatusCode::kUnavailable:
      kind = {503, "server_error", "service_unavailable"};
      break;
    case absl::StatusCode::kDeadlineExceeded:
      kind = {504, "server_error", "timeout"};
      break;
    default:
      break;
  }
  return {kind.http_status,
          ErrorBody(status.message(), kind.type, OpenAiErrorParam(status), kind.code)};
}

OpenAiError OpenAiHttpError(int http_status, absl::string_view message) {
  return {http_status, ErrorBody(message, "invalid_request_error", "", nullptr)};
}

std::string NewOpenAiResponseId(OpenAiEndpoint endpoint) {
  thread_local absl::BitGen gen;
  return absl::StrFormat("%s-%016x%08x",
                         endpoint == OpenAiEndpoint::kCompletions ? "cmpl" : "chatcmpl",
                         absl::Uniform<uint64_t>(gen), absl::Uniform<uint32_t>(gen));
}

const char* OpenAiFinishReason(v1::FinishReason reason) {
  return reason == v1::FINISH_REASON_LENGTH ? "length" : "stop";
}

Json OpenAiUsage(const v1::GenerateResult& result) {
  return {{"prompt_tokens", result.prompt_tokens()},
          {"completion_tokens", result.completion_tokens()},
          {"total_tokens", result.prompt_tokens() + result.completion_tokens()}};
}

Json OpenAiResponse(const OpenAiResponseMeta& meta, absl::string_view text,
                    const v1::GenerateResult& result) {
  const bool chat = meta.endpoint == OpenAiEndpoint::kChatCompletions;
  Json choice = {{"index", 0},
                 {"logprobs", nullptr},
                 {"finish_reason", OpenAiFinishReason(result.finish_reason())}};
  if (chat) {
    choice["message"] = {{"role", "assistant"}, {"content", std::string(text)}};
  } else {
    choice["text"] = std::string(text);
  }
  return {{"id", meta.id},
          {"object", chat ? "chat.completion" : "text_completion"},
          {"created", meta.created},
          {"model", meta.model},
          {"choices", Json::array({choice})},
          {"usage", OpenAiUsage(result)}};
}

Json OpenAiStreamEncoder::Chunk(Json choice) const {
  const bool chat = meta_.endpoint == OpenAiEndpoint::kChatCompletions;
  choice["index"] = 0;
  choice["logprobs"] = nullptr;
  if (!choice.contains("finish_reason")) choice["finish_reason"] = nullptr;
  Json chunk = {{"id", meta_.id},
                {"object", chat ? "chat.completion.chunk" : "text_completion"},
                {"created", meta_.created},
                {"model", meta_.model},
                {"choices", Json::array({choice})}};
  if (include_usage_) chunk["usage"] = nullptr;  // Only the last chunk has usage.
  return chunk;
}

std::string OpenAiStreamEncoder::Begin() const {
  if (meta_.endpoint != OpenAiEndpoint::kChatCompletions) return "";
  return SseEvent(Chunk({{"delta", {{"role", "assistant"}, {"content", ""}}}}));
}

std::string OpenAiStreamEncoder::Text(absl::string_view text) const {
  if (text.empty()) return "";
  if (meta_.endpoint == OpenAiEndpoint::kChatCompletions) {
    return SseEvent(Chunk({{"delta", {{"content", std::string(text)}}}}));
  }
  return SseEvent(Chunk({{"text", std::string(text)}}));
}

std::string OpenAiStreamEncoder::End(const v1::GenerateResult& result) const {
  Json last = {{"finish_reason", OpenAiFinishReason(result.finish_reason())}};
  if (meta_.endpoint == OpenAiEndpoint::kChatCompletions) {
    last["delta"] = Json::object();
  } else {
    last["text"] = "";
  }
  std::string events = SseEvent(Chunk(std::move(last)));
  if (include_usage_) {
    Json usage = Chunk(Json::object());
    usage["choices"] = Json::array();
    usage["usage"] = OpenAiUsage(result);
    absl::StrAppend(&events, SseEvent(usage));
  }
  absl::StrAppend(&events, kSseDone);
  return events;
}

std::string OpenAiStreamEncoder::Error(const absl::Status& status) const {
  return SseEvent(OpenAiErrorFromStatus(status).body);
}

std::string SseEvent(const Json& data) { return absl::StrCat("data: ", JsonText(data), "\n\n"); }

std::string JsonText(const Json& value) {
  return value.dump(-1, ' ', /*ensure_ascii=*/false, Json::error_handler_t::replace);
}

Json OpenAiModel(const std::string& name, int64_t created) {
  return {{"id", name}, {"object", "model"}, {"created", created}, {"owned_by", "sparseaccel"}};
}

Json OpenAiModelList(const std::string& name, int64_t created) {
  return {{"object", "list"}, {"data", Json::array({OpenAiModel(name, created)})}};
}

std::string ModelNameOfDirectory(absl::string_view model_dir) {
  while (model_dir.size() > 1 && model_dir.back() == '/') model_dir.remove_suffix(1);
  const size_t slash = model_dir.rfind('/');
  return std::string(slash == absl::string_view::npos ? model_dir : model_dir.substr(slash + 1));
}

}  // namespace sparseaccel
