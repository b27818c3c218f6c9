#include "model/checkpoint/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace {

using Json = nlohmann::json;

// Headers of real checkpoints are well under 10 MiB; anything bigger is corrupt.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

absl::Status Malformed(absl::string_view source, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors ", std::string(source), ": ", what));
}

absl::StatusOr<DType> ParseDType(const std::string& name) {
  if (name == "F32") return DType::kF32;
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  // The rest of the format's dtypes are valid files this engine cannot use.
  for (const char* known : {"F64", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U64", "U32",
                            "U16", "U8", "BOOL"}) {
    if (name == known) {
      return absl::UnimplementedError(absl::StrCat("dtype ", name, " is not supported"));
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype \"", name, "\""));
}

// Parses a header, refusing keys repeated within one object: nlohmann::json would keep one of
// them silently, and two entries for one tensor name make the file ambiguous.
absl::StatusOr<Json> ParseHeaderJson(const char* begin, const char* end, absl::string_view source) {
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  auto track_keys = [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
    if (event == Json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == Json::parse_event_t::object_end && !open_objects.empty()) {
      open_objects.pop_back();
    } else if (event == Json::parse_event_t::key && !open_objects.empty() && parsed.is_string() &&
               duplicate.empty() && !open_objects.back().insert(parsed.get<std::string>()).second) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  Json header = Json::parse(begin, end, track_keys, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) {
    return Malformed(source, "header is not a JSON object");
  }
  if (!duplicate.empty()) {
    return Malformed(source, absl::StrCat("header repeats the key '", duplicate, "'"));
  }
  return header;
}

}  // namespace

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

size_t DTypeSize(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

int64_t TensorView::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40);  // Quiet NaN.
  bits += 0x7fff + ((bits >> 16) & 1);  // Round to nearest even; overflow rounds to Inf.
  return static_cast<uint16_t>(bits >> 16);
}

float Bf16ToFloat(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, 4);
  return value;
}

uint16_t FloatToF16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  uint32_t abs_bits = bits & 0x7fffffff;
  if (abs_bits > 0x7f800000) return sign | 0x7e00;   // NaN.
  if (abs_bits >= 0x477ff000) return sign | 0x7c00;  // Rounds to >= 65520: Inf.
  if (abs_bits < 0x38800000) {
    // Subnormal half (or zero): value / 2^-24, rounded to nearest even.
    if (abs_bits < 0x33000000) return sign;  // Below half the smallest subnormal.
    uint32_t mantissa = (abs_bits & 0x7fffff) | 0x800000;
    int shift = 126 - static_cast<int>(abs_bits >> 23);  // 14..24 for this range.
    uint32_t result = mantissa >> shift;
    uint32_t rest = mantissa & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rest > half || (rest == half && (result & 1))) ++result;
    return sign | static_cast<uint16_t>(result);
  }
  // Normal: rebias the exponent (127 -> 15) and round the mantissa to 10 bits.
  uint32_t rebased = abs_bits - (112u << 23);
  rebased += 0xfff + ((rebased >> 13) & 1);
  return sign | static_cast<uint16_t>(rebased >> 13);
}

float F16ToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else if (exponent == 31) {
    magnitude =
        mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, 4);
  bits |= sign;
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

absl::Status ConvertToF32(const TensorView& tensor, absl::Span<float> out) {
  const int64_t n = tensor.NumElements();
  if (static_cast<int64_t>(out.size()) != n) {
    return absl::InvalidArgumentError(absl::StrCat("ConvertToF32(", tensor.name, "): output has ",
                                                   out.size(), " elements, tensor has ", n));
  }
  const uint8_t* src = tensor.data;
  switch (tensor.dtype) {
    case DType::kF32:
      if (n > 0) std::memcpy(out.data(), src, n * 4);
      break;
    case DType::kBF16:
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * i, 2);
        out[i] = Bf16ToFloat(bits);
      }
      break;
    case DType::kF16:
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * i, 2);
        out[i] = F16ToFloat(bits);
      }
      break;
  }
  return absl::OkStatus();
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Parse(absl::Span<const uint8_t> bytes,
                                                       absl::string_view source) {
  if (bytes.size() < 8) return Malformed(source, "shorter than the 8-byte header length");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > kMaxHeaderBytes) {
    return Malformed(source, absl::StrCat("header length ", header_len, " exceeds the limit of ",
                                          kMaxHeaderBytes, " bytes"));
  }
  if (header_len > bytes.size() - 8) {
    return Malformed(source, absl::StrCat("header length ", header_len, " exceeds the file (",
                                          bytes.size(), " bytes)"));
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes.data() + 8);
  ASSIGN_OR_RETURN(Json header, ParseHeaderJson(header_begin, header_begin + header_len, source));
  const uint8_t* data = bytes.data() + 8 + header_len;
  const uint64_t data_size = bytes.size() - 8 - header_len;

  SafetensorsFile file;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const Json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) return Malformed(source, "__metadata__ is not an object");
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) {
          return Malformed(source, absl::StrCat("__metadata__.", m.key(), " is not a string"));
        }
        file.metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = absl::StrCat("tensor '", name, "': ");
    if (!entry.is_object()) return Malformed(source, where + "entry is not an object");
    auto dtype_it = entry.find("dtype");
    auto shape_it = entry.find("shape");
    auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end() || !dtype_it->is_string()) {
      return Malformed(source, where + "missing or non-string dtype");
    }
    if (shape_it == entry.end() || !shape_it->is_array()) {
      return Malformed(source, where + "missing or non-list shape");
    }
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
      return Malformed(source, where + "data_offsets must be a list of two integers");
    }
    TensorView view;
    view.name = name;
    absl::StatusOr<DType> dtype = ParseDType(dtype_it->get<std::string>());
    if (!dtype.ok()) {
      return absl::Status(dtype.status().code(),
                          absl::StrCat("safetensors ", std::string(source), ": ", where,
                                       std::string(dtype.status().message())));
    }
    view.dtype = *dtype;
    uint64_t numel = 1;
    for (const Json& dim : *shape_it) {
      if (!dim.is_number_unsigned()) {
        return Malformed(source, where + "shape entries must be non-negative integers");
      }
      uint64_t d = dim.get<uint64_t>();
      if (d != 0 && numel > (std::numeric_limits<uint64_t>::max() / 16) / d) {
        return Malformed(source, where + "shape is too large");
      }
      numel *= d;
      view.shape.push_back(static_cast<int64_t>(d));
    }
    const Json& begin_json = (*offsets_it)[0];
    const Json& end_json = (*offsets_it)[1];
    if (!begin_json.is_number_unsigned() || !end_json.is_number_unsigned()) {
      return Malformed(source, where + "data_offsets must be non-negative integers");
    }
    uint64_t begin = begin_json.get<uint64_t>();
    uint64_t end = end_json.get<uint64_t>();
    if (begin > end || end > data_size) {
      return Malformed(source, absl::StrCat(where, "data_offsets [", begin, ", ", end,
                                            ") outside the data area of ", data_size, " bytes"));
    }
    if (end - begin != numel * DTypeSize(view.dtype)) {
      return Malformed(source,
                       absl::StrCat(where, "holds ", end - begin, " bytes, shape x dtype needs ",
                                    numel * DTypeSize(view.dtype)));
    }
    view.data = data + begin;
    view.num_bytes = end - begin;
    if (end > begin) ranges.emplace_back(begin, end);
    file.tensors_.emplace(name, std::move(view));
  }
  // As the format requires, the tensors tile the data area: no overlaps (one byte, two
  // tensors), no holes and no trailing bytes (what a wrong header length or a polyglot leaves).
  std::sort(ranges.begin(), ranges.end());
  uint64_t covered = 0;
  for (const auto& [begin, end] : ranges) {
    if (begin < covered) {
      return Malformed(source, absl::StrCat("tensors overlap at byte ", begin));
    }
    if (begin > covered) {
      return Malformed(source, absl::StrCat("bytes [", covered, ", ", begin,
                                            ") of the data area belong to no tensor"));
    }
    covered = end;
  }
  if (covered != data_size) {
    return Malformed(source, absl::StrCat("the data area has ", data_size - covered,
                                          " trailing bytes that belong to no tensor"));
  }
  return file;
}

struct TensorStore::Mapping {
  void* address = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (address != nullptr) munmap(address, size);
  }
};

TensorStore::~TensorStore() = default;

absl::StatusOr<std::unique_ptr<TensorStore>> TensorStore::OpenFile(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", strerror(errno)));
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  auto mapping = std::make_unique<Mapping>();
  mapping->size = static_cast<size_t>(st.st_size);
  if (mapping->size > 0) {
    void* address = mmap(nullptr, mapping->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (address == MAP_FAILED) {
      close(fd);
      return absl::InternalError(absl::StrCat("cannot mmap ", path, ": ", strerror(errno)));
    }
    mapping->address = address;
  }
  close(fd);
  absl::Span<const uint8_t> bytes(static_cast<const uint8_t*>(mapping->address), mapping->size);
  ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::Parse(bytes, path));
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  store->tensors_ = file.tensors();
  store->mappings_.push_back(std::move(mapping));
  return store;
}

absl::StatusOr<std::unique_ptr<TensorStore>> TensorStore::OpenDirectory(
    const std::string& model_dir) {
  const std::string index_path = model_dir + "/model.safetensors.index.json";
  if (access(index_path.c_str(), F_OK) != 0) return OpenFile(model_dir + "/model.safetensors");

  ASSIGN_OR_RETURN(std::string index_text, ReadFile(index_path));
  Json index = Json::parse(index_text, nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
      !index["weight_map"].is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path, ": expected a JSON object with a weight_map object"));
  }
  std::map<std::string, std::vector<std::string>> tensors_by_shard;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    if (!it.value().is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": weight_map entry for ", it.key(), " is not a file name"));
    }
    const std::string shard = it.value().get<std::string>();
    if (shard.empty() || shard.find('/') != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": shard name '", shard, "' must be a plain file name"));
    }
    tensors_by_shard[shard].push_back(it.key());
  }
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  for (const auto& [shard, names] : tensors_by_shard) {
    ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> part, OpenFile(model_dir + "/" + shard));
    for (const std::string& name : names) {
      auto found = part->tensors_.find(name);
      if (found == part->tensors_.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": tensor ", name, " is not in its shard ", shard));
      }
    }
    for (auto& [name, view] : part->tensors_) {
      if (!store->tensors_.emplace(name, view).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": tensor ", name, " appears in more than one shard"));
      }
    }
    for (auto& mapping : part->mappings_) store->mappings_.push_back(std::move(mapping));
  }
  return store;
}

absl::StatusOr<const TensorView*> TensorStore::Find(absl::string_view name) const {
  auto it = tensors_.find(std::string(name));
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor ", std::string(name), " not found"));
  }
  return &it->second;
}

absl::StatusOr<const TensorView*> TensorStore::FindWithShape(
    absl::string_view name, absl::Span<const int64_t> shape) const {
  ASSIGN_OR_RETURN(const TensorView* view, Find(name));
  if (!std::equal(view->shape.begin(), view->shape.end(), shape.begin(), shape.end())) {
    auto dims = [](absl::Span<const int64_t> s) {
      std::string text = "[";
      for (size_t i = 0; i < s.size(); ++i) absl::StrAppend(&text, i ? ", " : "", s[i]);
      return text + "]";
    };
    return absl::InvalidArgumentError(absl::StrCat("tensor ", std::string(name), " has shape ",
                                                   dims(view->shape), ", expected ", dims(shape)));
  }
  return view;
}

uint64_t TensorSpec::NumBytes() const {
  uint64_t numel = 1;
  for (int64_t d : shape) numel *= static_cast<uint64_t>(d);
  return numel * DTypeSize(dtype);
}

absl::Status WriteSafetensorsStreamed(const std::string& path, absl::Span<const TensorSpec> specs,
                                      const std::map<std::string, std::string>& metadata,
                                      const TensorFiller& fill) {
  std::vector<const TensorSpec*> sorted;
  for (const TensorSpec& spec : specs) {
    if (spec.name.empty() || spec.name == "__metadata__") {
      return absl::InvalidArgumentError(
          absl::StrCat("WriteSafetensors: invalid tensor name '", spec.name, "'"));
    }
    for (int64_t d : spec.shape) {
      if (d < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("WriteSafetensors: tensor ", spec.name, " has a negative dimension"));
      }
    }
    sorted.push_back(&spec);
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const TensorSpec* a, const TensorSpec* b) { return a->name < b->name; });
  Json header = Json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    const TensorSpec* spec = sorted[i];
    if (i > 0 && sorted[i - 1]->name == spec->name) {
      return absl::InvalidArgumentError(
          absl::StrCat("WriteSafetensors: duplicate tensor ", spec->name));
    }
    header[spec->name] = {{"dtype", std::string(DTypeName(spec->dtype))},
                          {"shape", spec->shape},
                          {"data_offsets", {offset, offset + spec->NumBytes()}}};
    offset += spec->NumBytes();
  }
  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const Json::exception&) {  // Only thrown for strings that are not UTF-8.
    return absl::InvalidArgumentError(
        "WriteSafetensors: tensor names and metadata must be valid UTF-8");
  }
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  uint64_t len = header_text.size();
  char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  out.write(len_bytes, 8);
  out.write(header_text.data(), header_text.size());
  std::vector<uint8_t> buffer;
  for (const TensorSpec* spec : sorted) {
    buffer.resize(spec->NumBytes());
    RETURN_IF_ERROR(fill(*spec, absl::MakeSpan(buffer)));
    out.write(reinterpret_cast<const char*>(buffer.data()), buffer.size());
  }
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat("failed writing ", path));
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::string& path, absl::Span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<TensorSpec> specs;
  std::map<std::string, const TensorToWrite*> by_name;
  for (const TensorToWrite& t : tensors) {
    TensorSpec spec{t.name, t.dtype, t.shape};
    if (t.data.size() != spec.NumBytes()) {
      return absl::InvalidArgumentError(absl::StrCat("WriteSafetensors: tensor ", t.name, " has ",
                                                     t.data.size(), " bytes, its shape needs ",
                                                     spec.NumBytes()));
    }
    if (!by_name.emplace(t.name, &t).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("WriteSafetensors: duplicate tensor ", t.name));
    }
    specs.push_back(std::move(spec));
  }
  return WriteSafetensorsStreamed(path, specs, metadata,
                                  [&](const TensorSpec& spec, absl::Span<uint8_t> bytes) {
                                    const std::vector<uint8_t>& data = by_name.at(spec.name)->data;
                                    std::copy(data.begin(), data.end(), bytes.begin());
                                    return absl::OkStatus();
                                  });
}

}  // namespace sparseaccel
