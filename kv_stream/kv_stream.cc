#include "kv_stream/kv_stream.h"

#define XXH_INLINE_ALL
#include <xxhash.h>
#include <zlib.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace sparseaccel {

uint32_t KvChunkCrc32(const std::string& k, const std::string& v) {
  uLong crc = crc32(0L, Z_NULL, 0);
  crc = crc32_z(crc, reinterpret_cast<const Bytef*>(k.data()), k.size());
  crc = crc32_z(crc, reinterpret_cast<const Bytef*>(v.data()), v.size());
  return static_cast<uint32_t>(crc);
}

uint64_t KvChunkXxh3(const std::string& k, const std::string& v) {
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, k.data(), k.size());
  XXH3_64bits_update(&state, v.data(), v.size());
  return XXH3_64bits_digest(&state);
}

// ---------------------------------------------------------------------------------------------
// Writer.

KvStreamWriter::KvStreamWriter(KvShape shape, KvDtype dtype, v1::KvChecksum checksum,
                               KvHostBuffers* buffers, std::function<bool()> abandoned)
    : shape_(shape),
      dtype_(dtype),
      checksum_(checksum),
      row_bytes_(shape.RowSize() * static_cast<int64_t>(KvDtypeBytes(dtype))),
      rows_per_slot_(
          std::max<int64_t>(1, buffers->bytes_each() / std::max<int64_t>(1, row_bytes_))),
      buffers_(buffers),
      abandoned_(std::move(abandoned)) {}

KvStreamWriter::~KvStreamWriter() {
  Abort(absl::CancelledError("the KV stream writer was destroyed"));
  absl::MutexLock lock(&mu_);
  // The producer publishes every slot whose bytes it started to write, so these are idle.
  for (const auto& [handle, buffer] : lent_) buffers_->Release(buffer);
}

absl::StatusOr<KvExportSlot> KvStreamWriter::Acquire(int64_t layer, int64_t first, int64_t count) {
  if (count < 1 || count > rows_per_slot_ || layer < 0 || layer >= shape_.num_layers || first < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV slot for layer ", layer, " rows ", first, "+", count, ": out of range"));
  }
  {
    absl::MutexLock lock(&mu_);
    if (!abort_.ok()) return abort_;
  }
  const auto give_up = [this] {
    {
      absl::MutexLock lock(&mu_);
      if (!abort_.ok()) return true;
    }
    return abandoned_ && abandoned_();
  };
  ASSIGN_OR_RETURN(KvHostBuffers::Buffer * buffer, buffers_->Acquire(give_up));
  absl::MutexLock lock(&mu_);
  if (!abort_.ok()) {
    buffers_->Release(buffer);
    return abort_;
  }
  KvExportSlot slot{layer, first, count, buffer->k.data(), buffer->v.data(), next_handle_++};
  lent_[slot.handle] = buffer;
  return slot;
}

absl::Status KvStreamWriter::Publish(const KvExportSlot& slot,
                                     std::function<absl::Status()> written) {
  KvHostBuffers::Buffer* buffer = nullptr;
  absl::Status aborted;
  {
    absl::MutexLock lock(&mu_);
    auto it = lent_.find(slot.handle);
    if (it == lent_.end()) return absl::InternalError("KV slot published twice or never lent");
    buffer = it->second;
    lent_.erase(it);
    aborted = abort_;
    if (aborted.ok()) {
      published_bytes_ += 2 * slot.count * row_bytes_;
      ready_.push_back(Published{slot, buffer, std::move(written)});
      return absl::OkStatus();
    }
  }
  if (written) written().IgnoreError();  // The buffer is reusable once nothing writes to it.
  buffers_->Release(buffer);
  return aborted;
}

void KvStreamWriter::Close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
}

void KvStreamWriter::Abort(absl::Status status) {
  std::deque<Published> unsent;
  {
    absl::MutexLock lock(&mu_);
    if (abort_.ok()) abort_ = std::move(status);
    unsent.swap(ready_);
  }
  for (Published& chunk : unsent) {
    if (chunk.written) chunk.written().IgnoreError();
    buffers_->Release(chunk.buffer);
  }
}

KvStreamWriter::Outgoing::Outgoing(Outgoing&& other) noexcept
    : pool_(other.pool_), buffer_(std::exchange(other.buffer_, nullptr)) {
  message_.Swap(&other.message_);
}

KvStreamWriter::Outgoing::~Outgoing() {
  if (buffer_ == nullptr) return;
  message_.mutable_kv()->mutable_k()->swap(buffer_->k);
  message_.mutable_kv()->mutable_v()->swap(buffer_->v);
  pool_->Release(buffer_);
}

absl::StatusOr<KvStreamWriter::Outgoing> KvStreamWriter::Prepare(Published chunk) {
  const absl::Status written = chunk.written ? chunk.written() : absl::OkStatus();
  if (!written.ok()) {
    buffers_->Release(chunk.buffer);
    Abort(written);
    return written;
  }
  Outgoing out(buffers_, chunk.buffer);
  const size_t bytes = static_cast<size_t>(chunk.slot.count * row_bytes_);
  chunk.buffer->k.resize(bytes);  // Shorter: within the capacity, nothing moves.
  chunk.buffer->v.resize(bytes);
  v1::KvChunk* message = out.message_.mutable_kv();
  message->set_layer(static_cast<int32_t>(chunk.slot.layer));
  message->set_first_position(static_cast<int32_t>(chunk.slot.first));
  message->set_num_positions(static_cast<int32_t>(chunk.slot.count));
  message->mutable_k()->swap(chunk.buffer->k);
  message->mutable_v()->swap(chunk.buffer->v);
  if (checksum_ == v1::KV_CHECKSUM_XXH3_64) {
    message->set_checksum(KvChunkXxh3(message->k(), message->v()));
  } else {
    message->set_crc32(KvChunkCrc32(message->k(), message->v()));
  }
  return out;
}

absl::StatusOr<std::optional<KvStreamWriter::Outgoing>> KvStreamWriter::Next(Role role) {
  Published chunk;
  {
    absl::MutexLock lock(&mu_);
    const auto may_take = [this, role]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return role == Role::kRegular || regular_senders_ == 0;
    };
    const auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return !abort_.ok() || (closed_ && ready_.empty()) || (!ready_.empty() && may_take());
    };
    mu_.Await(absl::Condition(&ready));
    if (!abort_.ok()) return abort_;
    if (ready_.empty()) return std::optional<Outgoing>();
    chunk = std::move(ready_.front());
    ready_.pop_front();
  }
  ASSIGN_OR_RETURN(Outgoing out, Prepare(std::move(chunk)));
  return std::optional<Outgoing>(std::move(out));
}

absl::Status KvStreamWriter::SendAll(const std::function<bool(const v1::PrefillResponse&)>& write,
                                     Role role) {
  const int attach = role == Role::kRegular ? 1 : 0;
  {
    absl::MutexLock lock(&mu_);
    regular_senders_ += attach;
  }
  absl::Status status = absl::OkStatus();
  while (status.ok()) {
    absl::StatusOr<std::optional<Outgoing>> next = Next(role);
    if (!next.ok()) {
      status = next.status();
    } else if (!next->has_value()) {
      break;
    } else if (!write((*next)->message())) {
      status = absl::CancelledError("the receiver went away during the KV transfer");
      Abort(status);
    }
  }
  absl::MutexLock lock(&mu_);
  regular_senders_ -= attach;
  return status;
}

int64_t KvStreamWriter::published_bytes() const {
  absl::MutexLock lock(&mu_);
  return published_bytes_;
}

// ---------------------------------------------------------------------------------------------
// Reader.

KvStreamReader::KvStreamReader(KvShape shape, int64_t num_tokens, std::string model_fingerprint,
                               RowsSink sink)
    : shape_(shape),
      num_tokens_(num_tokens),
      fingerprint_(std::move(model_fingerprint)),
      sink_(std::move(sink)) {}

absl::Status KvStreamReader::OnHeader(const v1::PrefillHeader& header) {
  const v1::KvLayout& layout = header.layout();
  if (header.model_fingerprint() != fingerprint_) {
    return absl::FailedPreconditionError(absl::StrCat("the prefill service serves model ",
                                                      header.model_fingerprint(), ", this service ",
                                                      fingerprint_));
  }
  if (layout.num_layers() != shape_.num_layers || layout.num_kv_heads() != shape_.num_kv_heads ||
      layout.head_dim() != shape_.head_dim ||
      (layout.dtype() != v1::KV_DTYPE_F32 && layout.dtype() != v1::KV_DTYPE_BF16)) {
    return absl::FailedPreconditionError(
        absl::StrCat("KV layout (", layout.ShortDebugString(), ") does not match this service's"));
  }
  if (layout.checksum() != v1::KV_CHECKSUM_CRC32 && layout.checksum() != v1::KV_CHECKSUM_XXH3_64) {
    return absl::FailedPreconditionError(absl::StrCat(
        "KV checksum kind ", layout.checksum(),
        " is unknown to this service (a newer KV wire version; see docs/services.md)"));
  }
  if (header.num_tokens() != num_tokens_) {
    return absl::DataLossError("prefill header announces a different token count");
  }
  absl::MutexLock lock(&mu_);
  if (have_header_) return absl::DataLossError("a second prefill header");
  have_header_ = true;
  dtype_ = layout.dtype() == v1::KV_DTYPE_BF16 ? KvDtype::kBf16 : KvDtype::kF32;
  checksum_ = layout.checksum();
  received_.assign(TotalRows(), false);
  return absl::OkStatus();
}

absl::Status KvStreamReader::CheckChunk(const v1::KvChunk& chunk, KvDtype dtype,
                                        v1::KvChecksum checksum) const {
  const int64_t row_bytes = shape_.RowSize() * static_cast<int64_t>(KvDtypeBytes(dtype));
  if (static_cast<int64_t>(chunk.k().size()) != chunk.num_positions() * row_bytes ||
      chunk.v().size() != chunk.k().size() || chunk.num_positions() < 1 ||
      chunk.first_position() < 0 ||
      static_cast<int64_t>(chunk.first_position()) + chunk.num_positions() > num_tokens_ ||
      chunk.layer() < 0 || chunk.layer() >= shape_.num_layers) {
    return absl::DataLossError("KV chunk with inconsistent size or positions");
  }
  const bool intact = checksum == v1::KV_CHECKSUM_XXH3_64
                          ? KvChunkXxh3(chunk.k(), chunk.v()) == chunk.checksum()
                          : KvChunkCrc32(chunk.k(), chunk.v()) == chunk.crc32();
  if (!intact) {
    return absl::DataLossError(absl::StrCat("KV chunk of layer ", chunk.layer(), " at position ",
                                            chunk.first_position(), " failed its checksum"));
  }
  return absl::OkStatus();
}

absl::Status KvStreamReader::MarkRows(const v1::KvChunk& chunk) {
  absl::MutexLock lock(&mu_);
  const int64_t base = chunk.layer() * num_tokens_ + chunk.first_position();
  for (int64_t i = 0; i < chunk.num_positions(); ++i) {
    if (received_[base + i]) {
      return absl::DataLossError(absl::StrCat("KV rows of layer ", chunk.layer(), " at position ",
                                              chunk.first_position() + i, " arrived twice"));
    }
  }
  std::fill(received_.begin() + base, received_.begin() + base + chunk.num_positions(), true);
  rows_ += chunk.num_positions();
  bytes_ += static_cast<int64_t>(chunk.k().size() + chunk.v().size());
  return absl::OkStatus();
}

absl::Status KvStreamReader::OnChunk(const v1::KvChunk& chunk) {
  KvDtype dtype;
  v1::KvChecksum checksum;
  {
    absl::MutexLock lock(&mu_);
    if (!have_header_) return absl::DataLossError("KV chunk before the prefill header");
    dtype = dtype_;
    checksum = checksum_;
  }
  // Outside the lock: the streams check their chunks in parallel.
  RETURN_IF_ERROR(CheckChunk(chunk, dtype, checksum));
  RETURN_IF_ERROR(MarkRows(chunk));
  const absl::Status written = sink_(chunk.layer(), chunk.first_position(), chunk.num_positions(),
                                     dtype, chunk.k().data(), chunk.v().data());
  if (!written.ok()) return absl::DataLossError(written.message());
  return absl::OkStatus();
}

absl::Status KvStreamReader::Complete() const {
  absl::MutexLock lock(&mu_);
  if (!have_header_) return absl::UnavailableError("the prefill stream ended before its header");
  const int64_t total = TotalRows();
  if (rows_ != total) {
    return absl::UnavailableError(
        absl::StrCat("the KV stream ended early: ", rows_, " of ", total, " rows arrived"));
  }
  return absl::OkStatus();
}

bool KvStreamReader::AllRowsArrived() const {
  absl::MutexLock lock(&mu_);
  return have_header_ && rows_ == TotalRows();
}

bool KvStreamReader::has_header() const {
  absl::MutexLock lock(&mu_);
  return have_header_;
}

int64_t KvStreamReader::bytes() const {
  absl::MutexLock lock(&mu_);
  return bytes_;
}

}  // namespace sparseaccel
