#ifndef SPARSEACCEL_DECODE_SERVICE_OPENAI_HTTP_H_
#define SPARSEACCEL_DECODE_SERVICE_OPENAI_HTTP_H_

// The decode service's OpenAI-compatible HTTP API (cpp-httplib, on its own threads):
// POST /v1/completions and /v1/chat/completions (whole responses, or server-sent events with
// "stream": true), GET /v1/models, /v1/models/{id} and /health. Each generation is one call of
// the service's own Generate through an in-process gRPC channel, so validation, limits,
// cancellation, logs and metrics are those of the gRPC API; openai_api.h translates the JSON.
// A streaming client that goes away cancels its call, which frees the decode batch slot.

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "decode_service/openai_api.h"
#include "grpcpp/grpcpp.h"
#include "proto/sparseaccel.grpc.pb.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace sparseaccel {

struct OpenAiHttpOptions {
  std::string host = "0.0.0.0";
  int port = 0;
  OpenAiApiOptions api;
  // Deadline of each generation (504 past it).
  absl::Duration request_timeout = absl::Minutes(10);
  // Connections served at once (each holds a thread while open, keep-alive included).
  int threads = 80;
  // Larger request bodies are answered 413.
  size_t max_body_bytes = 64 << 20;
};

class OpenAiHttpServer {
 public:
  // Listens on options.host:port and serves on its own threads; `channel` reaches the
  // DecodeService (grpc::Server::InProcessChannel).
  static absl::StatusOr<std::unique_ptr<OpenAiHttpServer>> Start(
      std::shared_ptr<grpc::Channel> channel, OpenAiHttpOptions options);
  // StopAccepting(), then waits for the requests still running.
  ~OpenAiHttpServer();

  // Closes the port; running requests go on.
  void StopAccepting();
  // Waits until no generation runs (true), or until `deadline` (false). On SIGTERM, between
  // StopAccepting() and the gRPC server's shutdown: that closes the in-process transport,
  // cutting the calls still on it.
  bool WaitUntilIdle(absl::Time deadline);
  int port() const { return port_; }

  // A generation counts as running (WaitUntilIdle) while one of these lives: a streamed one
  // until its response is done with.
  class Running {
   public:
    explicit Running(OpenAiHttpServer* server);
    ~Running();
    Running(const Running&) = delete;
    Running& operator=(const Running&) = delete;

   private:
    OpenAiHttpServer* const server_;
  };

 private:
  OpenAiHttpServer(std::shared_ptr<grpc::Channel> channel, OpenAiHttpOptions options);
  void AddRoutes();
  void Generate(OpenAiEndpoint endpoint, const httplib::Request& http_request,
                httplib::Response& http_response);

  const OpenAiHttpOptions options_;
  const int64_t started_;  // Unix seconds: the model's "created".
  std::unique_ptr<v1::DecodeService::Stub> stub_;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  std::atomic<bool> stopped_{false};
  absl::Mutex mu_;
  int64_t running_ ABSL_GUARDED_BY(mu_) = 0;
  int port_ = 0;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_DECODE_SERVICE_OPENAI_HTTP_H_
