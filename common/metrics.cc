#include "common/metrics.h"

#include <unistd.h>

#include <cctype>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "httplib.h"
#include "prometheus/text_serializer.h"

namespace sparseaccel {

std::string SerializeMetrics(const prometheus::Registry& registry) {
  return prometheus::TextSerializer().Serialize(registry.Collect());
}

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const std::string& host, int port, std::shared_ptr<prometheus::Registry> registry,
    std::function<void()> before_scrape) {
  auto server = std::unique_ptr<MetricsServer>(new MetricsServer());
  server->http_ = std::make_unique<httplib::Server>();
  server->http_->Get("/metrics",
                     [registry, before_scrape](const httplib::Request&, httplib::Response& res) {
                       if (before_scrape) before_scrape();
                       res.set_content(SerializeMetrics(*registry), "text/plain; version=0.0.4");
                     });
  if (port == 0) {
    server->port_ = server->http_->bind_to_any_port(host.c_str());
  } else if (server->http_->bind_to_port(host.c_str(), port)) {
    server->port_ = port;
  } else {
    server->port_ = -1;
  }
  if (server->port_ <= 0) {
    return absl::UnavailableError(absl::StrCat("metrics: cannot listen on ", host, ":", port));
  }
  httplib::Server* http = server->http_.get();
  server->thread_ = std::thread([http] { http->listen_after_bind(); });
  return server;
}

MetricsServer::~MetricsServer() {
  http_->stop();
  if (thread_.joinable()) thread_.join();
}

std::string OutcomeLabel(const absl::Status& status) {
  std::string name = absl::StatusCodeToString(status.code());
  for (char& c : name) c = c == ' ' ? '_' : static_cast<char>(std::tolower(c));
  return name;
}

std::string ContextBucket(int64_t tokens) {
  if (tokens < 4096) return "<4K";
  if (tokens < 16384) return "4-16K";
  if (tokens < 32768) return "16-32K";
  if (tokens < 65536) return "32-64K";
  if (tokens < 131072) return "64-128K";
  return ">=128K";
}

int64_t HostResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

int64_t HostPeakResidentBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) {
      std::istringstream fields(line.substr(6));
      int64_t kib = 0;
      fields >> kib;
      return kib * 1024;
    }
  }
  return HostResidentBytes();
}

const std::vector<double>& LatencyBuckets() {
  static const std::vector<double> buckets = {0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
                                              1,     2,     5,     10,   20,   30,   60,  120};
  return buckets;
}

const std::vector<double>& ByteBuckets() {
  static const std::vector<double> buckets = [] {
    std::vector<double> b;
    for (double v = 1024; v <= 64.0 * (1ull << 30); v *= 4) b.push_back(v);
    return b;
  }();
  return buckets;
}

}  // namespace sparseaccel
