// Capacity of the KV-cache pipe between the prefill and decode services with no prefill compute
// in the way (bench/kv_pipe/README.md). One process, CPU only:
//  - prefill side: the real PrefillEngine and PrefillServer on a loopback port, wired as
//    prefill_service/main.cc wires them for the GPU engine (bf16 K/V on the wire), over a
//    synthetic LanguageModel whose PrefillExport publishes every layer's K/V at once (the
//    Llama-3.1-8B KV shape) from pre-generated random rows;
//  - decode side: the real RemotePrefillClient reading each transfer over --kv_streams
//    connections into a real DecodeEngine over HostSequenceModel (the CPU decode path).
// Per length and rep: KV bytes, seconds from the request to the last chunk, GB/s. One JSON
// line per length on stdout, then a summary line; the services' logs go to stderr.
//
//   bazel-bin/bench/kv_pipe/kv_pipe_bench --lengths 4096,32768,131040 --reps 3

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "decode_service/decode_engine.h"
#include "decode_service/remote_prefill.h"
#include "grpcpp/grpcpp.h"
#include "model/host_sequence_model.h"
#include "model/language_model.h"
#include "model/checkpoint/safetensors.h"
#include "model/sequence_model.h"
#include "nlohmann/json.hpp"
#include "prefill_service/prefill_engine.h"
#include "prefill_service/prefill_server.h"
#include "prometheus/registry.h"

ABSL_FLAG(std::string, lengths, "4096,32768,131040", "Prompt lengths (tokens), one by one.");
ABSL_FLAG(int32_t, reps, 3, "Timed transfers per length (the median is summarised).");
ABSL_FLAG(int32_t, warmup, 1,
          "Untimed transfers of the first length before the timed ones: the first transfer "
          "opens the connections and grows their HTTP/2 windows.");
ABSL_FLAG(int32_t, kv_streams, 8,
          "Streams (connections) per transfer: the decode side's --kv_streams and the prefill "
          "side's --max_kv_streams.");
ABSL_FLAG(int64_t, kv_chunk_bytes, 4 << 20, "Bytes of K and V per KV chunk message.");
ABSL_FLAG(int64_t, kv_host_buffer_bytes, 1LL << 30,
          "Prefill-side host memory for chunks waiting for the network (the GPU default).");
ABSL_FLAG(int32_t, kv_receive_window_bytes, 0,
          "HTTP/2 receive window of each KV stream; 0: gRPC's default.");
ABSL_FLAG(int32_t, fill_threads, 2,
          "Threads copying synthetic rows into published slots, standing in for the GPU "
          "engine's device -> host copy stream (0: the producer copies before publishing).");
ABSL_FLAG(std::string, decode_sink, "pool",
          "pool: rows go into the decode pool (HostSequenceModel::WriteKv, bf16 widened to "
          "fp32) and sampled rows are read back; discard: rows are dropped once checked, "
          "measuring the pipe without the pool write.");

namespace sparseaccel {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// Llama-3.1-8B: 32 layers, 8 KV heads of 128 dimensions.
const KvShape kShape = {32, 8, 128};
// Rows of random K/V that every (layer, K or V, position) maps into: 256 MiB, larger than a
// host's last-level cache, so filling a slot reads memory as a device -> host copy would not
// read a warm cache. A row's place in the ring is distinct within one layer's K (or V) for
// prompts up to kRingRows / 2 tokens and differs between layers (kLayerStride), so a row that
// lands at the wrong position or layer reads back wrong.
constexpr int64_t kRingRows = 131072;
constexpr int64_t kLayerStride = 40503;
// bench/e2e's decode pool blocks.
constexpr int64_t kDecodeBlockTokens = 64;
// Positions per layer read back from the decode pool after each transfer.
constexpr int64_t kCheckedPositions = 8;
// Both sides serve "the same model": the check is a string compare.
constexpr char kFingerprint[] = "kv-pipe-bench/llama-3.1-8b-kv-shape";

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The pre-generated K/V: finite bf16 values (sign and mantissa random, magnitudes 2^-7..2^8),
// so rows are plausible K/V and compare exactly after the decode side widens them to fp32.
class SyntheticKv {
 public:
  explicit SyntheticKv(uint64_t seed) : ring_(kRingRows * kShape.RowSize()) {
    std::mt19937_64 rng(seed);
    for (size_t i = 0; i < ring_.size(); i += 4) {
      uint64_t bits = rng();
      for (size_t j = i; j < std::min(i + 4, ring_.size()); ++j, bits >>= 16) {
        ring_[j] = static_cast<uint16_t>((bits & 0x807F) | ((120 + ((bits >> 7) & 15)) << 7));
      }
    }
  }

  static int64_t row_bytes() { return kShape.RowSize() * static_cast<int64_t>(sizeof(uint16_t)); }

  // Copies K (or V) rows [first, first + count) of `layer` to `out`, position-major bf16.
  void Copy(int64_t layer, bool value, int64_t first, int64_t count, void* out) const {
    char* dst = static_cast<char*>(out);
    while (count > 0) {
      const int64_t at = RingRow(layer, value, first);
      const int64_t rows = std::min(count, kRingRows - at);
      std::memcpy(dst, &ring_[at * kShape.RowSize()], rows * row_bytes());
      dst += rows * row_bytes();
      first += rows;
      count -= rows;
    }
  }

  // Whether `row` (fp32, as the decode pool holds it) is K (or V) of `layer` at `pos`.
  bool Matches(int64_t layer, bool value, int64_t pos, const float* row) const {
    const uint16_t* expected = &ring_[RingRow(layer, value, pos) * kShape.RowSize()];
    for (int64_t i = 0; i < kShape.RowSize(); ++i) {
      if (row[i] != Bf16ToFloat(expected[i])) return false;
    }
    return true;
  }

 private:
  static int64_t RingRow(int64_t layer, bool value, int64_t pos) {
    return (layer * kLayerStride + (value ? kRingRows / 2 : 0) + pos) % kRingRows;
  }

  std::vector<uint16_t> ring_;
};

// Copies rows into published slots on worker threads, as the GPU engine's copy stream does
// (model/cuda/kv_transfer.cu, ExportLayerRows): the producer publishes a slot at once and the
// sender thread that takes it waits for its bytes through KvExporter::Publish's `written`, so
// the copy neither holds up the producer nor runs on a sender's time.
class SlotFiller {
 public:
  explicit SlotFiller(int threads) {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~SlotFiller() {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    for (std::thread& worker : workers_) worker.join();
  }

  // Runs `copy`, on a worker when there are any; the result waits for it (null: done already).
  std::function<absl::Status()> Submit(std::function<void()> copy) {
    if (workers_.empty()) {
      Timed(copy);
      return nullptr;
    }
    auto job = std::make_shared<Job>();
    job->copy = std::move(copy);
    {
      absl::MutexLock lock(&mu_);
      queue_.push_back(job);
    }
    return [job] {
      job->done.WaitForNotification();
      return absl::OkStatus();
    };
  }

  // Seconds the copies took since the last call, all threads together.
  double TakeBusySeconds() { return static_cast<double>(busy_ns_.exchange(0)) * 1e-9; }

 private:
  struct Job {
    std::function<void()> copy;
    absl::Notification done;
  };

  bool HasWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || !queue_.empty(); }

  void Timed(const std::function<void()>& copy) {
    const Clock::time_point start = Clock::now();
    copy();
    busy_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
  }

  // Drains the queue before stopping, so no `written` waits forever.
  void Work() {
    while (true) {
      std::shared_ptr<Job> job;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(this, &SlotFiller::HasWork));
        if (queue_.empty()) return;
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      Timed(job->copy);
      job->done.Notify();
    }
  }

  std::vector<std::thread> workers_;
  std::atomic<int64_t> busy_ns_{0};
  absl::Mutex mu_;
  std::deque<std::shared_ptr<Job>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
};

// What the last PrefillExport did: how long it ran, how much of that it waited for free slots
// (the pipe holding the producer back) and the bytes it published.
struct ExportStats {
  double seconds = 0;
  double blocked_seconds = 0;
  int64_t published_bytes = 0;
};

// The Llama-3.1-8B KV shape without weights or compute. As the prefill side's model,
// PrefillExport publishes every layer's rows from the ring as fast as the exporter lends slots.
// Under the decode side's HostSequenceModel, Forward runs only in the check step after a
// transfer: it reads sampled rows back from the sequence's pool blocks (no SequenceModel call
// reads the pool; a decode step hands Forward the sequence's KvStore) and compares them with
// the ring.
class SyntheticKvModel : public LanguageModel {
 public:
  SyntheticKvModel(std::shared_ptr<const SyntheticKv> kv, int64_t max_tokens, SlotFiller* filler)
      : kv_(std::move(kv)), filler_(filler) {
    config_.vocab_size = 128;  // Token ids are ignored; a small vocabulary keeps logits small.
    config_.hidden_size = 4096;
    config_.intermediate_size = 14336;
    config_.num_hidden_layers = kShape.num_layers;
    config_.num_attention_heads = 32;
    config_.num_key_value_heads = kShape.num_kv_heads;
    config_.head_dim = kShape.head_dim;
    config_.max_position_embeddings = std::max<int64_t>(131072, max_tokens);
    config_.torch_dtype = "bfloat16";
  }

  const ModelConfig& config() const override { return config_; }
  KvShape kv_shape() const override { return kShape; }

  absl::Status Forward(absl::Span<const SequenceChunk> batch, std::vector<float>* logits) override {
    for (const SequenceChunk& chunk : batch) {
      RETURN_IF_ERROR(CheckRows(chunk));
      const size_t rows = chunk.logits == LogitsFor::kNone   ? 0
                          : chunk.logits == LogitsFor::kLast ? 1
                                                             : chunk.tokens.size();
      logits->insert(logits->end(), rows * config_.vocab_size, 0.0f);
    }
    return absl::OkStatus();
  }

  absl::Status PrefillExport(absl::Span<const int32_t> tokens, KvExporter* exporter,
                             std::vector<float>* last_logits) override;

  ExportStats last_export() const {
    absl::MutexLock lock(&mu_);
    return last_export_;
  }
  int64_t rows_checked() const { return rows_checked_.load(); }

 private:
  absl::Status CheckRows(const SequenceChunk& chunk);

  const std::shared_ptr<const SyntheticKv> kv_;
  SlotFiller* const filler_;
  ModelConfig config_;
  std::atomic<int64_t> rows_checked_{0};
  mutable absl::Mutex mu_;
  ExportStats last_export_ ABSL_GUARDED_BY(mu_);
};

absl::Status SyntheticKvModel::PrefillExport(absl::Span<const int32_t> tokens, KvExporter* exporter,
                                             std::vector<float>* last_logits) {
  // bf16 only, as the GPU engine: ExportHostRows would add an fp32 -> bf16 conversion that the
  // GPU path does not have.
  if (exporter->dtype() != KvDtype::kBf16) {
    return absl::InvalidArgumentError("the synthetic model exports bf16 K/V only");
  }
  const Clock::time_point start = Clock::now();
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t step = std::max<int64_t>(1, exporter->rows_per_slot());
  const SyntheticKv* kv = kv_.get();
  ExportStats stats;
  for (int64_t layer = 0; layer < kShape.num_layers; ++layer) {
    for (int64_t first = 0; first < n; first += step) {
      const int64_t count = std::min(step, n - first);
      const Clock::time_point asked = Clock::now();
      ASSIGN_OR_RETURN(const KvExportSlot slot, exporter->Acquire(layer, first, count));
      stats.blocked_seconds += SecondsSince(asked);
      std::function<absl::Status()> written = filler_->Submit([kv, slot] {
        kv->Copy(slot.layer, /*value=*/false, slot.first, slot.count, slot.k);
        kv->Copy(slot.layer, /*value=*/true, slot.first, slot.count, slot.v);
      });
      RETURN_IF_ERROR(exporter->Publish(slot, std::move(written)));
      stats.published_bytes += 2 * count * SyntheticKv::row_bytes();
    }
  }
  stats.seconds = SecondsSince(start);
  {
    absl::MutexLock lock(&mu_);
    last_export_ = stats;
  }
  last_logits->assign(config_.vocab_size, 0.0f);
  return absl::OkStatus();
}

// Positions [0, start_pos) of the chunk's store: kCheckedPositions per layer, the first, the
// last and some between (shifted by the layer, so the layers are read at different offsets into
// their chunks), K and V.
absl::Status SyntheticKvModel::CheckRows(const SequenceChunk& chunk) {
  const int64_t n = chunk.start_pos;
  if (n == 0 || chunk.kv == nullptr) return absl::OkStatus();
  for (int64_t layer = 0; layer < kShape.num_layers; ++layer) {
    ASSIGN_OR_RETURN(const KvLayerView view, chunk.kv->Layer(layer, n));
    for (int64_t i = 0; i < kCheckedPositions; ++i) {
      int64_t pos = i * (n - 1) / (kCheckedPositions - 1);
      if (i > 0 && i + 1 < kCheckedPositions) pos = std::min(n - 1, pos + layer);
      for (const bool value : {false, true}) {
        if (!kv_->Matches(layer, value, pos, value ? view.VRow(pos) : view.KRow(pos))) {
          return absl::DataLossError(absl::StrCat("the decode pool's ", value ? "V" : "K",
                                                  " row of layer ", layer, " position ", pos,
                                                  " is not what the prefill side sent"));
        }
      }
      rows_checked_ += 2;
    }
  }
  return absl::OkStatus();
}

// The decode side's SequenceModel as DecodeEngine sees it: the HostSequenceModel, with the
// time of its WriteKv (the pool write, bf16 widened to fp32 on the CPU engine; the GPU engine
// stages the rows and uploads them instead) summed over the reading threads, or, with
// --decode_sink=discard, no pool write at all (the rows were still checked by KvStreamReader).
class MeteredSequenceModel : public SequenceModel {
 public:
  MeteredSequenceModel(SequenceModel* pool, bool discard) : pool_(pool), discard_(discard) {}

  const ModelConfig& config() const override { return pool_->config(); }
  KvShape kv_shape() const override { return pool_->kv_shape(); }
  int64_t kv_block_tokens() const override { return pool_->kv_block_tokens(); }
  int64_t kv_pool_blocks() const override { return pool_->kv_pool_blocks(); }
  int64_t kv_block_bytes() const override { return pool_->kv_block_bytes(); }
  absl::StatusOr<int64_t> ImportSequence(int64_t length) override {
    return pool_->ImportSequence(length);
  }
  absl::Status WriteKv(int64_t id, int64_t layer, int64_t first, int64_t count, KvDtype dtype,
                       const void* k, const void* v) override {
    if (discard_) return absl::OkStatus();
    const Clock::time_point start = Clock::now();
    absl::Status written = pool_->WriteKv(id, layer, first, count, dtype, k, v);
    sink_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
    return written;
  }
  absl::Status DecodeAndSample(absl::Span<const int64_t> ids, absl::Span<const int32_t> tokens,
                               absl::Span<const SamplingParams> params,
                               absl::Span<const uint64_t> steps,
                               std::vector<int32_t>* next) override {
    return pool_->DecodeAndSample(ids, tokens, params, steps, next);
  }
  absl::Status FinishImport(int64_t id) override { return pool_->FinishImport(id); }
  absl::Status EndSequence(int64_t id) override { return pool_->EndSequence(id); }

  bool discard() const { return discard_; }
  // Seconds spent in the pool's WriteKv since the last call, all threads together.
  double TakeSinkSeconds() { return static_cast<double>(sink_ns_.exchange(0)) * 1e-9; }

 private:
  SequenceModel* const pool_;
  const bool discard_;
  std::atomic<int64_t> sink_ns_{0};
};

// Both services' halves in one process, torn down in reverse order of the fields: the client
// and the decode side first, then the server (before the service it calls), the prefill engine,
// its model, and last the filler, which the model's published slots may still wait on.
struct Pipe {
  std::shared_ptr<const SyntheticKv> kv;
  std::unique_ptr<SlotFiller> filler;
  std::unique_ptr<SyntheticKvModel> prefill_model;
  std::unique_ptr<PrefillEngine> prefill_engine;
  prometheus::Registry registry;
  std::unique_ptr<PrefillServer> prefill_service;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<SyntheticKvModel> decode_model;
  std::unique_ptr<HostSequenceModel> pool;
  std::unique_ptr<MeteredSequenceModel> metered;
  std::unique_ptr<DecodeEngine> engine;
  std::unique_ptr<RemotePrefillClient> client;
};

// The prefill service as prefill_service/main.cc builds it with --device=cuda (bf16 on the
// wire, chunk and buffer sizes and streams from the flags), except that host buffers are
// pageable (no GPU to page-lock them for) and there is no /metrics endpoint.
absl::Status StartPrefillSide(Pipe* pipe, int64_t longest, int* port) {
  pipe->kv = std::make_shared<const SyntheticKv>(/*seed=*/1);
  pipe->filler = std::make_unique<SlotFiller>(absl::GetFlag(FLAGS_fill_threads));
  pipe->prefill_model = std::make_unique<SyntheticKvModel>(pipe->kv, longest, pipe->filler.get());
  PrefillEngineOptions options;
  options.max_prompt_tokens = longest;
  options.chunk_bytes = absl::GetFlag(FLAGS_kv_chunk_bytes);
  options.host_buffer_bytes = absl::GetFlag(FLAGS_kv_host_buffer_bytes);
  options.max_kv_streams = absl::GetFlag(FLAGS_kv_streams);
  options.kv_dtype = KvDtype::kBf16;
  ASSIGN_OR_RETURN(pipe->prefill_engine, PrefillEngine::Create(pipe->prefill_model.get(),
                                                               kFingerprint, options, nullptr));
  pipe->prefill_service =
      std::make_unique<PrefillServer>(pipe->prefill_engine.get(), &pipe->registry);
  pipe->server = StartGrpcServer("127.0.0.1:0", pipe->prefill_service.get(), port);
  if (pipe->server == nullptr) return absl::UnavailableError("the prefill server did not start");
  return absl::OkStatus();
}

// The decode service's side of a transfer, as decode_service/main.cc builds it for the CPU
// engine; the pool holds the longest prompt plus the check step's token.
void StartDecodeSide(Pipe* pipe, int64_t longest, int port) {
  pipe->decode_model = std::make_unique<SyntheticKvModel>(pipe->kv, longest + 1, nullptr);
  const int64_t blocks = (longest + 1 + kDecodeBlockTokens - 1) / kDecodeBlockTokens;
  pipe->pool =
      std::make_unique<HostSequenceModel>(pipe->decode_model.get(), kDecodeBlockTokens, blocks);
  pipe->metered = std::make_unique<MeteredSequenceModel>(
      pipe->pool.get(), absl::GetFlag(FLAGS_decode_sink) == "discard");
  pipe->engine = std::make_unique<DecodeEngine>(pipe->metered.get(), DecodeEngineOptions());
  RemotePrefillOptions options;
  options.addresses = {absl::StrCat("127.0.0.1:", port)};
  options.model_fingerprint = kFingerprint;
  options.kv_streams = absl::GetFlag(FLAGS_kv_streams);
  options.receive_window_bytes = absl::GetFlag(FLAGS_kv_receive_window_bytes);
  pipe->client = std::make_unique<RemotePrefillClient>(options);
}

// One transfer, as measured and checked.
struct Rep {
  int64_t kv_bytes = 0;
  double wall_seconds = 0;  // RemotePrefillClient::Run: the request to the last chunk.
  double kv_seconds = 0;    // RemotePrefillResult::kv_seconds: the header to the last chunk.
  double prefill_seconds = 0;
  ExportStats exported;
  double fill_seconds = 0;
  double sink_seconds = 0;
  int64_t rows_checked = 0;
};

// After the timing: the byte counts of both sides against the prompt's KV size, then (pool
// sink) one decode step, whose Forward reads sampled rows back from the pool.
absl::Status CheckTransfer(Pipe& pipe, int64_t n, const RemotePrefillResult& result,
                           std::shared_ptr<DecodeSequence> sequence, Rep* rep) {
  const int64_t expected = 2 * kShape.num_layers * n * SyntheticKv::row_bytes();
  if (result.kv_bytes != expected || rep->exported.published_bytes != expected) {
    return absl::DataLossError(absl::StrCat(n, " tokens: ", rep->exported.published_bytes,
                                            " KV bytes sent, ", result.kv_bytes, " received, ",
                                            expected, " expected"));
  }
  if (pipe.metered->discard()) return absl::OkStatus();
  const int64_t checked = pipe.decode_model->rows_checked();
  pipe.engine->Start(sequence, result.first_token, SamplingParams(), /*max_new_tokens=*/1);
  while (true) {
    const DecodeSequence::Event event = sequence->WaitNext(absl::Seconds(1));
    if (event.kind != DecodeSequence::Event::Kind::kFinished) continue;
    RETURN_IF_ERROR(event.status);
    break;
  }
  rep->rows_checked = pipe.decode_model->rows_checked() - checked;
  return absl::OkStatus();
}

absl::StatusOr<Rep> Transfer(Pipe& pipe, int64_t n, const std::string& request_id) {
  ASSIGN_OR_RETURN(
      std::shared_ptr<DecodeSequence> sequence,
      pipe.engine->Admit(n, /*max_new_tokens=*/1, absl::InfiniteFuture(), [] { return false; }));
  const std::vector<int32_t> prompt(n, 0);  // The synthetic model ignores the ids.
  pipe.filler->TakeBusySeconds();
  pipe.metered->TakeSinkSeconds();
  // Run takes the ServerContext of the client's Generate call, for its deadline and its
  // cancellation only. A default-constructed one belongs to no call: no deadline, never
  // cancelled, a client that waits for the whole transfer. (A DecodeServer in front would end
  // the transfer with the first token at max_tokens 1, and add decode steps at 2.)
  grpc::ServerContext client;
  const Clock::time_point start = Clock::now();
  ASSIGN_OR_RETURN(
      const RemotePrefillResult result,
      pipe.client->Run(&client, request_id, prompt, v1::SamplingParams(), pipe.engine.get(),
                       sequence.get(), [](int32_t) { return true; }));
  Rep rep;
  rep.wall_seconds = SecondsSince(start);
  rep.kv_seconds = result.kv_seconds;
  rep.kv_bytes = result.kv_bytes;
  rep.prefill_seconds = result.prefill_seconds;
  // Run returned after the Prefill call ended, so the export is over.
  rep.exported = pipe.prefill_model->last_export();
  rep.fill_seconds = pipe.filler->TakeBusySeconds();
  rep.sink_seconds = pipe.metered->TakeSinkSeconds();
  RETURN_IF_ERROR(CheckTransfer(pipe, n, result, std::move(sequence), &rep));
  return rep;
}

double Gbps(int64_t bytes, double seconds) {
  return seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0;
}

double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t mid = values.size() / 2;
  return values.size() % 2 == 1 ? values[mid] : (values[mid - 1] + values[mid]) / 2;
}

json RepJson(const Rep& rep) {
  return {{"kv_bytes", rep.kv_bytes},
          {"wall_seconds", rep.wall_seconds},
          {"gbps", Gbps(rep.kv_bytes, rep.wall_seconds)},
          {"kv_seconds", rep.kv_seconds},
          {"kv_gbps", Gbps(rep.kv_bytes, rep.kv_seconds)},
          {"prefill_seconds", rep.prefill_seconds},
          {"producer_blocked_seconds", rep.exported.blocked_seconds},
          {"fill_seconds", rep.fill_seconds},
          {"sink_seconds", rep.sink_seconds},
          {"rows_checked", rep.rows_checked}};
}

// One length's line: medians over the reps (seconds and GB/s from the request to the last
// chunk; kv_ from the header to the last chunk), then every rep.
json LengthJson(int64_t n, const std::vector<Rep>& reps) {
  std::vector<double> wall, gbps, kv, kv_gbps;
  json all = json::array();
  for (const Rep& rep : reps) {
    wall.push_back(rep.wall_seconds);
    gbps.push_back(Gbps(rep.kv_bytes, rep.wall_seconds));
    kv.push_back(rep.kv_seconds);
    kv_gbps.push_back(Gbps(rep.kv_bytes, rep.kv_seconds));
    all.push_back(RepJson(rep));
  }
  return {{"tokens", n},
          {"kv_bytes", reps.empty() ? 0 : reps.front().kv_bytes},
          {"seconds", Median(wall)},
          {"gbps", Median(gbps)},
          {"kv_seconds", Median(kv)},
          {"kv_gbps", Median(kv_gbps)},
          {"reps", all}};
}

json FlagsJson() {
  return {{"lengths", absl::GetFlag(FLAGS_lengths)},
          {"reps", absl::GetFlag(FLAGS_reps)},
          {"warmup", absl::GetFlag(FLAGS_warmup)},
          {"kv_streams", absl::GetFlag(FLAGS_kv_streams)},
          {"kv_chunk_bytes", absl::GetFlag(FLAGS_kv_chunk_bytes)},
          {"kv_host_buffer_bytes", absl::GetFlag(FLAGS_kv_host_buffer_bytes)},
          {"kv_receive_window_bytes", absl::GetFlag(FLAGS_kv_receive_window_bytes)},
          {"fill_threads", absl::GetFlag(FLAGS_fill_threads)},
          {"decode_sink", absl::GetFlag(FLAGS_decode_sink)}};
}

absl::StatusOr<std::vector<int64_t>> ParseFlags() {
  std::vector<int64_t> lengths;
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_lengths), ',', absl::SkipWhitespace())) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(part, &n) || n < 1) {
      return absl::InvalidArgumentError(absl::StrCat("bad --lengths entry '", part, "'"));
    }
    lengths.push_back(n);
  }
  const std::string sink = absl::GetFlag(FLAGS_decode_sink);
  if (lengths.empty() || absl::GetFlag(FLAGS_reps) < 1 || absl::GetFlag(FLAGS_warmup) < 0 ||
      absl::GetFlag(FLAGS_kv_streams) < 1 || absl::GetFlag(FLAGS_fill_threads) < 0 ||
      (sink != "pool" && sink != "discard")) {
    return absl::InvalidArgumentError(
        "need --lengths, --reps >= 1, --warmup >= 0, --kv_streams >= 1, --fill_threads >= 0 "
        "and --decode_sink pool|discard");
  }
  return lengths;
}

absl::Status RunBench(const std::vector<int64_t>& lengths) {
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  Pipe pipe;
  int port = 0;
  RETURN_IF_ERROR(StartPrefillSide(&pipe, longest, &port));
  StartDecodeSide(&pipe, longest, port);
  LogInfo("kv_pipe.ready", {{"port", port}, {"decode_pool_blocks", pipe.pool->kv_pool_blocks()}});
  for (int i = 0; i < absl::GetFlag(FLAGS_warmup); ++i) {
    ASSIGN_OR_RETURN(const Rep rep, Transfer(pipe, lengths.front(), absl::StrCat("warmup-", i)));
    LogInfo("kv_pipe.warmup",
            {{"tokens", lengths.front()}, {"gbps", Gbps(rep.kv_bytes, rep.wall_seconds)}});
  }
  json summary = json::array();
  int64_t rows_checked = 0;
  for (const int64_t n : lengths) {
    std::vector<Rep> reps;
    for (int r = 0; r < absl::GetFlag(FLAGS_reps); ++r) {
      ASSIGN_OR_RETURN(Rep rep, Transfer(pipe, n, absl::StrCat("kv-pipe-", n, "-", r)));
      rows_checked += rep.rows_checked;
      reps.push_back(rep);
    }
    json line = LengthJson(n, reps);
    std::cout << line.dump() << std::endl;
    line.erase("reps");
    summary.push_back(line);
  }
  const json done = {
      {"summary", summary},
      {"flags", FlagsJson()},
      {"kv_shape",
       {{"layers", kShape.num_layers},
        {"kv_heads", kShape.num_kv_heads},
        {"head_dim", kShape.head_dim},
        {"dtype", "bf16"}}},
      {"host_threads", std::thread::hardware_concurrency()},
      {"pool_rows_checked", rows_checked},
      {"verified", pipe.metered->discard() ? "byte counts and chunk checksums"
                                           : "byte counts, chunk checksums, sampled pool rows"}};
  std::cout << done.dump() << std::endl;
  ShutdownGracefully(pipe.server.get(), absl::Seconds(5));
  return absl::OkStatus();
}

}  // namespace
}  // namespace sparseaccel

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::StatusOr<std::vector<int64_t>> lengths = sparseaccel::ParseFlags();
  absl::Status status = lengths.ok() ? sparseaccel::RunBench(*lengths) : lengths.status();
  if (!status.ok()) {
    sparseaccel::LogError("kv_pipe.failed", {{"error", status.ToString()}});
    return 1;
  }
  return 0;
}
