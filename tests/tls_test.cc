// TLS of the gRPC ports (common/tls.h) with certificates made at test time: which clients
// connect, which do not, and what a bad file does at startup. A server here implements no
// method: UNIMPLEMENTED means the TLS handshake succeeded, UNAVAILABLE that it did not.

#include "common/tls.h"

#include <chrono>
#include <string>
#include <thread>

#include "absl/synchronization/notification.h"
#include "common/grpc_util.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "proto/sparseaccel.grpc.pb.h"
#include "tests/test_certs.h"

namespace sparseaccel {
namespace {

class TlsTest : public ::testing::Test {
 protected:
  // Writes `pem` as <dir>/<name>.crt and .key; returns the path without the extension.
  std::string Write(const std::string& name, const Pem& pem) {
    const std::string base = ::testing::TempDir() + "/" + name;
    WriteFileOrDie(base + ".crt", pem.cert);
    WriteFileOrDie(base + ".key", pem.key);
    return base;
  }
  std::string WriteCa(const std::string& name, const TestCa& ca) {
    const std::string path = ::testing::TempDir() + "/" + name + ".ca";
    WriteFileOrDie(path, ca.cert_pem());
    return path;
  }

  // Starts a server with `files`; returns its port.
  int Serve(const ServerTlsFiles& files) {
    absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
        MakeServerCredentials(files);
    EXPECT_TRUE(credentials.ok()) << credentials.status();
    int port = 0;
    server_ = StartGrpcServer("127.0.0.1:0", &service_, &port, *credentials);
    EXPECT_NE(server_, nullptr);
    return port;
  }

  // The status of one Prefill call over a fresh channel with `files`.
  grpc::StatusCode Call(int port, const ChannelTlsFiles& files) {
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
        MakeChannelCredentials(files);
    EXPECT_TRUE(credentials.ok()) << credentials.status();
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // A new connection every call.
    auto stub = v1::PrefillService::NewStub(
        grpc::CreateCustomChannel("localhost:" + std::to_string(port), *credentials, args));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::PrefillRequest request;
    request.add_token_ids(1);
    auto reader = stub->Prefill(&context, request);
    v1::PrefillResponse response;
    while (reader->Read(&response)) {
    }
    return reader->Finish().error_code();
  }

  // grpc.health.v1.Health/Check of the server as a whole, in plaintext: OK with the response
  // SERVING (field 1 = 1) or the call's error.
  static grpc::Status HealthCheck(int port, std::string* response_bytes) {
    grpc::GenericStub stub(grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                               grpc::InsecureChannelCredentials()));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::Slice empty(std::string{});  // An empty HealthCheckRequest: service "".
    grpc::ByteBuffer request(&empty, 1), response;
    grpc::Status status;
    absl::Notification done;
    stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request,
                   &response, [&](grpc::Status s) {
                     status = std::move(s);
                     done.Notify();
                   });
    done.WaitForNotification();
    std::vector<grpc::Slice> slices;
    if (status.ok() && response.Dump(&slices).ok()) {
      for (const grpc::Slice& slice : slices) {
        response_bytes->append(reinterpret_cast<const char*>(slice.begin()), slice.size());
      }
    }
    return status;
  }

  void TearDown() override {
    if (server_) server_->Shutdown();
  }

  v1::PrefillService::Service service_;  // Every method UNIMPLEMENTED.
  std::unique_ptr<grpc::Server> server_;
};

TEST_F(TlsTest, ServerCertificateWorksOnlyWithItsCa) {
  TestCa ca("test ca"), other("other ca");
  const std::string server = Write("server", ca.Issue("localhost"));
  const int port = Serve({server + ".crt", server + ".key", ""});
  EXPECT_EQ(Call(port, {WriteCa("ca", ca), "", "", 1}), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(Call(port, {WriteCa("other", other), "", "", 1}), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Call(port, {}), grpc::StatusCode::UNAVAILABLE) << "plaintext to a TLS port";
}

TEST_F(TlsTest, MutualTlsNeedsAClientCertificateFromTheClientCa) {
  TestCa ca("test ca"), clients("client ca"), other("other ca");
  const std::string server = Write("server", ca.Issue("localhost"));
  const std::string client = Write("client", clients.Issue("decode"));
  const std::string stranger = Write("stranger", other.Issue("decode"));
  const int port = Serve({server + ".crt", server + ".key", WriteCa("clients", clients)});
  const std::string roots = WriteCa("ca", ca);
  EXPECT_EQ(Call(port, {roots, client + ".crt", client + ".key", 1}),
            grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(Call(port, {roots, "", "", 1}), grpc::StatusCode::UNAVAILABLE) << "no client cert";
  EXPECT_EQ(Call(port, {roots, stranger + ".crt", stranger + ".key", 1}),
            grpc::StatusCode::UNAVAILABLE)
      << "client cert from another CA";
  EXPECT_EQ(Call(port, {}), grpc::StatusCode::UNAVAILABLE) << "plaintext";
}

// The server's files are replaced in place (as a Kubernetes Secret update does): new
// connections get the new certificate within the refresh interval, without a restart.
TEST_F(TlsTest, RotatedServerCertificateAppliesWithoutARestart) {
  TestCa old_ca("old ca"), new_ca("new ca");
  const std::string server = Write("rotating", old_ca.Issue("localhost"));
  ServerTlsFiles files{server + ".crt", server + ".key", ""};
  files.refresh_seconds = 1;
  const int port = Serve(files);
  const ChannelTlsFiles trusts_new{WriteCa("new", new_ca), "", "", 1};
  EXPECT_EQ(Call(port, trusts_new), grpc::StatusCode::UNAVAILABLE);
  Write("rotating", new_ca.Issue("localhost"));
  grpc::StatusCode code = grpc::StatusCode::UNAVAILABLE;
  for (int i = 0; i < 50 && code != grpc::StatusCode::UNIMPLEMENTED; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    code = Call(port, trusts_new);
  }
  EXPECT_EQ(code, grpc::StatusCode::UNIMPLEMENTED) << "the new certificate never applied";
}

// Kubernetes gRPC probes speak plaintext: beside a mutual-TLS port, the health port answers
// them SERVING and nothing else; once it is shut down (draining), probes fail.
TEST_F(TlsTest, HealthPortAnswersPlaintextProbesOnly) {
  TestCa ca("test ca");
  const std::string server = Write("server", ca.Issue("localhost"));
  const int port = Serve({server + ".crt", server + ".key", WriteCa("clients", ca)});
  int health_port = 0;
  std::unique_ptr<HealthServer> health = StartHealthServer("127.0.0.1:0", &health_port);
  ASSERT_NE(health, nullptr);
  std::string serving;
  ASSERT_TRUE(HealthCheck(health_port, &serving).ok());
  EXPECT_EQ(serving, std::string("\x08\x01", 2)) << "status SERVING";
  std::string ignored;
  EXPECT_EQ(HealthCheck(port, &ignored).error_code(), grpc::StatusCode::UNAVAILABLE)
      << "the TLS port in plaintext";
  EXPECT_EQ(Call(health_port, {}), grpc::StatusCode::UNIMPLEMENTED) << "no service there";
  health->server->Shutdown();
  EXPECT_FALSE(HealthCheck(health_port, &ignored).ok());
}

TEST_F(TlsTest, BadFilesAreInvalidArgumentAtStartup) {
  TestCa ca("test ca");
  const std::string a = Write("a", ca.Issue("localhost")), b = Write("b", ca.Issue("localhost"));
  const std::string missing = ::testing::TempDir() + "/missing.crt";
  const std::string garbage = ::testing::TempDir() + "/garbage.crt";
  WriteFileOrDie(garbage, "not a certificate\n");
  const auto server_code = [](const ServerTlsFiles& files) {
    return MakeServerCredentials(files).status().code();
  };
  const auto channel_code = [](const ChannelTlsFiles& files) {
    return MakeChannelCredentials(files).status().code();
  };
  constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(server_code({missing, a + ".key", ""}), kInvalid);
  EXPECT_EQ(server_code({garbage, a + ".key", ""}), kInvalid);
  EXPECT_EQ(server_code({a + ".crt", b + ".key", ""}), kInvalid) << "key of another cert";
  EXPECT_EQ(server_code({a + ".crt", "", ""}), kInvalid) << "cert without key";
  EXPECT_EQ(server_code({"", "", WriteCa("ca", ca)}), kInvalid) << "client CA without cert";
  EXPECT_EQ(server_code({a + ".crt", a + ".key", garbage}), kInvalid);
  EXPECT_TRUE(MakeServerCredentials({a + ".crt", a + ".key", ""}).ok());
  EXPECT_EQ(channel_code({missing, "", "", 1}), kInvalid);
  EXPECT_EQ(channel_code({"", a + ".crt", a + ".key", 1}), kInvalid) << "client cert, no CA";
  EXPECT_EQ(channel_code({WriteCa("ca", ca), a + ".crt", b + ".key", 1}), kInvalid);
  const absl::Status message = MakeServerCredentials({a + ".crt", b + ".key", ""}).status();
  EXPECT_NE(message.message().find(b + ".key"), std::string::npos) << message;
}

}  // namespace
}  // namespace sparseaccel
