#ifndef SPARSEACCEL_MODEL_CHECKPOINT_SAFETENSORS_H_
#define SPARSEACCEL_MODEL_CHECKPOINT_SAFETENSORS_H_

// Reading and writing the safetensors format
// (8-byte little-endian header length, JSON header, raw little-endian tensor bytes), one file or
// a sharded checkpoint with `model.safetensors.index.json`. Files are mmapped read-only; every
// header field is validated, so a truncated or malformed file gives an error status, never a
// crash: header length (within the file, at most 100 MiB), JSON object without repeated keys,
// dtype (F32/F16/BF16; the format's other dtypes are Unimplemented, unknown names
// InvalidArgument), shape (non-negative, element count without overflow), data_offsets (inside
// the data area, end - begin == elements x dtype size), and tensors tiling the data area exactly
// (no overlaps, holes or trailing bytes, as the format specifies).

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace sparseaccel {

enum class DType { kF32, kF16, kBF16 };

// "F32", "F16", "BF16" as in safetensors headers.
absl::string_view DTypeName(DType dtype);
size_t DTypeSize(DType dtype);

// One tensor inside a mapped file; the bytes stay valid while the owning file is open.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t num_bytes = 0;

  int64_t NumElements() const;
};

// Converts `tensor` to fp32 into `out` (out.size() must equal NumElements()).
absl::Status ConvertToF32(const TensorView& tensor, absl::Span<float> out);

// One parsed safetensors file over a memory buffer it does not own (mmap or test memory).
class SafetensorsFile {
 public:
  // Validates and indexes `bytes`; `source` names the buffer in error messages.
  static absl::StatusOr<SafetensorsFile> Parse(absl::Span<const uint8_t> bytes,
                                               absl::string_view source);
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint directory: `model.safetensors`, or the shards listed by
// `model.safetensors.index.json` (every listed tensor must be found in its shard, shard names
// are plain file names in the directory, and no tensor name may occur in two shards).
class TensorStore {
 public:
  static absl::StatusOr<std::unique_ptr<TensorStore>> OpenDirectory(const std::string& model_dir);
  // Single file (mmapped).
  static absl::StatusOr<std::unique_ptr<TensorStore>> OpenFile(const std::string& path);
  ~TensorStore();
  TensorStore(const TensorStore&) = delete;
  TensorStore& operator=(const TensorStore&) = delete;

  // NotFound naming the tensor when absent.
  absl::StatusOr<const TensorView*> Find(absl::string_view name) const;
  // Like Find, plus InvalidArgument unless the shape equals `shape`.
  absl::StatusOr<const TensorView*> FindWithShape(absl::string_view name,
                                                  absl::Span<const int64_t> shape) const;
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }

 private:
  struct Mapping;
  TensorStore() = default;
  std::vector<std::unique_ptr<Mapping>> mappings_;
  std::map<std::string, TensorView> tensors_;
};

// A tensor to write: `data` holds NumElements() x DTypeSize(dtype) little-endian bytes.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
};

// Writes one safetensors file (tensors sorted by name, header padded to 8 bytes as HF does).
absl::Status WriteSafetensors(const std::string& path, absl::Span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata = {});

// A tensor's header entry, for writers that produce the bytes one tensor at a time.
struct TensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t NumBytes() const;
};
// Fills `bytes` (NumBytes() long) with the tensor's little-endian data.
using TensorFiller = std::function<absl::Status(const TensorSpec&, absl::Span<uint8_t> bytes)>;

// Writes the header for `specs`, then each tensor's bytes as `fill` produces them, so that only
// one tensor is in memory at a time (multi-GB checkpoints). Same layout as WriteSafetensors.
absl::Status WriteSafetensorsStreamed(const std::string& path, absl::Span<const TensorSpec> specs,
                                      const std::map<std::string, std::string>& metadata,
                                      const TensorFiller& fill);

// fp32 <-> bf16 / fp16 bit conversions (round to nearest even), shared by loaders and writers.
uint16_t FloatToBf16(float value);
float Bf16ToFloat(uint16_t bits);
uint16_t FloatToF16(float value);
float F16ToFloat(uint16_t bits);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_CHECKPOINT_SAFETENSORS_H_
