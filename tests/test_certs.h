#ifndef SPARSEACCEL_TESTS_TEST_CERTS_H_
#define SPARSEACCEL_TESTS_TEST_CERTS_H_

// Certificates made at test time (OpenSSL, EC P-256 keys, valid for a day): a CA and leaf
// certificates it signs, written as PEM files for the TLS tests.

#include <memory>
#include <string>

namespace sparseaccel {

struct Pem {
  std::string cert;
  std::string key;
};

class TestCa {
 public:
  // A self-signed CA named `name`.
  explicit TestCa(const std::string& name);
  ~TestCa();
  TestCa(const TestCa&) = delete;
  TestCa& operator=(const TestCa&) = delete;

  const std::string& cert_pem() const { return pem_.cert; }
  // A certificate for `common_name`, valid for localhost and 127.0.0.1, for servers and
  // clients alike.
  Pem Issue(const std::string& common_name) const;

 private:
  struct Keys;
  std::unique_ptr<Keys> keys_;
  Pem pem_;
};

// Writes `text` to `path` (replacing it atomically: written beside, then renamed).
void WriteFileOrDie(const std::string& path, const std::string& text);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_TESTS_TEST_CERTS_H_
