// End-to-end benchmark client of the service pair: sends token-id prompts to
// sparseaccel.v1.DecodeService.Generate (greedy, ignore_eos) and measures on the client the
// time to the first and second token, the inter-token latency after the second token and the
// total time, next to what the final GenerateResult reports (prefill, KV transfer, server-side
// TTFT and ITL). After each length it scrapes both services' /metrics for GPU memory and KV
// pool samples. Writes one JSON file; exits non-zero when any RPC failed.
//   e2e_client --decode_address 127.0.0.1:50052 --lengths 4096,32768,131040 --reps 2
//              --concurrent 4 --concurrent_length 32768 --out e2e.json --label h100

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "proto/sparseaccel.grpc.pb.h"

ABSL_FLAG(std::string, decode_address, "127.0.0.1:50052", "Decode service address.");
ABSL_FLAG(std::string, lengths, "4096,32768,131040", "Prompt lengths (tokens), one by one.");
ABSL_FLAG(int32_t, reps, 2, "Requests per length (all reported; the median is summarised).");
ABSL_FLAG(int32_t, warmup, 1,
          "Requests at the first length before any timed one (reported under phase 'warmup', "
          "left out of the medians): the services' first request pays module loads and planning.");
ABSL_FLAG(int32_t, concurrent, 4, "Requests started together after the lengths (0: none).");
ABSL_FLAG(int64_t, concurrent_length, 32768, "Prompt length of the concurrent requests.");
ABSL_FLAG(int32_t, max_tokens, 32, "Tokens generated per request.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the prompt token ids.");
ABSL_FLAG(int32_t, min_token_id, 1000, "Prompt ids are drawn from [min_token_id, max_token_id).");
ABSL_FLAG(int32_t, max_token_id, 100000, "See --min_token_id.");
ABSL_FLAG(int32_t, deadline_seconds, 600, "Deadline of each Generate call.");
ABSL_FLAG(int32_t, connect_seconds, 30, "How long to wait for the decode service's channel.");
ABSL_FLAG(std::string, prefill_metrics_url, "http://127.0.0.1:9464/metrics",
          "Prefill service /metrics (empty: not scraped).");
ABSL_FLAG(std::string, decode_metrics_url, "http://127.0.0.1:9465/metrics",
          "Decode service /metrics (empty: not scraped).");
ABSL_FLAG(std::string, out, "", "Output JSON path (empty: stdout).");
ABSL_FLAG(std::string, label, "", "Name of this run in the output.");

namespace sparseaccel {
namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::ordered_json;

// Metric families recorded from /metrics (by name prefix).
constexpr absl::string_view kMetricPrefixes[] = {
    "sparseaccel_gpu_memory", "sparseaccel_kv_pool", "sparseaccel_prefill_peak_gpu_memory"};

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// One Generate call as the client saw it, with the server's final report.
struct Measured {
  double ttft_s = 0;
  std::optional<double> second_token_s;
  std::optional<double> itl_after_second_s;  // Mean gap between tokens after the second.
  double total_s = 0;
  int64_t tokens = 0;
  sparseaccel::v1::GenerateResult result;
};

// One request of the benchmark: what was asked and what came back (or why not).
struct Record {
  std::string phase;  // warmup, length or concurrent.
  int64_t prompt_tokens = 0;
  int32_t rep = 0;
  double start_offset_s = 0;  // Concurrent: from the common start to this request's send.
  absl::StatusOr<Measured> measured = absl::UnknownError("not run");
};

// splitmix64: a deterministic stream of well-mixed 64-bit values.
uint64_t Mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Prompt ids of request number `request` (every request gets its own prompt).
sparseaccel::v1::GenerateRequest MakeRequest(int64_t request, int64_t tokens) {
  sparseaccel::v1::GenerateRequest r;
  r.set_request_id(absl::StrCat("e2e-", request, "-", tokens));
  const uint64_t lo = static_cast<uint64_t>(absl::GetFlag(FLAGS_min_token_id));
  const uint64_t span = static_cast<uint64_t>(absl::GetFlag(FLAGS_max_token_id)) - lo;
  const uint64_t base = Mix(absl::GetFlag(FLAGS_seed)) ^ Mix(static_cast<uint64_t>(request) << 20);
  auto* ids = r.mutable_token_ids()->mutable_ids();
  ids->Reserve(static_cast<int>(tokens));
  for (int64_t i = 0; i < tokens; ++i) {
    ids->Add(static_cast<int32_t>(lo + Mix(base + static_cast<uint64_t>(i)) % span));
  }
  r.set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  r.set_ignore_eos(true);
  r.mutable_sampling()->set_temperature(0);  // Greedy.
  return r;
}

// Sends one request and reads its stream to the end.
absl::StatusOr<Measured> Generate(sparseaccel::v1::DecodeService::Stub* stub,
                                  const sparseaccel::v1::GenerateRequest& request) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(absl::GetFlag(FLAGS_deadline_seconds)));
  Measured m;
  bool have_result = false;
  Clock::time_point second, last;
  const Clock::time_point start = Clock::now();
  std::unique_ptr<grpc::ClientReader<sparseaccel::v1::GenerateResponse>> reader =
      stub->Generate(&context, request);
  sparseaccel::v1::GenerateResponse response;
  while (reader->Read(&response)) {
    if (response.has_token()) {
      last = Clock::now();
      if (m.tokens == 0) m.ttft_s = Seconds(last - start);
      if (m.tokens == 1) second = last;
      ++m.tokens;
    } else if (response.has_result()) {
      m.result = response.result();
      have_result = true;
    }
  }
  const grpc::Status status = reader->Finish();
  m.total_s = Seconds(Clock::now() - start);
  if (!status.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                        status.error_message());
  }
  if (!have_result) return absl::DataLossError("stream ended without a GenerateResult");
  if (m.tokens >= 2) m.second_token_s = Seconds(second - start);
  if (m.tokens >= 3) m.itl_after_second_s = Seconds(last - second) / (m.tokens - 2);
  return m;
}

double KvGbps(const sparseaccel::v1::GenerateResult& r) {
  return r.kv_transfer_seconds() > 0
             ? static_cast<double>(r.kv_transfer_bytes()) / r.kv_transfer_seconds() / 1e9
             : 0.0;
}

// An optional number as JSON (null when absent).
Json OrNull(const std::optional<double>& v) { return v.has_value() ? Json(*v) : Json(nullptr); }

Json RecordJson(const Record& record) {
  Json j = {{"phase", record.phase}, {"prompt_tokens", record.prompt_tokens},
            {"rep", record.rep}, {"ok", record.measured.ok()}};
  if (record.phase == "concurrent") j["start_offset_s"] = record.start_offset_s;
  if (!record.measured.ok()) {
    const absl::Status& s = record.measured.status();
    j["code"] = static_cast<int>(s.code());
    j["code_name"] = absl::StatusCodeToString(s.code());
    j["message"] = std::string(s.message());
    return j;
  }
  const Measured& m = *record.measured;
  const sparseaccel::v1::GenerateResult& r = m.result;
  j["ttft_s"] = m.ttft_s;
  j["second_token_s"] = OrNull(m.second_token_s);
  j["itl_after_second_s"] = OrNull(m.itl_after_second_s);
  j["total_s"] = m.total_s;
  j["tokens_received"] = m.tokens;
  j["finish_reason"] = sparseaccel::v1::FinishReason_Name(r.finish_reason());
  j["server_prompt_tokens"] = r.prompt_tokens();
  j["completion_tokens"] = r.completion_tokens();
  j["prefill_seconds"] = r.prefill_seconds();
  j["kv_transfer_seconds"] = r.kv_transfer_seconds();
  j["kv_transfer_bytes"] = r.kv_transfer_bytes();
  j["kv_gbps"] = KvGbps(r);
  j["time_to_first_token_seconds"] = r.time_to_first_token_seconds();
  j["mean_inter_token_latency_seconds"] = r.mean_inter_token_latency_seconds();
  j["server_total_seconds"] = r.total_seconds();
  j["prefill_address"] = r.prefill_address();
  return j;
}

// Median of the values (mean of the middle two for an even count); null when none.
Json Median(std::vector<double> v) {
  if (v.empty()) return nullptr;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// The median of every numeric field that the successful records' JSON share.
Json Summary(const std::vector<const Record*>& records) {
  constexpr const char* kFields[] = {
      "ttft_s", "second_token_s", "itl_after_second_s", "total_s", "prefill_seconds",
      "kv_transfer_seconds", "kv_transfer_bytes", "kv_gbps", "time_to_first_token_seconds",
      "mean_inter_token_latency_seconds", "server_total_seconds"};
  Json out = {{"requests", records.size()}};
  std::vector<Json> rows;
  for (const Record* r : records) {
    if (r->measured.ok()) rows.push_back(RecordJson(*r));
  }
  out["ok"] = rows.size();
  for (const char* field : kFields) {
    std::vector<double> values;
    for (const Json& row : rows) {
      if (row[field].is_number()) values.push_back(row[field].get<double>());
    }
    out[field] = Median(std::move(values));
  }
  return out;
}

// Samples of the recorded families from one Prometheus text page: "name{labels}" -> value.
Json ParseMetrics(const std::string& text) {
  Json samples = Json::object();
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipWhitespace())) {
    if (absl::StartsWith(line, "#")) continue;
    bool wanted = false;
    for (absl::string_view prefix : kMetricPrefixes) wanted |= absl::StartsWith(line, prefix);
    if (!wanted) continue;
    // The value follows the last space outside the labels (an optional timestamp aside).
    const size_t labels_end = line.find('}');
    const size_t space = line.find(' ', labels_end == line.npos ? 0 : labels_end);
    if (space == line.npos) continue;
    std::vector<absl::string_view> rest =
        absl::StrSplit(line.substr(space + 1), ' ', absl::SkipEmpty());
    double value;
    if (rest.empty() || !absl::SimpleAtod(rest[0], &value)) continue;
    samples[std::string(line.substr(0, space))] = value;
  }
  return samples;
}

// GETs a /metrics URL (http://host:port/path) and keeps the recorded families.
absl::StatusOr<Json> Scrape(const std::string& url) {
  const size_t scheme = url.find("://");
  const size_t path_at = url.find('/', scheme == url.npos ? 0 : scheme + 3);
  if (scheme == url.npos || path_at == url.npos) {
    return absl::InvalidArgumentError(absl::StrCat("bad metrics URL '", url, "'"));
  }
  httplib::Client client(url.substr(0, path_at));
  client.set_connection_timeout(5);
  client.set_read_timeout(10);
  httplib::Result response = client.Get(url.substr(path_at).c_str());
  if (!response) {
    return absl::UnavailableError(
        absl::StrCat("GET ", url, ": ", httplib::to_string(response.error())));
  }
  if (response->status != 200) {
    return absl::UnavailableError(absl::StrCat("GET ", url, ": HTTP ", response->status));
  }
  return ParseMetrics(response->body);
}

// Both services' recorded samples; a service that cannot be scraped gets {"error": ...}.
Json ScrapeBoth() {
  Json out = Json::object();
  const std::pair<const char*, std::string> targets[] = {
      {"prefill", absl::GetFlag(FLAGS_prefill_metrics_url)},
      {"decode", absl::GetFlag(FLAGS_decode_metrics_url)}};
  for (const auto& [name, url] : targets) {
    if (url.empty()) continue;
    absl::StatusOr<Json> samples = Scrape(url);
    out[name] = samples.ok() ? *std::move(samples) : Json{{"error", samples.status().ToString()}};
  }
  return out;
}

void PrintRecord(const Record& record) {
  if (!record.measured.ok()) {
    std::fprintf(stderr, "e2e %s tokens=%ld rep=%d FAILED %s\n", record.phase.c_str(),
                 static_cast<long>(record.prompt_tokens), record.rep,
                 record.measured.status().ToString().c_str());
    return;
  }
  const Measured& m = *record.measured;
  std::fprintf(stderr,
               "e2e %s tokens=%ld rep=%d ttft=%.4fs second=%.4fs itl=%.2fms total=%.3fs "
               "prefill=%.4fs kv=%.4fs %.2fGB/s server_ttft=%.4fs\n",
               record.phase.c_str(), static_cast<long>(record.prompt_tokens), record.rep,
               m.ttft_s, m.second_token_s.value_or(0), 1e3 * m.itl_after_second_s.value_or(0),
               m.total_s, m.result.prefill_seconds(), m.result.kv_transfer_seconds(),
               KvGbps(m.result), m.result.time_to_first_token_seconds());
}

// The benchmark's state: the channel, a request counter (prompt seeds) and what was measured.
class Bench {
 public:
  explicit Bench(std::shared_ptr<grpc::Channel> channel)
      : stub_(sparseaccel::v1::DecodeService::NewStub(channel)) {}

  // `reps` requests of `tokens` one after another, recorded under `phase`.
  std::vector<const Record*> Sequential(const std::string& phase, int64_t tokens, int32_t reps);
  // `n` requests of `tokens` released at one moment; returns their records and the wall time
  // from the release to the last request's end.
  std::pair<std::vector<const Record*>, double> Concurrent(int32_t n, int64_t tokens);

  Json RequestsJson() const;
  bool any_failed() const;

 private:
  std::unique_ptr<sparseaccel::v1::DecodeService::Stub> stub_;
  int64_t next_request_ = 0;
  std::vector<std::unique_ptr<Record>> records_;
};

std::vector<const Record*> Bench::Sequential(const std::string& phase, int64_t tokens,
                                             int32_t reps) {
  std::vector<const Record*> out;
  for (int32_t rep = 0; rep < reps; ++rep) {
    auto record = std::make_unique<Record>();
    record->phase = phase;
    record->prompt_tokens = tokens;
    record->rep = rep;
    const sparseaccel::v1::GenerateRequest request = MakeRequest(next_request_++, tokens);
    record->measured = Generate(stub_.get(), request);
    PrintRecord(*record);
    out.push_back(record.get());
    records_.push_back(std::move(record));
  }
  return out;
}

std::pair<std::vector<const Record*>, double> Bench::Concurrent(int32_t n, int64_t tokens) {
  std::vector<std::unique_ptr<Record>> records;
  std::vector<sparseaccel::v1::GenerateRequest> requests;
  for (int32_t i = 0; i < n; ++i) {
    records.push_back(std::make_unique<Record>());
    records.back()->phase = "concurrent";
    records.back()->prompt_tokens = tokens;
    records.back()->rep = i;
    requests.push_back(MakeRequest(next_request_++, tokens));  // Built before the clock runs.
  }
  absl::Notification go;
  Clock::time_point start;
  std::vector<Clock::time_point> ends(n);
  std::vector<std::thread> threads;
  for (int32_t i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      go.WaitForNotification();
      records[i]->start_offset_s = Seconds(Clock::now() - start);
      records[i]->measured = Generate(stub_.get(), requests[i]);
      ends[i] = Clock::now();
    });
  }
  start = Clock::now();
  go.Notify();
  for (std::thread& t : threads) t.join();
  const double wall = Seconds(*std::max_element(ends.begin(), ends.end()) - start);
  std::vector<const Record*> out;
  for (std::unique_ptr<Record>& record : records) {
    PrintRecord(*record);
    out.push_back(record.get());
    records_.push_back(std::move(record));
  }
  return {out, wall};
}

Json Bench::RequestsJson() const {
  Json out = Json::array();
  for (const std::unique_ptr<Record>& r : records_) out.push_back(RecordJson(*r));
  return out;
}

bool Bench::any_failed() const {
  return std::any_of(records_.begin(), records_.end(),
                     [](const std::unique_ptr<Record>& r) { return !r->measured.ok(); });
}

absl::StatusOr<std::vector<int64_t>> ParseLengths(const std::string& flag) {
  std::vector<int64_t> lengths;
  for (absl::string_view part : absl::StrSplit(flag, ',', absl::SkipWhitespace())) {
    int64_t n;
    if (!absl::SimpleAtoi(part, &n) || n <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("bad --lengths entry '", part, "'"));
    }
    lengths.push_back(n);
  }
  return lengths;
}

absl::Status CheckFlags() {
  if (absl::GetFlag(FLAGS_min_token_id) < 0 ||
      absl::GetFlag(FLAGS_max_token_id) <= absl::GetFlag(FLAGS_min_token_id)) {
    return absl::InvalidArgumentError("need 0 <= --min_token_id < --max_token_id");
  }
  if (absl::GetFlag(FLAGS_reps) < 0 || absl::GetFlag(FLAGS_warmup) < 0 ||
      absl::GetFlag(FLAGS_concurrent) < 0 || absl::GetFlag(FLAGS_max_tokens) < 1) {
    return absl::InvalidArgumentError("--reps, --warmup, --concurrent >= 0, --max_tokens >= 1");
  }
  return absl::OkStatus();
}

// A channel to the decode service, connected (so the first request pays no connection setup).
absl::StatusOr<std::shared_ptr<grpc::Channel>> Connect() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  std::shared_ptr<grpc::Channel> channel = grpc::CreateCustomChannel(
      absl::GetFlag(FLAGS_decode_address), grpc::InsecureChannelCredentials(), args);
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::seconds(absl::GetFlag(FLAGS_connect_seconds));
  if (!channel->WaitForConnected(deadline)) {
    return absl::UnavailableError(
        absl::StrCat("no connection to ", absl::GetFlag(FLAGS_decode_address)));
  }
  return channel;
}

absl::Status WriteJson(const Json& json) {
  const std::string text = json.dump(2, ' ', false, Json::error_handler_t::replace) + "\n";
  const std::string path = absl::GetFlag(FLAGS_out);
  if (path.empty()) {
    std::fwrite(text.data(), 1, text.size(), stdout);
    return absl::OkStatus();
  }
  std::ofstream file(path);
  file << text;
  file.close();
  if (!file) return absl::UnavailableError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

// Runs every phase and fills `out` (lengths, concurrent, metrics) as it goes; `checkpoint`
// runs after each phase (so a run killed part way leaves what it measured).
void RunPhases(Bench& bench, const std::vector<int64_t>& lengths,
               const std::function<void()>& checkpoint, Json& out) {
  out["metrics"]["start"] = ScrapeBoth();
  if (!lengths.empty() && absl::GetFlag(FLAGS_warmup) > 0) {
    bench.Sequential("warmup", lengths.front(), absl::GetFlag(FLAGS_warmup));
  }
  for (int64_t n : lengths) {
    const std::string key = absl::StrCat(n);
    out["lengths"][key] = Summary(bench.Sequential("length", n, absl::GetFlag(FLAGS_reps)));
    out["metrics"][key] = ScrapeBoth();
    checkpoint();
  }
  const int32_t n = absl::GetFlag(FLAGS_concurrent);
  if (n > 0) {
    const int64_t tokens = absl::GetFlag(FLAGS_concurrent_length);
    auto [records, wall] = bench.Concurrent(n, tokens);
    Json summary = Summary(records);
    Json concurrent = {{"n", n}, {"prompt_tokens", tokens}, {"wall_s", wall}};
    std::vector<double> ttfts;
    for (const Record* r : records) {
      if (r->measured.ok()) ttfts.push_back(r->measured->ttft_s);
    }
    concurrent["max_ttft_s"] =
        ttfts.empty() ? Json(nullptr) : Json(*std::max_element(ttfts.begin(), ttfts.end()));
    concurrent["median"] = std::move(summary);
    out["concurrent"] = std::move(concurrent);
    std::fprintf(stderr, "e2e concurrent n=%d tokens=%ld wall=%.3fs\n", n,
                 static_cast<long>(tokens), wall);
    out["metrics"]["concurrent"] = ScrapeBoth();
  }
}

int Run() {
  absl::StatusOr<std::vector<int64_t>> lengths = ParseLengths(absl::GetFlag(FLAGS_lengths));
  absl::Status flags = lengths.ok() ? CheckFlags() : lengths.status();
  if (!flags.ok()) {
    std::fprintf(stderr, "e2e_client: %s\n", flags.ToString().c_str());
    return 2;
  }
  const absl::Time now = absl::Now();
  Json out = {{"label", absl::GetFlag(FLAGS_label)},
              {"date", absl::FormatTime("%Y-%m-%d", now, absl::UTCTimeZone())},
              {"time", absl::FormatTime(absl::RFC3339_sec, now, absl::UTCTimeZone())},
              {"decode_address", absl::GetFlag(FLAGS_decode_address)},
              {"max_tokens", absl::GetFlag(FLAGS_max_tokens)},
              {"reps", absl::GetFlag(FLAGS_reps)},
              {"warmup", absl::GetFlag(FLAGS_warmup)},
              {"complete", false},
              {"requests", Json::array()},
              {"lengths", Json::object()},
              {"concurrent", nullptr},
              {"metrics", Json::object()}};
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = Connect();
  bool failed = !channel.ok();
  if (channel.ok()) {
    Bench bench(*channel);
    RunPhases(
        bench, *lengths,
        [&] {
          out["requests"] = bench.RequestsJson();
          if (!absl::GetFlag(FLAGS_out).empty()) WriteJson(out).IgnoreError();
        },
        out);
    out["requests"] = bench.RequestsJson();
    failed = bench.any_failed();
  } else {
    out["error"] = channel.status().ToString();
    std::fprintf(stderr, "e2e_client: %s\n", channel.status().ToString().c_str());
  }
  out["complete"] = true;
  const absl::Status written = WriteJson(out);
  if (!written.ok()) std::fprintf(stderr, "e2e_client: %s\n", written.ToString().c_str());
  return failed || !written.ok() ? 1 : 0;
}

}  // namespace
}  // namespace sparseaccel

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return sparseaccel::Run();
}
