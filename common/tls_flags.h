#ifndef SPARSEACCEL_COMMON_TLS_FLAGS_H_
#define SPARSEACCEL_COMMON_TLS_FLAGS_H_

// The command-line flags both servers take for their own gRPC port: --tls_cert, --tls_key,
// --tls_client_ca (clients must then present a certificate it signed) and
// --tls_refresh_seconds (how often the files are re-read).

#include "common/tls.h"

namespace sparseaccel {

ServerTlsFiles ServerTlsFilesFromFlags();
unsigned TlsRefreshSecondsFromFlags();

}  // namespace sparseaccel

#endif  // SPARSEACCEL_COMMON_TLS_FLAGS_H_
