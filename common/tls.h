#ifndef SPARSEACCEL_COMMON_TLS_H_
#define SPARSEACCEL_COMMON_TLS_H_

// TLS for the gRPC servers and for the channels between the services, from PEM files. gRPC
// re-reads the files every `refresh_seconds`, so certificates rotated in place (a Kubernetes
// Secret update) take effect for new connections without a restart. The files are checked
// once when the credentials are made: a missing or unreadable file, a certificate that does
// not parse, or a key that does not match its certificate is an InvalidArgument error naming
// the file, so a service refuses to start instead of failing every handshake.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"

namespace sparseaccel {

struct ServerTlsFiles {
  std::string cert;  // PEM certificate chain; empty: plaintext (and the other fields empty).
  std::string key;   // PEM private key of `cert`.
  // PEM CA bundle; set: every client must present a certificate that chains to it (mTLS).
  std::string client_ca;
  unsigned refresh_seconds = 60;
};

struct ChannelTlsFiles {
  std::string ca;  // PEM roots the server's certificate must chain to; empty: plaintext.
  // A client certificate and its key, for servers that require one (both or neither).
  std::string cert;
  std::string key;
  unsigned refresh_seconds = 60;
};

// "off", "tls" or "mtls" (client certificates required, or presented), for logs.
const char* TlsMode(const ServerTlsFiles& files);
const char* TlsMode(const ChannelTlsFiles& files);

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const ServerTlsFiles& files);

// Credentials for a channel. The server's certificate must name the target's host (or the
// name given to grpc::ChannelArguments::SetSslTargetNameOverride).
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const ChannelTlsFiles& files);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_COMMON_TLS_H_
