#ifndef SPARSEACCEL_COMMON_GRPC_UTIL_H_
#define SPARSEACCEL_COMMON_GRPC_UTIL_H_

// Glue between absl::Status and gRPC, and the server lifecycle shared by both services.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/grpcpp.h"

namespace sparseaccel {

// Same code (the numeric values agree) and message.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// Blocks SIGTERM and SIGINT in the calling thread and in every thread it starts later; call at
// the top of main, before any threads exist.
void BlockTerminationSignals();
// Waits for SIGTERM or SIGINT (blocked by BlockTerminationSignals) and returns its number.
int WaitForTerminationSignal();
// What a server's Run does once it serves: waits for SIGTERM or SIGINT, logs
// `<service>.draining` (the signal and `active()` requests still running), runs `drain` and
// logs `<service>.stopped`.
void ServeUntilTerminated(const std::string& service, const std::function<int64_t()>& active,
                          const std::function<void()>& drain);

// Builds a server on `address` with health checking and reflection, over `credentials`
// (null: plaintext; MakeServerCredentials in common/tls.h for TLS). The port actually bound
// (for ":0") goes to *bound_port. Null on failure (logged).
std::unique_ptr<grpc::Server> StartGrpcServer(
    const std::string& address, grpc::Service* service, int* bound_port,
    std::shared_ptr<grpc::ServerCredentials> credentials = nullptr);

// A plaintext server on `address` that serves only grpc.health.v1.Health (SERVING until it is
// shut down): what Kubernetes gRPC probes reach when the service's own port is TLS. Shut it
// down when the service starts draining. Null on failure (logged).
struct HealthServer {
  // Answers every other method UNIMPLEMENTED (a server needs one service of its own).
  std::unique_ptr<grpc::CallbackGenericService> unimplemented;
  std::unique_ptr<grpc::Server> server;  // Declared last: stops before the service goes.
};
std::unique_ptr<HealthServer> StartHealthServer(const std::string& address, int* bound_port);

// Stops accepting calls and lets running ones finish for up to `grace`, then cancels the rest.
void ShutdownGracefully(grpc::Server* server, absl::Duration grace);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_COMMON_GRPC_UTIL_H_
