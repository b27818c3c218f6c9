#include "common/grpc_util.h"

#include <signal.h>

#include <algorithm>
#include <chrono>

#include "common/log.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/impl/server_builder_plugin.h"

namespace sparseaccel {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

namespace {
sigset_t TerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  return set;
}
}  // namespace

void BlockTerminationSignals() {
  sigset_t set = TerminationSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForTerminationSignal() {
  sigset_t set = TerminationSignals();
  int signal = 0;
  sigwait(&set, &signal);
  return signal;
}

void ServeUntilTerminated(const std::string& service, const std::function<int64_t()>& active,
                          const std::function<void()>& drain) {
  const int signal = WaitForTerminationSignal();
  LogInfo(service + ".draining", {{"signal", signal}, {"active", active()}});
  drain();
  LogInfo(service + ".stopped");
}

namespace {

// Drops server reflection, which StartGrpcServer registers for every server built after it,
// from a server that must expose nothing but health.
class WithoutReflection final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [](const std::unique_ptr<grpc::ServerBuilderPlugin>& plugin) {
                                    return plugin->name().find("reflection") != std::string::npos;
                                  }),
                   plugins->end());
  }
};

std::unique_ptr<grpc::Server> BuildAndStart(grpc::ServerBuilder* builder,
                                            const std::string& address, int* bound_port) {
  std::unique_ptr<grpc::Server> server = builder->BuildAndStart();
  if (server == nullptr || *bound_port == 0) {
    LogError("grpc.listen_failed", {{"address", address}});
    return nullptr;
  }
  return server;
}

}  // namespace

std::unique_ptr<grpc::Server> StartGrpcServer(
    const std::string& address, grpc::Service* service, int* bound_port,
    std::shared_ptr<grpc::ServerCredentials> credentials) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, credentials ? credentials : grpc::InsecureServerCredentials(),
                           bound_port);
  builder.RegisterService(service);
  // KV chunks are ~1 MiB; leave room for large token-id prompts too.
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.SetMaxSendMessageSize(64 << 20);
  return BuildAndStart(&builder, address, bound_port);
}

std::unique_ptr<HealthServer> StartHealthServer(const std::string& address, int* bound_port) {
  grpc::EnableDefaultHealthCheckService(true);
  auto health = std::make_unique<HealthServer>();
  health->unimplemented = std::make_unique<grpc::CallbackGenericService>();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), bound_port);
  builder.SetOption(std::make_unique<WithoutReflection>());
  builder.RegisterCallbackGenericService(health->unimplemented.get());
  builder.SetMaxReceiveMessageSize(4 << 10);
  health->server = BuildAndStart(&builder, address, bound_port);
  if (health->server == nullptr) return nullptr;
  return health;
}

void ShutdownGracefully(grpc::Server* server, absl::Duration grace) {
  server->Shutdown(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(absl::ToInt64Milliseconds(grace)));
  server->Wait();
}

}  // namespace sparseaccel
