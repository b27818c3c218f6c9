#include "decode_service/openai_http.h"

#include <chrono>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "decode_service/generate_call.h"
#include "httplib.h"

namespace sparseaccel {
namespace {

using Clock = std::chrono::steady_clock;
using Kind = GenerateCall::Event::Kind;

// How often a streaming request looks at its client's socket while it waits for a token.
constexpr absl::Duration kClientCheckInterval = absl::Milliseconds(100);

void SetJson(httplib::Response& response, int http_status, const nlohmann::json& body) {
  response.status = http_status;
  response.set_content(JsonText(body), "application/json");
}

void SetError(httplib::Response& response, const OpenAiError& error) {
  SetJson(response, error.http_status, error.body);
}

// One line per request, without its content (the Generate call logs its own line too, under
// the same request_id). Errors of the client's (4xx) are logged by code alone: their messages
// can quote the request (a model name, a field's value).
void LogRequest(const OpenAiResponseMeta& meta, bool stream, int http_status,
                const absl::Status& status, Clock::time_point start) {
  const std::string logged = http_status >= 400 && http_status < 500
                                 ? absl::StatusCodeToString(status.code())
                                 : StatusForLog(status);
  LogInfo("openai.done",
          {{"request_id", meta.id},
           {"route", meta.endpoint == OpenAiEndpoint::kCompletions ? "/v1/completions"
                                                                   : "/v1/chat/completions"},
           {"stream", stream},
           {"http_status", http_status},
           {"status", logged},
           {"seconds", std::chrono::duration<double>(Clock::now() - start).count()}});
}

// The text of a whole (not streamed) response, once the call has ended; returns its status.
absl::Status CollectText(GenerateCall& call, GenerateCall::Event event, std::string* text,
                         v1::GenerateResult* result) {
  for (; event.kind != Kind::kEnd; event = call.WaitNext(absl::InfiniteDuration())) {
    if (event.response.has_token()) *text += event.response.token().text();
    if (event.response.has_result()) *result = event.response.result();
  }
  return event.status;
}

// What a streamed response needs after its handler has returned.
struct Stream {
  using Running = OpenAiHttpServer::Running;
  Stream(std::unique_ptr<Running> running, std::unique_ptr<GenerateCall> call,
         GenerateCall::Event first, OpenAiResponseMeta meta, bool include_usage)
      : running(std::move(running)),
        call(std::move(call)),
        first(std::move(first)),
        encoder(meta, include_usage) {}
  std::unique_ptr<Running> running;  // Destroyed last.
  std::unique_ptr<GenerateCall> call;
  GenerateCall::Event first;
  OpenAiStreamEncoder encoder;
  absl::Status status = absl::CancelledError("the HTTP client went away");
};

// Writes a streamed response's events as the tokens come. A client that went away (a write
// failed, or its socket closed while a token was awaited) cancels the call. Returns whether
// the whole stream was written; stream->status says how the call ended.
bool WriteEvents(Stream* stream, httplib::DataSink& sink) {
  const auto write = [&sink](const std::string& data) {
    return data.empty() || sink.write(data.data(), data.size());
  };
  GenerateCall::Event event = std::move(stream->first);
  bool connected = write(stream->encoder.Begin());
  v1::GenerateResult result;
  while (connected && event.kind != Kind::kEnd) {
    if (event.kind == Kind::kTimeout) {
      connected = sink.is_writable();  // httplib peeks: false once the peer has closed.
    } else if (event.response.has_token()) {
      connected = write(stream->encoder.Text(event.response.token().text()));
    } else if (event.response.has_result()) {
      result = event.response.result();
    }
    if (connected) event = stream->call->WaitNext(kClientCheckInterval);
  }
  if (!connected) {
    stream->call->Cancel();
    stream->status = absl::CancelledError("the HTTP client went away");
    return false;
  }
  stream->status = event.status;
  if (!write(event.status.ok() ? stream->encoder.End(result) : stream->encoder.Error(event.status)))
    return false;
  sink.done();
  return true;
}

uint64_t RandomSeed() {
  thread_local absl::BitGen gen;
  return absl::Uniform<uint64_t>(gen);
}

}  // namespace

OpenAiHttpServer::OpenAiHttpServer(std::shared_ptr<grpc::Channel> channel,
                                   OpenAiHttpOptions options)
    : options_(std::move(options)),
      started_(absl::ToUnixSeconds(absl::Now())),
      stub_(v1::DecodeService::NewStub(std::move(channel))),
      http_(std::make_unique<httplib::Server>()) {}

absl::StatusOr<std::unique_ptr<OpenAiHttpServer>> OpenAiHttpServer::Start(
    std::shared_ptr<grpc::Channel> channel, OpenAiHttpOptions options) {
  auto server =
      std::unique_ptr<OpenAiHttpServer>(new OpenAiHttpServer(std::move(channel), options));
  httplib::Server* http = server->http_.get();
  const int threads = options.threads;
  http->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  http->set_payload_max_length(options.max_body_bytes);
  server->AddRoutes();
  server->port_ = options.port == 0 ? http->bind_to_any_port(options.host)
                  : http->bind_to_port(options.host, options.port) ? options.port
                                                                   : -1;
  if (server->port_ <= 0) {
    return absl::UnavailableError(
        absl::StrCat("openai: cannot listen on ", options.host, ":", options.port));
  }
  server->thread_ = std::thread([http] { http->listen_after_bind(); });
  // stop() is a no-op until the server runs: wait for it, so the destructor cannot miss it.
  while (!http->is_running()) absl::SleepFor(absl::Milliseconds(1));
  return server;
}

OpenAiHttpServer::~OpenAiHttpServer() {
  StopAccepting();
  thread_.join();  // The thread pool finishes the requests that run.
}

void OpenAiHttpServer::StopAccepting() {
  if (!stopped_.exchange(true)) http_->stop();
}

bool OpenAiHttpServer::WaitUntilIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  const auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return running_ == 0; };
  return mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

OpenAiHttpServer::Running::Running(OpenAiHttpServer* server) : server_(server) {
  absl::MutexLock lock(&server_->mu_);
  ++server_->running_;
}

OpenAiHttpServer::Running::~Running() {
  absl::MutexLock lock(&server_->mu_);
  --server_->running_;
}

void OpenAiHttpServer::AddRoutes() {
  http_->Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Generate(OpenAiEndpoint::kCompletions, req, res);
  });
  http_->Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Generate(OpenAiEndpoint::kChatCompletions, req, res);
  });
  const std::string& model = options_.api.served_model_name;
  http_->Get("/v1/models", [this, model](const httplib::Request&, httplib::Response& res) {
    SetJson(res, 200, OpenAiModelList(model, started_));
  });
  http_->Get("/v1/models/(.+)", [this, model](const httplib::Request& req, httplib::Response& res) {
    if (req.matches[1] == model) return SetJson(res, 200, OpenAiModel(model, started_));
    SetError(res, OpenAiErrorFromStatus(absl::NotFoundError(
                      absl::StrCat("The model '", req.matches[1].str(), "' does not exist"))));
  });
  http_->Get("/health", [](const httplib::Request&, httplib::Response& res) {
    SetJson(res, 200, {{"status", "ok"}});
  });
  // Unknown routes, wrong methods, bodies over the limit: OpenAI's error JSON too.
  httplib::Server::HandlerWithResponse on_error = [](const httplib::Request& req,
                                                     httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    const std::string message = res.status == 404
                                    ? absl::StrCat("Invalid URL (", req.method, " ", req.path, ")")
                                : res.status == 413 ? std::string("the request body is too large")
                                                    : absl::StrCat("HTTP status ", res.status);
    SetError(res, OpenAiHttpError(res.status, message));
    return httplib::Server::HandlerResponse::Handled;
  };
  http_->set_error_handler(on_error);
  http_->set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
        SetError(res, OpenAiErrorFromStatus(absl::InternalError("unexpected exception")));
      });
}

void OpenAiHttpServer::Generate(OpenAiEndpoint endpoint, const httplib::Request& http_request,
                                httplib::Response& http_response) {
  const Clock::time_point start = Clock::now();
  const OpenAiResponseMeta meta{endpoint, NewOpenAiResponseId(endpoint),
                                absl::ToUnixSeconds(absl::Now()), options_.api.served_model_name};
  absl::StatusOr<OpenAiRequest> request =
      ParseOpenAiRequest(endpoint, http_request.body, options_.api);
  const bool stream = request.ok() && request->stream;
  const auto fail = [&](const absl::Status& status) {
    const OpenAiError error = OpenAiErrorFromStatus(status);
    SetError(http_response, error);
    LogRequest(meta, stream, error.http_status, status, start);
  };
  if (!request.ok()) return fail(request.status());
  request->generate.set_request_id(meta.id);
  if (!request->has_seed) request->generate.mutable_sampling()->set_seed(RandomSeed());
  auto running = std::make_unique<Running>(this);
  auto call =
      std::make_unique<GenerateCall>(stub_.get(), request->generate, options_.request_timeout);
  // The HTTP status depends on whether the call fails before its first token.
  GenerateCall::Event first = call->WaitNext(absl::InfiniteDuration());
  if (first.kind == Kind::kEnd && !first.status.ok()) return fail(first.status);
  if (!stream) {
    std::string text;
    v1::GenerateResult result;
    const absl::Status status = CollectText(*call, std::move(first), &text, &result);
    if (!status.ok()) return fail(status);
    SetJson(http_response, 200, OpenAiResponse(meta, text, result));
    return LogRequest(meta, false, 200, status, start);
  }
  auto events = std::make_shared<Stream>(std::move(running), std::move(call), std::move(first),
                                         meta, request->include_usage);
  http_response.set_header("Cache-Control", "no-cache");
  http_response.set_chunked_content_provider(
      "text/event-stream",
      [events](size_t, httplib::DataSink& sink) { return WriteEvents(events.get(), sink); },
      [events, meta, start](bool) { LogRequest(meta, true, 200, events->status, start); });
}

}  // namespace sparseaccel
