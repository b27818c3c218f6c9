#include "model/checkpoint/fingerprint.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "model/checkpoint/config.h"
#include "model/checkpoint/safetensors.h"

namespace sparseaccel {
namespace {

class Fnv1a {
 public:
  void Add(const void* data, size_t size) {
    const auto* bytes = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < size; ++i) hash_ = (hash_ ^ bytes[i]) * 1099511628211ull;
  }
  void Add(const std::string& text) { Add(text.data(), text.size() + 1); }
  uint64_t value() const { return hash_; }

 private:
  uint64_t hash_ = 1469598103934665603ull;
};

}  // namespace

absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir) {
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> store, TensorStore::OpenDirectory(model_dir));
  Fnv1a hash;
  hash.Add(ModelConfigToJson(config));
  constexpr size_t kSampleBytes = 64;
  for (const auto& [name, view] : store->tensors()) {
    hash.Add(name);
    hash.Add(std::string(DTypeName(view.dtype)));
    for (int64_t d : view.shape) hash.Add(&d, sizeof(d));
    const size_t head = std::min(kSampleBytes, view.num_bytes);
    hash.Add(view.data, head);
    hash.Add(view.data + view.num_bytes - head, head);
  }
  return absl::StrFormat("%016x", hash.value());
}

}  // namespace sparseaccel
