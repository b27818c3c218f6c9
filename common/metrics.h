#ifndef SPARSEACCEL_COMMON_METRICS_H_
#define SPARSEACCEL_COMMON_METRICS_H_

// Prometheus metrics: prometheus-cpp's core registry, served as text on GET /metrics by
// cpp-httplib on its own thread (prometheus-cpp's civetweb exposer cannot start in processes
// that load cuBLASLt: its worker stacks are too small for cuBLASLt's static TLS).

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "prometheus/registry.h"

namespace httplib {
class Server;
}

namespace sparseaccel {

class MetricsServer {
 public:
  // Listens on `host`:`port` (0 picks a free port). `before_scrape`, if set, runs before each
  // scrape (to refresh gauges that are cheaper to read than to track).
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& host, int port, std::shared_ptr<prometheus::Registry> registry,
      std::function<void()> before_scrape = nullptr);
  ~MetricsServer();
  int port() const { return port_; }

 private:
  MetricsServer() = default;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  int port_ = 0;
};

// The text exposition of everything in `registry`.
std::string SerializeMetrics(const prometheus::Registry& registry);

// Request outcome label: the status code's name in lower case ("ok", "invalid_argument", ...).
std::string OutcomeLabel(const absl::Status& status);

// Context-length bucket label: "<4K", "4-16K", "16-32K", "32-64K", "64-128K", ">=128K".
std::string ContextBucket(int64_t tokens);

// Resident set size of this process (from /proc/self/statm), and its peak (VmHWM).
int64_t HostResidentBytes();
int64_t HostPeakResidentBytes();

// Bucket bounds (seconds) for latency histograms: 1 ms .. ~2 min, roughly x2 apart.
const std::vector<double>& LatencyBuckets();
// Bucket bounds for byte-size histograms: 1 KiB .. 64 GiB, x4 apart.
const std::vector<double>& ByteBuckets();

}  // namespace sparseaccel

#endif  // SPARSEACCEL_COMMON_METRICS_H_
