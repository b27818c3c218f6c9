#include "common/tls_flags.h"

#include <algorithm>
#include <string>

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of the gRPC port (empty: plaintext); needs --tls_key.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle: clients must present a certificate it signed (mutual TLS).");
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

}  // namespace sparseaccel
