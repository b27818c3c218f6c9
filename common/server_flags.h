#ifndef SPARSEACCEL_COMMON_SERVER_FLAGS_H_
#define SPARSEACCEL_COMMON_SERVER_FLAGS_H_

// The command-line flags both servers take for their own gRPC port: --tls_cert, --tls_key,
// --tls_client_ca (clients must then present a certificate it signed),
// --tls_refresh_seconds (how often the files are re-read) and --health_port (a plaintext port
// that answers only health checks: Kubernetes gRPC probes cannot speak TLS).

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/grpc_util.h"
#include "common/tls.h"
#include "grpcpp/grpcpp.h"

namespace sparseaccel {

ServerTlsFiles ServerTlsFilesFromFlags();
unsigned TlsRefreshSecondsFromFlags();

// A service's gRPC server on `listen` as the flags say (TLS, health port), started.
struct ServicePorts {
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<HealthServer> health;  // Null without --health_port.
  int port = 0;
  int health_port = 0;
  std::string tls;  // TlsMode: off, tls, mtls.
};
absl::StatusOr<ServicePorts> StartServiceFromFlags(const std::string& listen,
                                                   grpc::Service* service);
// Health port first (probes fail from then on), then the service drains for up to `grace`.
void ShutdownService(ServicePorts* ports, absl::Duration grace);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_COMMON_SERVER_FLAGS_H_
