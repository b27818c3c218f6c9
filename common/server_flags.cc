#include "common/server_flags.h"

#include <algorithm>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/status_macros.h"

ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of the gRPC port (empty: plaintext); needs --tls_key.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle: clients must present a certificate it signed (mutual TLS).");
ABSL_FLAG(int32_t, health_port, 0,
          "Plaintext port answering only grpc.health.v1.Health, for probes that cannot speak "
          "TLS (0: none).");
ABSL_FLAG(int32_t, tls_refresh_seconds, 60,
          "How often TLS files are re-read, so rotated certificates apply without a restart.");

namespace sparseaccel {

unsigned TlsRefreshSecondsFromFlags() {
  return static_cast<unsigned>(std::max(1, absl::GetFlag(FLAGS_tls_refresh_seconds)));
}

ServerTlsFiles ServerTlsFilesFromFlags() {
  ServerTlsFiles files;
  files.cert = absl::GetFlag(FLAGS_tls_cert);
  files.key = absl::GetFlag(FLAGS_tls_key);
  files.client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  files.refresh_seconds = TlsRefreshSecondsFromFlags();
  return files;
}

absl::StatusOr<ServicePorts> StartServiceFromFlags(const std::string& listen,
                                                   grpc::Service* service) {
  const ServerTlsFiles tls = ServerTlsFilesFromFlags();
  ASSIGN_OR_RETURN(const std::shared_ptr<grpc::ServerCredentials> credentials,
                   MakeServerCredentials(tls));
  ServicePorts ports;
  ports.tls = TlsMode(tls);
  ports.server = StartGrpcServer(listen, service, &ports.port, credentials);
  if (ports.server == nullptr)
    return absl::UnavailableError(absl::StrCat("cannot listen on ", listen));
  if (const int health = absl::GetFlag(FLAGS_health_port); health != 0) {
    const std::string address = absl::StrCat("0.0.0.0:", health);
    ports.health = StartHealthServer(address, &ports.health_port);
    if (ports.health == nullptr) {
      ports.server->Shutdown();
      return absl::UnavailableError(absl::StrCat("cannot listen on ", address));
    }
  }
  return ports;
}

void ShutdownService(ServicePorts* ports, absl::Duration grace) {
  if (ports->health) ports->health->server->Shutdown();
  ShutdownGracefully(ports->server.get(), grace);
}

}  // namespace sparseaccel
