// KvStreamWriter and KvStreamReader run against each other: producer thread -> writer -> sender
// threads -> serialized wire bytes -> reader -> sink, with random K/V bytes each run.

#include "kv_stream/kv_stream.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace sparseaccel {
namespace {

constexpr char kFingerprint[] = "model-under-test";

struct Case {
  KvShape shape{3, 2, 8};
  int64_t tokens = 101;
  KvDtype dtype = KvDtype::kBf16;
  v1::KvChecksum checksum = v1::KV_CHECKSUM_XXH3_64;
  int64_t buffers = 4;
  int64_t rows_per_buffer = 7;
  int senders = 3;
  int standby_senders = 0;  // Started once a regular sender has sent a chunk (if there is one).
};

// Everything one transfer needs: the source K/V, the writer's buffers, the reader's
// destination, and counters the tests look at.
class Transfer {
 public:
  explicit Transfer(const Case& c)
      : c_(c), row_bytes_(c.shape.RowSize() * static_cast<int64_t>(KvDtypeBytes(c.dtype))) {
    const size_t bytes = c.shape.num_layers * c.tokens * row_bytes_;
    std::mt19937 rng(std::random_device{}());
    for (std::vector<uint8_t>* part : {&k_, &v_}) {
      part->resize(bytes);
      for (uint8_t& b : *part) b = static_cast<uint8_t>(rng());
    }
    got_k_.assign(bytes, 0);
    got_v_.assign(bytes, 0);
    buffers_ = *KvHostBuffers::Create(c.buffers, c.rows_per_buffer * row_bytes_, nullptr);
    writer_ =
        std::make_unique<KvStreamWriter>(c.shape, c.dtype, c.checksum, buffers_.get(), nullptr);
    reader_ = std::make_unique<KvStreamReader>(
        c.shape, c.tokens, kFingerprint,
        [this](int64_t layer, int64_t first, int64_t count, KvDtype, const void* k, const void* v) {
          const size_t at = (layer * c_.tokens + first) * row_bytes_;
          std::memcpy(&got_k_[at], k, count * row_bytes_);
          std::memcpy(&got_v_[at], v, count * row_bytes_);
          return absl::OkStatus();
        });
  }

  v1::PrefillHeader Header() const {
    v1::PrefillHeader header;
    header.set_model_fingerprint(kFingerprint);
    header.set_num_tokens(static_cast<int32_t>(c_.tokens));
    v1::KvLayout* layout = header.mutable_layout();
    layout->set_num_layers(static_cast<int32_t>(c_.shape.num_layers));
    layout->set_num_kv_heads(static_cast<int32_t>(c_.shape.num_kv_heads));
    layout->set_head_dim(static_cast<int32_t>(c_.shape.head_dim));
    layout->set_dtype(c_.dtype == KvDtype::kBf16 ? v1::KV_DTYPE_BF16 : v1::KV_DTYPE_F32);
    layout->set_checksum(c_.checksum);
    return header;
  }

  // What a prefill does: every layer's rows in slots, in order.
  absl::Status Produce() {
    const int64_t step = writer_->rows_per_slot();
    for (int64_t layer = 0; layer < c_.shape.num_layers; ++layer) {
      for (int64_t first = 0; first < c_.tokens; first += step) {
        const int64_t count = std::min(step, c_.tokens - first);
        absl::StatusOr<KvExportSlot> slot = writer_->Acquire(layer, first, count);
        if (!slot.ok()) return slot.status();
        const size_t at = (layer * c_.tokens + first) * row_bytes_;
        std::memcpy(slot->k, &k_[at], count * row_bytes_);
        std::memcpy(slot->v, &v_[at], count * row_bytes_);
        absl::Status published = writer_->Publish(*slot, nullptr);
        if (!published.ok()) return published;
      }
    }
    writer_->Close();
    produced_ = true;
    chunks_read_when_produced_ = chunks_read_.load();
    return absl::OkStatus();
  }

  // Runs the producer, c.senders regular and c.standby_senders standby senders; `wire` may
  // alter or drop a serialized chunk (false: the stream breaks). Returns the producer's status.
  absl::Status Run(const std::function<bool(int index, std::string* bytes)>& wire,
                   std::chrono::microseconds reader_delay = {}) {
    EXPECT_TRUE(reader_->OnHeader(Header()).ok());
    std::atomic<int> index{0};
    const auto send = [&](KvStreamWriter::Role role) {
      absl::Status sent = writer_->SendAll(
          [&](const v1::PrefillResponse& message) {
            std::string bytes = message.SerializeAsString();
            if (wire && !wire(index++, &bytes)) return false;
            v1::PrefillResponse received;
            if (!received.ParseFromString(bytes)) return false;
            std::this_thread::sleep_for(reader_delay);
            absl::Status status = reader_->OnChunk(received.kv());
            ++chunks_read_;
            if (role == KvStreamWriter::Role::kStandby) ++standby_chunks_;
            if (!status.ok()) {
              absl::MutexLock lock(&mu_);
              if (reader_status_.ok()) reader_status_ = status;
              return false;
            }
            return true;
          },
          role);
      (void)sent;
    };
    std::vector<std::thread> senders;
    for (int s = 0; s < c_.senders; ++s) senders.emplace_back(send, KvStreamWriter::Role::kRegular);
    absl::Status produced;
    std::thread producer([&] {
      produced = Produce();
      if (!produced.ok()) writer_->Abort(produced);
    });
    // A regular sender that has sent a chunk is attached until the transfer is drained.
    while (c_.senders > 0 && c_.standby_senders > 0 && chunks_read_ == 0) std::this_thread::yield();
    for (int s = 0; s < c_.standby_senders; ++s) {
      senders.emplace_back(send, KvStreamWriter::Role::kStandby);
    }
    producer.join();
    for (std::thread& t : senders) t.join();
    return produced;
  }

  bool SameBytes() const { return got_k_ == k_ && got_v_ == v_; }
  int64_t total_chunks() const {
    const int64_t step = writer_->rows_per_slot();
    return c_.shape.num_layers * ((c_.tokens + step - 1) / step);
  }
  absl::Status reader_status() {
    absl::MutexLock lock(&mu_);
    return reader_status_;
  }

  const Case c_;
  const int64_t row_bytes_;
  std::vector<uint8_t> k_, v_, got_k_, got_v_;
  std::unique_ptr<KvHostBuffers> buffers_;
  std::unique_ptr<KvStreamWriter> writer_;
  std::unique_ptr<KvStreamReader> reader_;
  std::atomic<int64_t> chunks_read_{0};
  std::atomic<int64_t> standby_chunks_{0};
  std::atomic<bool> produced_{false};
  int64_t chunks_read_when_produced_ = -1;
  absl::Mutex mu_;
  absl::Status reader_status_;
};

TEST(KvStreamTest, RoundTripEveryDtypeChecksumAndStreamCount) {
  for (KvDtype dtype : {KvDtype::kBf16, KvDtype::kF32}) {
    for (v1::KvChecksum checksum : {v1::KV_CHECKSUM_CRC32, v1::KV_CHECKSUM_XXH3_64}) {
      for (int senders : {1, 4}) {
        Case c;
        c.dtype = dtype;
        c.checksum = checksum;
        c.senders = senders;
        Transfer t(c);
        ASSERT_TRUE(t.Run(nullptr).ok());
        EXPECT_TRUE(t.reader_status().ok()) << t.reader_status();
        EXPECT_TRUE(t.reader_->Complete().ok()) << t.reader_->Complete();
        EXPECT_TRUE(t.reader_->AllRowsArrived());
        EXPECT_TRUE(t.SameBytes());
        EXPECT_EQ(t.reader_->bytes(), 2 * static_cast<int64_t>(t.k_.size()));
        EXPECT_EQ(t.writer_->published_bytes(), t.reader_->bytes());
        EXPECT_EQ(t.buffers_->in_use(), 0);
      }
    }
  }
}

// A standby sender (the Prefill stream's) carries the whole transfer when it is alone and
// nothing while a regular one (a FetchKv stream) is attached.
TEST(KvStreamTest, StandbySenderCarriesChunksOnlyWhenAlone) {
  for (int regular : {0, 2}) {
    Case c;
    c.senders = regular;
    c.standby_senders = 1;
    Transfer t(c);
    ASSERT_TRUE(t.Run(nullptr).ok());
    EXPECT_TRUE(t.reader_->Complete().ok()) << t.reader_->Complete();
    EXPECT_TRUE(t.SameBytes());
    EXPECT_EQ(t.standby_chunks_, regular == 0 ? t.total_chunks() : 0) << regular;
    EXPECT_EQ(t.buffers_->in_use(), 0);
  }
}

TEST(KvStreamTest, CorruptedChunkIsDataLossAndStopsTheProducer) {
  for (v1::KvChecksum checksum : {v1::KV_CHECKSUM_CRC32, v1::KV_CHECKSUM_XXH3_64}) {
    Case c;
    c.checksum = checksum;
    Transfer t(c);
    const absl::Status produced = t.Run([](int index, std::string* bytes) {
      if (index == 2) (*bytes)[bytes->size() - 5] ^= 0x10;  // Inside v.
      return true;
    });
    EXPECT_EQ(t.reader_status().code(), absl::StatusCode::kDataLoss) << t.reader_status();
    EXPECT_FALSE(produced.ok());
    EXPECT_FALSE(t.reader_->Complete().ok());
    EXPECT_EQ(t.buffers_->in_use(), 0);
  }
}

TEST(KvStreamTest, CutStreamFailsBothEnds) {
  Case c;
  Transfer t(c);
  const absl::Status produced = t.Run([](int index, std::string*) { return index < 3; });
  EXPECT_EQ(produced.code(), absl::StatusCode::kCancelled) << produced;
  EXPECT_EQ(t.reader_->Complete().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(t.reader_->AllRowsArrived());
  EXPECT_EQ(t.buffers_->in_use(), 0);
}

TEST(KvStreamTest, SlowReaderLetsComputeFinishWithinTheBound) {
  Case c;
  c.tokens = 70;  // 10 chunks of 7 rows per layer, 30 in all.
  c.buffers = 18;
  c.senders = 1;
  Transfer t(c);
  ASSERT_EQ(t.total_chunks(), 30);
  ASSERT_TRUE(t.Run(nullptr, std::chrono::milliseconds(3)).ok());
  // The producer finished while the reader had read less than half, never holding more
  // buffers than the pool has.
  EXPECT_LT(t.chunks_read_when_produced_, t.total_chunks() / 2);
  EXPECT_LE(t.buffers_->peak_in_use(), c.buffers);
  EXPECT_EQ(t.buffers_->peak_in_use(), c.buffers);
  EXPECT_TRUE(t.reader_->Complete().ok());
  EXPECT_TRUE(t.SameBytes());
}

TEST(KvStreamTest, ReaderRefusesDuplicatesBadHeadersAndStrangers) {
  Case c;
  Transfer t(c);
  v1::PrefillHeader header = t.Header();
  header.mutable_layout()->set_checksum(static_cast<v1::KvChecksum>(7));
  EXPECT_EQ(t.reader_->OnHeader(header).code(), absl::StatusCode::kFailedPrecondition);
  header = t.Header();
  header.set_model_fingerprint("another");
  EXPECT_EQ(t.reader_->OnHeader(header).code(), absl::StatusCode::kFailedPrecondition);
  header = t.Header();
  header.set_num_tokens(5);
  EXPECT_EQ(t.reader_->OnHeader(header).code(), absl::StatusCode::kDataLoss);
  v1::KvChunk chunk;
  chunk.set_num_positions(1);
  EXPECT_EQ(t.reader_->OnChunk(chunk).code(), absl::StatusCode::kDataLoss);  // No header yet.
  ASSERT_TRUE(t.reader_->OnHeader(t.Header()).ok());
  EXPECT_EQ(t.reader_->OnHeader(t.Header()).code(), absl::StatusCode::kDataLoss);
  chunk.set_layer(1);
  chunk.set_first_position(4);
  chunk.mutable_k()->assign(t.row_bytes_, '\x5a');
  chunk.mutable_v()->assign(t.row_bytes_, '\x3c');
  chunk.set_checksum(KvChunkXxh3(chunk.k(), chunk.v()));
  EXPECT_TRUE(t.reader_->OnChunk(chunk).ok());
  EXPECT_EQ(t.reader_->OnChunk(chunk).code(), absl::StatusCode::kDataLoss);  // Twice.
  chunk.set_first_position(static_cast<int32_t>(c.tokens));
  EXPECT_EQ(t.reader_->OnChunk(chunk).code(), absl::StatusCode::kDataLoss);  // Out of range.
  EXPECT_EQ(t.reader_->Complete().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(t.reader_->AllRowsArrived());
}

TEST(KvStreamTest, FailedDeviceCopyAbortsTheTransfer) {
  Case c;
  Transfer t(c);
  ASSERT_TRUE(t.reader_->OnHeader(t.Header()).ok());
  absl::StatusOr<KvExportSlot> slot = t.writer_->Acquire(0, 0, 1);
  ASSERT_TRUE(slot.ok());
  ASSERT_TRUE(
      t.writer_->Publish(*slot, [] { return absl::InternalError("device copy failed"); }).ok());
  t.writer_->Close();
  absl::StatusOr<std::optional<KvStreamWriter::Outgoing>> next = t.writer_->Next();
  EXPECT_EQ(next.status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(t.writer_->Acquire(0, 1, 1).status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(t.buffers_->in_use(), 0);
}

}  // namespace
}  // namespace sparseaccel
