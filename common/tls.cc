#include "common/tls.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status_macros.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"

namespace sparseaccel {
namespace {

using grpc::experimental::FileWatcherCertificateProvider;

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* what) {
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", text.status().message()));
  }
  return text;
}

struct BioDeleter {
  void operator()(BIO* bio) const { BIO_free(bio); }
};
struct X509Deleter {
  void operator()(X509* cert) const { X509_free(cert); }
};
struct KeyDeleter {
  void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};

std::unique_ptr<BIO, BioDeleter> MemoryBio(const std::string& pem) {
  return std::unique_ptr<BIO, BioDeleter>(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// The first certificate of a PEM file at `path`.
absl::StatusOr<std::unique_ptr<X509, X509Deleter>> ReadCertificate(const std::string& path,
                                                                   const char* what) {
  ASSIGN_OR_RETURN(const std::string pem, ReadPem(path, what));
  std::unique_ptr<X509, X509Deleter> cert(
      PEM_read_bio_X509(MemoryBio(pem).get(), nullptr, nullptr, nullptr));
  ERR_clear_error();
  if (cert == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, ": no PEM certificate"));
  }
  return cert;
}

// Checks that `cert_path` holds a certificate and `key_path` its private key.
absl::Status CheckKeyPair(const std::string& cert_path, const std::string& key_path) {
  if (cert_path.empty() != key_path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a TLS certificate needs its key and a key its certificate (cert '", cert_path,
                     "', key '", key_path, "')"));
  }
  ASSIGN_OR_RETURN(const auto cert, ReadCertificate(cert_path, "TLS certificate"));
  ASSIGN_OR_RETURN(const std::string key_pem, ReadPem(key_path, "TLS key"));
  std::unique_ptr<EVP_PKEY, KeyDeleter> key(
      PEM_read_bio_PrivateKey(MemoryBio(key_pem).get(), nullptr, nullptr, nullptr));
  ERR_clear_error();
  if (key == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("TLS key ", key_path, ": no PEM private key"));
  }
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(
        absl::StrCat("TLS key ", key_path, " does not belong to certificate ", cert_path));
  }
  return absl::OkStatus();
}

const char* ModeOf(bool encrypted, bool client_certificates) {
  if (!encrypted) return "off";
  return client_certificates ? "mtls" : "tls";
}

}  // namespace

const char* TlsMode(const ServerTlsFiles& files) {
  return ModeOf(!files.cert.empty(), !files.client_ca.empty());
}

const char* TlsMode(const ChannelTlsFiles& files) {
  return ModeOf(!files.ca.empty(), !files.cert.empty());
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const ServerTlsFiles& files) {
  if (files.cert.empty() && files.key.empty()) {
    if (!files.client_ca.empty()) {
      return absl::InvalidArgumentError("a client CA (mTLS) needs a server certificate and key");
    }
    return grpc::InsecureServerCredentials();
  }
  RETURN_IF_ERROR(CheckKeyPair(files.cert, files.key));
  if (!files.client_ca.empty()) {
    RETURN_IF_ERROR(ReadCertificate(files.client_ca, "TLS client CA").status());
  }
  auto provider = std::make_shared<FileWatcherCertificateProvider>(
      files.key, files.cert, files.client_ca, files.refresh_seconds);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (!files.client_ca.empty()) {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const ChannelTlsFiles& files) {
  if (files.ca.empty()) {
    if (!files.cert.empty() || !files.key.empty()) {
      return absl::InvalidArgumentError("TLS client settings need the CA of the server");
    }
    return grpc::InsecureChannelCredentials();
  }
  RETURN_IF_ERROR(ReadCertificate(files.ca, "TLS CA").status());
  const bool identity = !files.cert.empty() || !files.key.empty();
  if (identity) RETURN_IF_ERROR(CheckKeyPair(files.cert, files.key));
  auto provider =
      identity ? std::make_shared<FileWatcherCertificateProvider>(files.key, files.cert, files.ca,
                                                                  files.refresh_seconds)
               : std::make_shared<FileWatcherCertificateProvider>(files.ca, files.refresh_seconds);
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(provider);
  options.watch_root_certs();
  if (identity) options.watch_identity_key_cert_pairs();
  return grpc::experimental::TlsCredentials(options);
}

}  // namespace sparseaccel
