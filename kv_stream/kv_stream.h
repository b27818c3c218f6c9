#ifndef SPARSEACCEL_KV_STREAM_KV_STREAM_H_
#define SPARSEACCEL_KV_STREAM_KV_STREAM_H_

// Both halves of the KV transfer between the services (wire format: PrefillResponse.kv of
// proto/sparseaccel.proto, docs/services.md):
//  - KvStreamWriter (prefill side) is the prefill's KvExporter: it lends host buffers from a
//    shared KvHostBuffers pool (the bound on memory in flight), and hands published chunks to
//    any number of sender streams, each chunk once, as messages that own the buffer's bytes
//    without copying them; the checksum is computed by the sender thread that takes the chunk.
//  - KvStreamReader (decode side) checks the header and every chunk (sizes, positions, each row
//    of each layer exactly once, checksum) from any number of streams, passes the rows on, and
//    at the end says whether every row arrived.

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kv_stream/host_buffers.h"
#include "model/kv_cache.h"
#include "model/kv_export.h"
#include "proto/sparseaccel.pb.h"

namespace sparseaccel {

// The checksum of a chunk's k followed by v.
uint32_t KvChunkCrc32(const std::string& k, const std::string& v);
uint64_t KvChunkXxh3(const std::string& k, const std::string& v);

class KvStreamWriter final : public KvExporter {
 public:
  // `abandoned` is polled while the producer waits for a buffer (e.g. the call was cancelled).
  KvStreamWriter(KvShape shape, KvDtype dtype, v1::KvChecksum checksum, KvHostBuffers* buffers,
                 std::function<bool()> abandoned);
  // Waits for the bytes of chunks never sent, then returns their buffers.
  ~KvStreamWriter() override;

  // Producer side (KvExporter). Publish after Abort returns the abort status.
  KvDtype dtype() const override { return dtype_; }
  int64_t rows_per_slot() const override { return rows_per_slot_; }
  absl::StatusOr<KvExportSlot> Acquire(int64_t layer, int64_t first, int64_t count) override;
  absl::Status Publish(const KvExportSlot& slot, std::function<absl::Status()> written) override;
  // The producer has published all it will.
  void Close();
  // Ends the transfer: the producer's next Acquire and every sender's next Next fail with
  // `status` (e.g. a stream's receiver went away, so its chunk is lost).
  void Abort(absl::Status status);

  // A chunk on its way out: a PrefillResponse whose k and v are the host buffer's bytes. The
  // buffer goes back to the pool when this is destroyed.
  class Outgoing {
   public:
    Outgoing(Outgoing&& other) noexcept;
    Outgoing& operator=(Outgoing&&) = delete;
    ~Outgoing();
    const v1::PrefillResponse& message() const { return message_; }

   private:
    friend class KvStreamWriter;
    Outgoing(KvHostBuffers* pool, KvHostBuffers::Buffer* buffer) : pool_(pool), buffer_(buffer) {}
    KvHostBuffers* pool_;
    KvHostBuffers::Buffer* buffer_;
    v1::PrefillResponse message_;
  };

  // How a sender takes chunks. A standby sender takes them only while no regular sender is
  // attached: a stream that must stay free for something else (the Prefill stream's trailer)
  // and still carries everything when no other stream joins.
  enum class Role { kRegular, kStandby };
  // Sender side, any number of threads: the next chunk (waiting for one to be published and for
  // its bytes); nullopt once closed and drained (for a standby sender: drained by others); the
  // abort status once aborted.
  absl::StatusOr<std::optional<Outgoing>> Next(Role role = Role::kRegular);
  // Sends chunks with `write` until drained; aborts the transfer when a write fails. A regular
  // sender is attached while it runs.
  absl::Status SendAll(const std::function<bool(const v1::PrefillResponse&)>& write,
                       Role role = Role::kRegular);

  // Bytes of k and v published.
  int64_t published_bytes() const;

 private:
  struct Published {
    KvExportSlot slot;
    KvHostBuffers::Buffer* buffer;
    std::function<absl::Status()> written;
  };
  absl::StatusOr<Outgoing> Prepare(Published chunk);

  const KvShape shape_;
  const KvDtype dtype_;
  const v1::KvChecksum checksum_;
  const int64_t row_bytes_;
  const int64_t rows_per_slot_;
  KvHostBuffers* const buffers_;
  const std::function<bool()> abandoned_;

  mutable absl::Mutex mu_;
  std::map<int64_t, KvHostBuffers::Buffer*> lent_ ABSL_GUARDED_BY(mu_);
  std::deque<Published> ready_ ABSL_GUARDED_BY(mu_);
  int64_t next_handle_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t published_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int regular_senders_ ABSL_GUARDED_BY(mu_) = 0;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status abort_ ABSL_GUARDED_BY(mu_);
};

class KvStreamReader {
 public:
  // Where checked rows go (SequenceModel::WriteKv); called from the reading threads.
  using RowsSink = std::function<absl::Status(int64_t layer, int64_t first, int64_t count,
                                              KvDtype dtype, const void* k, const void* v)>;

  KvStreamReader(KvShape shape, int64_t num_tokens, std::string model_fingerprint, RowsSink sink);

  // FailedPrecondition for another model, KV layout or checksum kind; DataLoss for another
  // token count or a second header.
  absl::Status OnHeader(const v1::PrefillHeader& header);
  // Thread-safe. DataLoss for a chunk before the header, a bad checksum, inconsistent sizes or
  // positions, or rows already received; the sink's errors become DataLoss too.
  absl::Status OnChunk(const v1::KvChunk& chunk);
  // Unavailable unless every row of every layer arrived.
  absl::Status Complete() const;
  // Whether every row of every layer has been received (its last rows may still be on their
  // way to the sink in another reading thread).
  bool AllRowsArrived() const;

  bool has_header() const;
  int64_t bytes() const;

 private:
  // Sizes, positions and checksum against the header's dtype and checksum kind.
  absl::Status CheckChunk(const v1::KvChunk& chunk, KvDtype dtype, v1::KvChecksum checksum) const;
  absl::Status MarkRows(const v1::KvChunk& chunk);
  // Rows of every layer: what a complete transfer holds.
  int64_t TotalRows() const { return shape_.num_layers * num_tokens_; }

  const KvShape shape_;
  const int64_t num_tokens_;
  const std::string fingerprint_;
  const RowsSink sink_;

  mutable absl::Mutex mu_;
  bool have_header_ ABSL_GUARDED_BY(mu_) = false;
  KvDtype dtype_ ABSL_GUARDED_BY(mu_) = KvDtype::kF32;
  v1::KvChecksum checksum_ ABSL_GUARDED_BY(mu_) = v1::KV_CHECKSUM_CRC32;
  std::vector<bool> received_ ABSL_GUARDED_BY(mu_);  // [layer][position]
  int64_t rows_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_KV_STREAM_KV_STREAM_H_
