#include "decode_service/openai_api.h"

#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"

namespace sparseaccel {
namespace {

using Json = nlohmann::json;

OpenAiApiOptions Options() {
  OpenAiApiOptions options;
  options.served_model_name = "tiny";
  options.default_chat_max_tokens = 333;
  return options;
}

absl::StatusOr<OpenAiRequest> Completion(const std::string& body) {
  return ParseOpenAiRequest(OpenAiEndpoint::kCompletions, body, Options());
}

absl::StatusOr<OpenAiRequest> Chat(const std::string& body) {
  return ParseOpenAiRequest(OpenAiEndpoint::kChatCompletions, body, Options());
}

// The HTTP status and the error's param ("" for null) a body gets.
struct Rejection {
  int http_status;
  std::string param;
};
Rejection RejectionOf(const absl::StatusOr<OpenAiRequest>& request) {
  if (request.ok()) return {200, ""};
  const Json body = OpenAiErrorFromStatus(request.status()).body;
  const Json& param = body["error"]["param"];
  return {OpenAiErrorFromStatus(request.status()).http_status,
          param.is_null() ? "" : param.get<std::string>()};
}

TEST(OpenAiApiTest, CompletionFieldsMapToTheGenerateRequest) {
  absl::StatusOr<OpenAiRequest> request = Completion(
      R"({"model": "tiny", "prompt": "Hello", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
          "top_k": 40, "seed": 42, "stop": "\n", "stream": true,
          "stream_options": {"include_usage": true}, "ignore_eos": true, "user": "u1"})");
  ASSERT_TRUE(request.ok()) << request.status();
  const v1::GenerateRequest& g = request->generate;
  EXPECT_EQ(g.prompt_case(), v1::GenerateRequest::kText);
  EXPECT_EQ(g.text(), "Hello");
  EXPECT_EQ(g.max_tokens(), 7);
  EXPECT_FLOAT_EQ(g.sampling().temperature(), 0.5f);
  EXPECT_FLOAT_EQ(g.sampling().top_p(), 0.9f);
  EXPECT_EQ(g.sampling().top_k(), 40);
  EXPECT_EQ(g.sampling().seed(), 42u);
  EXPECT_TRUE(request->has_seed);
  ASSERT_EQ(g.stop_size(), 1);
  EXPECT_EQ(g.stop(0), "\n");
  EXPECT_TRUE(g.ignore_eos());
  EXPECT_TRUE(request->stream);
  EXPECT_TRUE(request->include_usage);
}

TEST(OpenAiApiTest, CompletionDefaultsAreOpenAis) {
  absl::StatusOr<OpenAiRequest> request = Completion(R"({"prompt": "Hi"})");
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_EQ(request->generate.max_tokens(), 16);
  EXPECT_FLOAT_EQ(request->generate.sampling().temperature(), 1.0f);
  EXPECT_FLOAT_EQ(request->generate.sampling().top_p(), 1.0f);
  EXPECT_FALSE(request->has_seed);
  EXPECT_FALSE(request->stream);
  EXPECT_FALSE(request->include_usage);
  EXPECT_EQ(request->generate.stop_size(), 0);
  // null is the default too.
  request = Completion(R"({"prompt": "Hi", "max_tokens": null, "stop": null, "seed": null})");
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_EQ(request->generate.max_tokens(), 16);
  EXPECT_FALSE(request->has_seed);
}

TEST(OpenAiApiTest, PromptShapes) {
  absl::StatusOr<OpenAiRequest> ids = Completion(R"({"prompt": [3, 14, 15]})");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(ids->generate.prompt_case(), v1::GenerateRequest::kTokenIds);
  EXPECT_EQ(std::vector<int32_t>(ids->generate.token_ids().ids().begin(),
                                 ids->generate.token_ids().ids().end()),
            (std::vector<int32_t>{3, 14, 15}));
  absl::StatusOr<OpenAiRequest> nested = Completion(R"({"prompt": [[9, 8]]})");
  ASSERT_TRUE(nested.ok()) << nested.status();
  EXPECT_EQ(nested->generate.token_ids().ids_size(), 2);
  absl::StatusOr<OpenAiRequest> one = Completion(R"({"prompt": ["text"]})");
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ(one->generate.text(), "text");
  for (const char* body :
       {R"({})", R"({"prompt": null})", R"({"prompt": []})", R"({"prompt": ["a", "b"]})",
        R"({"prompt": [[1], [2]]})", R"({"prompt": 7})", R"({"prompt": [1.5]})",
        R"({"prompt": [1, "a"]})", R"({"prompt": [-1]})", R"({"prompt": [4294967296]})",
        R"({"prompt": {"text": "a"}})", R"({"prompt": [true]})"}) {
    const Rejection rejection = RejectionOf(Completion(body));
    EXPECT_EQ(rejection.http_status, 400) << body;
    EXPECT_EQ(rejection.param, "prompt") << body;
  }
}

TEST(OpenAiApiTest, StopIsAStringOrAnArrayOfStrings) {
  absl::StatusOr<OpenAiRequest> one = Completion(R"({"prompt": "a", "stop": "END"})");
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ(std::vector<std::string>(one->generate.stop().begin(), one->generate.stop().end()),
            std::vector<std::string>{"END"});
  absl::StatusOr<OpenAiRequest> many = Completion(R"({"prompt": "a", "stop": ["x", "yz"]})");
  ASSERT_TRUE(many.ok()) << many.status();
  EXPECT_EQ(std::vector<std::string>(many->generate.stop().begin(), many->generate.stop().end()),
            (std::vector<std::string>{"x", "yz"}));
  absl::StatusOr<OpenAiRequest> none = Completion(R"({"prompt": "a", "stop": []})");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->generate.stop_size(), 0);
  for (const char* body : {R"({"prompt": "a", "stop": 5})", R"({"prompt": "a", "stop": ["x", 1]})",
                           R"({"prompt": "a", "stop": {"s": "x"}})"}) {
    const Rejection rejection = RejectionOf(Completion(body));
    EXPECT_EQ(rejection.http_status, 400) << body;
    EXPECT_EQ(rejection.param, "stop") << body;
  }
}

TEST(OpenAiApiTest, FieldsOfTheWrongTypeOrRangeAre400NamingTheField) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"("max_tokens": "16")", "max_tokens"},
      {R"("max_tokens": 16.5)", "max_tokens"},
      {R"("max_tokens": 1e12)", "max_tokens"},
      {R"("max_tokens": 99999999999)", "max_tokens"},
      {R"("max_tokens": 18446744073709551615)", "max_tokens"},
      {R"("temperature": "hot")", "temperature"},
      {R"("temperature": -0.1)", "temperature"},
      {R"("temperature": 2.5)", "temperature"},
      {R"("top_p": 1.5)", "top_p"},
      {R"("top_p": [1])", "top_p"},
      {R"("top_k": -2)", "top_k"},
      {R"("seed": 1.5)", "seed"},
      {R"("seed": "7")", "seed"},
      {R"("stream": "yes")", "stream"},
      {R"("stream": 1)", "stream"},
      {R"("stream_options": true)", "stream_options"},
      {R"("stream_options": {"include_usage": 1})", "stream_options.include_usage"},
      {R"("ignore_eos": "no")", "ignore_eos"},
      {R"("model": 5)", "model"},
  };
  for (const auto& [field, param] : cases) {
    const std::string body = R"({"prompt": "a", )" + field + "}";
    const Rejection rejection = RejectionOf(Completion(body));
    EXPECT_EQ(rejection.http_status, 400) << body;
    EXPECT_EQ(rejection.param, param) << body;
  }
  // In int32 but out of the server's range: left to the gRPC path, which knows its limit.
  absl::StatusOr<OpenAiRequest> zero = Completion(R"({"prompt": "a", "max_tokens": 0})");
  ASSERT_TRUE(zero.ok());
  EXPECT_EQ(zero->generate.max_tokens(), 0);
  // Large seeds and negative ones are seeds too; top_k -1 means no cut.
  absl::StatusOr<OpenAiRequest> seeds =
      Completion(R"({"prompt": "a", "seed": 18446744073709551615, "top_k": -1})");
  ASSERT_TRUE(seeds.ok()) << seeds.status();
  EXPECT_EQ(seeds->generate.sampling().seed(), 18446744073709551615u);
  EXPECT_EQ(seeds->generate.sampling().top_k(), 0);
  absl::StatusOr<OpenAiRequest> negative = Completion(R"({"prompt": "a", "seed": -1})");
  ASSERT_TRUE(negative.ok()) << negative.status();
  EXPECT_EQ(negative->generate.sampling().seed(), 18446744073709551615u);
}

TEST(OpenAiApiTest, BodiesThatAreNotJsonObjectsAre400) {
  for (const char* body : {"", "{", "{\"prompt\": \"a\",}", "not json", "[1, 2]", "\"text\"",
                           "null", "{\"prompt\": \"a\"} trailing"}) {
    const absl::StatusOr<OpenAiRequest> request = Completion(body);
    EXPECT_EQ(RejectionOf(request).http_status, 400) << body;
    EXPECT_EQ(RejectionOf(request).param, "") << body;
  }
}

TEST(OpenAiApiTest, AnotherModelIs404ModelNotFound) {
  const absl::StatusOr<OpenAiRequest> request = Completion(R"({"model": "gpt-4", "prompt": "a"})");
  ASSERT_FALSE(request.ok());
  const OpenAiError error = OpenAiErrorFromStatus(request.status());
  EXPECT_EQ(error.http_status, 404);
  EXPECT_EQ(error.body["error"]["code"], "model_not_found");
  EXPECT_EQ(error.body["error"]["param"], "model");
  EXPECT_EQ(error.body["error"]["type"], "invalid_request_error");
  EXPECT_NE(error.body["error"]["message"].get<std::string>().find("gpt-4"), std::string::npos);
  // The chat endpoint checks the model too; no model at all means the served one.
  EXPECT_EQ(RejectionOf(Chat(R"({"model": "x", "messages": [{"role": "user", "content": "a"}]})"))
                .http_status,
            404);
  EXPECT_TRUE(Completion(R"({"prompt": "a"})").ok());
}

TEST(OpenAiApiTest, ChatMessagesMapToChat) {
  absl::StatusOr<OpenAiRequest> request = Chat(R"({"model": "tiny", "messages": [
      {"role": "developer", "content": "Be brief."},
      {"role": "user", "name": "ann",
       "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
      {"role": "assistant", "content": "Hello."},
      {"role": "user", "content": "Again"}]})");
  ASSERT_TRUE(request.ok()) << request.status();
  const v1::GenerateRequest& g = request->generate;
  ASSERT_EQ(g.prompt_case(), v1::GenerateRequest::kChat);
  ASSERT_EQ(g.chat().messages_size(), 4);
  EXPECT_EQ(g.chat().messages(0).role(), "system");
  EXPECT_EQ(g.chat().messages(0).content(), "Be brief.");
  EXPECT_EQ(g.chat().messages(1).role(), "user");
  EXPECT_EQ(g.chat().messages(1).content(), "Hi there");
  EXPECT_EQ(g.chat().messages(2).role(), "assistant");
  EXPECT_EQ(g.chat().messages(3).content(), "Again");
  EXPECT_EQ(g.max_tokens(), 333);  // The server's default for chat.
  // Roles the template does not know are left to the gRPC path (INVALID_ARGUMENT there).
  request = Chat(R"({"messages": [{"role": "wizard", "content": "a"}]})");
  ASSERT_TRUE(request.ok());
  EXPECT_EQ(request->generate.chat().messages(0).role(), "wizard");
}

TEST(OpenAiApiTest, ChatMaxCompletionTokensWinsOverMaxTokens) {
  const std::string messages = R"("messages": [{"role": "user", "content": "a"}])";
  absl::StatusOr<OpenAiRequest> old_name = Chat("{" + messages + R"(, "max_tokens": 5})");
  ASSERT_TRUE(old_name.ok());
  EXPECT_EQ(old_name->generate.max_tokens(), 5);
  absl::StatusOr<OpenAiRequest> both =
      Chat("{" + messages + R"(, "max_tokens": 5, "max_completion_tokens": 9})");
  ASSERT_TRUE(both.ok());
  EXPECT_EQ(both->generate.max_tokens(), 9);
  EXPECT_EQ(RejectionOf(Chat("{" + messages + R"(, "max_completion_tokens": "9"})")).param,
            "max_completion_tokens");
}

TEST(OpenAiApiTest, BadMessagesAre400) {
  for (const char* body :
       {R"({})", R"({"messages": []})", R"({"messages": "hi"})", R"({"messages": ["hi"]})",
        R"({"messages": [{"content": "hi"}]})", R"({"messages": [{"role": 1, "content": "hi"}]})",
        R"({"messages": [{"role": "user"}]})",
        R"({"messages": [{"role": "user", "content": null}]})",
        R"({"messages": [{"role": "user", "content": 5}]})",
        R"({"messages": [{"role": "user", "content": [{"type": "image_url",
                               "image_url": {"url": "http://x"}}]}]})",
        R"({"messages": [{"role": "user", "content": [{"type": "text"}]}]})",
        R"({"prompt": "a"})"}) {
    const Rejection rejection = RejectionOf(Chat(body));
    EXPECT_EQ(rejection.http_status, 400) << body;
    EXPECT_EQ(rejection.param, "messages") << body;
  }
}

TEST(OpenAiApiTest, UnimplementedFieldsAreRejectedUnlessDefault) {
  const std::string chat = R"("messages": [{"role": "user", "content": "a"}])";
  const std::vector<std::pair<std::string, std::string>> rejected = {
      {R"("n": 2)", "n"},
      {R"("n": 0)", "n"},
      {R"("logprobs": true)", "logprobs"},
      {R"("top_logprobs": 3)", "top_logprobs"},
      {R"("presence_penalty": 0.5)", "presence_penalty"},
      {R"("frequency_penalty": -1)", "frequency_penalty"},
      {R"("logit_bias": {"50256": -100})", "logit_bias"},
      {R"("tools": [{"type": "function", "function": {"name": "f"}}])", "tools"},
      {R"("functions": [{"name": "f"}])", "functions"},
      {R"("response_format": {"type": "json_object"})", "response_format"},
  };
  for (const auto& [field, param] : rejected) {
    const std::string body = "{" + chat + ", " + field + "}";
    const Rejection rejection = RejectionOf(Chat(body));
    EXPECT_EQ(rejection.http_status, 400) << body;
    EXPECT_EQ(rejection.param, param) << body;
  }
  for (const char* field : {R"("n": 1)", R"("logprobs": false)", R"("presence_penalty": 0)",
                            R"("frequency_penalty": 0.0)", R"("logit_bias": {})", R"("tools": [])",
                            R"("response_format": {"type": "text"})", R"("metadata": {"a": "b"})",
                            R"("unknown_field": 1)", R"("stream": false)"}) {
    const std::string body = "{" + chat + ", " + field + "}";
    EXPECT_TRUE(Chat(body).ok()) << body;
  }
  for (const auto& [field, param] :
       std::vector<std::pair<std::string, std::string>>{{R"("echo": true)", "echo"},
                                                        {R"("best_of": 3)", "best_of"},
                                                        {R"("suffix": "end")", "suffix"},
                                                        {R"("logprobs": 2)", "logprobs"}}) {
    const std::string body = R"({"prompt": "a", )" + field + "}";
    EXPECT_EQ(RejectionOf(Completion(body)).param, param) << body;
  }
  EXPECT_TRUE(Completion(R"({"prompt": "a", "echo": false, "best_of": 1, "logprobs": null,
                            "suffix": null})")
                  .ok());
}

TEST(OpenAiApiTest, StatusCodesMapToHttpStatusesAndErrorJson) {
  const std::vector<std::pair<absl::Status, int>> cases = {
      {absl::InvalidArgumentError("max_tokens must be in [1, 4096], got 0"), 400},
      {absl::OutOfRangeError("token id 9999"), 400},
      {absl::NotFoundError("no model"), 404},
      {absl::ResourceExhaustedError("queue full"), 429},
      {absl::UnavailableError("prefill down"), 503},
      {absl::DeadlineExceededError("late"), 504},
      {absl::InternalError("bug"), 500},
      {absl::FailedPreconditionError("no tokenizer"), 500},
      {absl::CancelledError("gone"), 500},
      {absl::UnknownError("?"), 500},
  };
  for (const auto& [status, http_status] : cases) {
    const OpenAiError error = OpenAiErrorFromStatus(status);
    EXPECT_EQ(error.http_status, http_status) << status;
    ASSERT_TRUE(error.body.is_object());
    ASSERT_EQ(error.body.size(), 1u);
    const Json& e = error.body["error"];
    std::set<std::string> keys;
    for (const auto& item : e.items()) keys.insert(item.key());
    EXPECT_EQ(keys, (std::set<std::string>{"message", "type", "param", "code"})) << status;
    EXPECT_EQ(e["message"], std::string(status.message()));
    EXPECT_EQ(e["type"], http_status < 500 && http_status != 429 ? "invalid_request_error"
                         : http_status == 429                    ? "rate_limit_error"
                                                                 : "server_error");
    EXPECT_TRUE(e["param"].is_null());
  }
  EXPECT_EQ(OpenAiErrorFromStatus(absl::ResourceExhaustedError("x")).body["error"]["code"],
            "rate_limit_exceeded");
  EXPECT_EQ(OpenAiErrorFromStatus(absl::DeadlineExceededError("x")).body["error"]["code"],
            "timeout");
  EXPECT_TRUE(
      OpenAiErrorFromStatus(absl::InvalidArgumentError("x")).body["error"]["code"].is_null());
  EXPECT_EQ(OpenAiErrorParam(WithOpenAiParam(absl::InvalidArgumentError("x"), "stop")), "stop");
  const OpenAiError route = OpenAiHttpError(404, "Invalid URL (GET /v2)");
  EXPECT_EQ(route.http_status, 404);
  EXPECT_EQ(route.body["error"]["message"], "Invalid URL (GET /v2)");
}

v1::GenerateResult Result(v1::FinishReason reason, int prompt, int completion) {
  v1::GenerateResult result;
  result.set_finish_reason(reason);
  result.set_prompt_tokens(prompt);
  result.set_completion_tokens(completion);
  return result;
}

TEST(OpenAiApiTest, UsageAndFinishReasons) {
  EXPECT_EQ(OpenAiUsage(Result(v1::FINISH_REASON_LENGTH, 5, 7)),
            Json({{"prompt_tokens", 5}, {"completion_tokens", 7}, {"total_tokens", 12}}));
  EXPECT_STREQ(OpenAiFinishReason(v1::FINISH_REASON_LENGTH), "length");
  EXPECT_STREQ(OpenAiFinishReason(v1::FINISH_REASON_STOP), "stop");
  EXPECT_STREQ(OpenAiFinishReason(v1::FINISH_REASON_EOS), "stop");
}

TEST(OpenAiApiTest, WholeResponsesHaveOpenAisShape) {
  const OpenAiResponseMeta completion{OpenAiEndpoint::kCompletions, "cmpl-1", 1700000000, "tiny"};
  const Json text = OpenAiResponse(completion, "Paris", Result(v1::FINISH_REASON_STOP, 3, 2));
  EXPECT_EQ(text, Json::parse(R"({"id": "cmpl-1", "object": "text_completion",
      "created": 1700000000, "model": "tiny",
      "choices": [{"index": 0, "text": "Paris", "logprobs": null, "finish_reason": "stop"}],
      "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})"));
  const OpenAiResponseMeta chat{OpenAiEndpoint::kChatCompletions, "chatcmpl-1", 17, "tiny"};
  const Json message = OpenAiResponse(chat, "Hi", Result(v1::FINISH_REASON_LENGTH, 10, 4));
  EXPECT_EQ(message, Json::parse(R"({"id": "chatcmpl-1", "object": "chat.completion",
      "created": 17, "model": "tiny",
      "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                   "logprobs": null, "finish_reason": "length"}],
      "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}})"));
}

// The JSON payloads of a run of server-sent events; "[DONE]" as the string "[DONE]".
std::vector<Json> Events(const std::string& sse) {
  std::vector<Json> events;
  for (absl::string_view event : absl::StrSplit(sse, "\n\n", absl::SkipEmpty())) {
    EXPECT_TRUE(absl::StartsWith(event, "data: ")) << event;
    event.remove_prefix(6);
    events.push_back(event == "[DONE]" ? Json("[DONE]") : Json::parse(event));
  }
  return events;
}

TEST(OpenAiApiTest, ChatStreamIsRoleThenDeltasThenFinishThenUsageThenDone) {
  const OpenAiStreamEncoder encoder({OpenAiEndpoint::kChatCompletions, "chatcmpl-9", 5, "tiny"},
                                    /*include_usage=*/true);
  const std::string sse = encoder.Begin() + encoder.Text("Hel") + encoder.Text("") +
                          encoder.Text("lo") + encoder.End(Result(v1::FINISH_REASON_EOS, 4, 2));
  EXPECT_TRUE(absl::EndsWith(sse, "\n\ndata: [DONE]\n\n"));
  const std::vector<Json> events = Events(sse);
  ASSERT_EQ(events.size(), 6u);  // The empty text sends nothing.
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(events[i]["id"], "chatcmpl-9");
    EXPECT_EQ(events[i]["object"], "chat.completion.chunk");
    EXPECT_EQ(events[i]["created"], 5);
    EXPECT_EQ(events[i]["model"], "tiny");
  }
  EXPECT_EQ(events[0]["choices"], Json::parse(R"([{"index": 0, "delta": {"role": "assistant",
      "content": ""}, "logprobs": null, "finish_reason": null}])"));
  EXPECT_EQ(events[1]["choices"][0]["delta"], Json({{"content", "Hel"}}));
  EXPECT_TRUE(events[1]["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(events[1]["usage"].is_null());
  EXPECT_TRUE(events[1].contains("usage"));
  EXPECT_EQ(events[2]["choices"][0]["delta"], Json({{"content", "lo"}}));
  EXPECT_EQ(events[3]["choices"][0]["delta"], Json::object());
  EXPECT_EQ(events[3]["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(events[4]["choices"], Json::array());
  EXPECT_EQ(events[4]["usage"],
            Json({{"prompt_tokens", 4}, {"completion_tokens", 2}, {"total_tokens", 6}}));
  EXPECT_EQ(events[5], "[DONE]");
}

TEST(OpenAiApiTest, CompletionStreamWithoutUsage) {
  const OpenAiStreamEncoder encoder({OpenAiEndpoint::kCompletions, "cmpl-2", 5, "tiny"},
                                    /*include_usage=*/false);
  EXPECT_EQ(encoder.Begin(), "");
  const std::vector<Json> events =
      Events(encoder.Text("a") + encoder.End(Result(v1::FINISH_REASON_LENGTH, 1, 1)));
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0]["object"], "text_completion");
  EXPECT_EQ(events[0]["choices"], Json::parse(R"([{"index": 0, "text": "a", "logprobs": null,
      "finish_reason": null}])"));
  EXPECT_FALSE(events[0].contains("usage"));
  EXPECT_EQ(events[1]["choices"][0]["text"], "");
  EXPECT_EQ(events[1]["choices"][0]["finish_reason"], "length");
  EXPECT_FALSE(events[1].contains("usage"));
  EXPECT_EQ(events[2], "[DONE]");
}

TEST(OpenAiApiTest, StreamErrorIsAnErrorEventWithoutDone) {
  const OpenAiStreamEncoder encoder({OpenAiEndpoint::kCompletions, "cmpl-3", 5, "tiny"}, true);
  const std::string sse = encoder.Error(absl::UnavailableError("prefill stream broke"));
  EXPECT_EQ(sse.find("[DONE]"), std::string::npos);
  const std::vector<Json> events = Events(sse);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0]["error"]["message"], "prefill stream broke");
  EXPECT_EQ(events[0]["error"]["code"], "service_unavailable");
}

TEST(OpenAiApiTest, JsonTextReplacesInvalidUtf8) {
  EXPECT_EQ(JsonText(Json{{"text", std::string("a\xff")}}), "{\"text\":\"a\xEF\xBF\xBD\"}");
  EXPECT_EQ(SseEvent(Json{{"t", "\xC3\xA9"}}), "data: {\"t\":\"\xC3\xA9\"}\n\n");
}

TEST(OpenAiApiTest, ModelsAndIds) {
  EXPECT_EQ(OpenAiModelList("tiny", 9), Json::parse(R"({"object": "list", "data": [
      {"id": "tiny", "object": "model", "created": 9, "owned_by": "sparseaccel"}]})"));
  EXPECT_EQ(ModelNameOfDirectory("/models/Llama-3.1-8B/"), "Llama-3.1-8B");
  EXPECT_EQ(ModelNameOfDirectory("/models/Llama-3.1-8B"), "Llama-3.1-8B");
  EXPECT_EQ(ModelNameOfDirectory("tiny"), "tiny");
  EXPECT_EQ(ModelNameOfDirectory("out//demo-model//"), "demo-model");
  const std::string a = NewOpenAiResponseId(OpenAiEndpoint::kCompletions);
  const std::string b = NewOpenAiResponseId(OpenAiEndpoint::kCompletions);
  EXPECT_TRUE(absl::StartsWith(a, "cmpl-")) << a;
  EXPECT_NE(a, b);
  EXPECT_TRUE(absl::StartsWith(NewOpenAiResponseId(OpenAiEndpoint::kChatCompletions), "chatcmpl-"));
  EXPECT_LE(a.size(), 128u);  // A request_id the gRPC path accepts.
}

}  // namespace
}  // namespace sparseaccel
