#include "model/text/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <queue>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "common/files.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"
#include "re2/re2.h"

namespace sparseaccel {
namespace {

using Json = nlohmann::json;

// parent[key], or null when absent.
const Json& Field(const Json& parent, const char* key) {
  static const Json kNull;
  auto it = parent.find(key);
  return it == parent.end() ? kNull : *it;
}

// node["type"] as a string ("" when absent).
std::string TypeOf(const Json& node) {
  const Json& type = Field(node, "type");
  return type.is_string() ? type.get<std::string>() : std::string();
}

// Pre-tokens longer than this are not cached (long whitespace or letter runs are rare).
constexpr size_t kMaxCachedWordBytes = 128;
constexpr size_t kWordCacheCapacity = 1 << 16;

// Unicode White_Space, which `\s` means in Oniguruma (the regex engine of HF tokenizers).
// RE2's own `\s` is ASCII-only.
constexpr absl::string_view kWhitespaceClass =
    "\\t\\n\\x0B\\x0C\\r\\x20\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
    "\\x{202F}\\x{205F}\\x{3000}";
constexpr absl::string_view kLookaheadAlternative = "\\s+(?!\\S)";
constexpr absl::string_view kWhitespaceRunGroup = "wsrun";

bool IsWhitespace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68
// bytes for U+0100.. in byte order. Returns code point -> byte (-1 when not in the alphabet).
std::vector<int> ByteLevelDecodeTable() {
  std::vector<int> table(256 + 68, -1);
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    table[printable ? b : next++] = b;
  }
  return table;
}

// Lead byte -> sequence length (0 for bytes that cannot start a character).
int Utf8SequenceLength(uint8_t lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 0;
}

// Whether `byte` may follow at position `index` (1..) of a sequence led by `lead`: the
// second byte's range excludes overlong forms, surrogates and code points above U+10FFFF.
bool Utf8ContinuationOk(uint8_t lead, int index, uint8_t byte) {
  uint8_t low = 0x80, high = 0xBF;
  if (index == 1) {
    if (lead == 0xE0) low = 0xA0;
    if (lead == 0xED) high = 0x9F;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;
  }
  return byte >= low && byte <= high;
}

// Number of bytes of the character or maximal invalid subpart at `pos` and whether it is a
// valid character.
std::pair<size_t, bool> Utf8Step(absl::string_view bytes, size_t pos) {
  uint8_t lead = static_cast<uint8_t>(bytes[pos]);
  int n = Utf8SequenceLength(lead);
  if (n == 0) return {1, false};
  for (int i = 1; i < n; ++i) {
    if (pos + i >= bytes.size() ||
        !Utf8ContinuationOk(lead, i, static_cast<uint8_t>(bytes[pos + i]))) {
      return {static_cast<size_t>(i), false};
    }
  }
  return {static_cast<size_t>(n), true};
}

bool IsValidUtf8(absl::string_view bytes) {
  for (size_t pos = 0; pos < bytes.size();) {
    if (static_cast<uint8_t>(bytes[pos]) < 0x80) {
      ++pos;
      continue;
    }
    auto [len, valid] = Utf8Step(bytes, pos);
    if (!valid) return false;
    pos += len;
  }
  return true;
}

// The code point of the UTF-8 character at `pos`, its length in *len; an invalid sequence
// gives kInvalidCodePoint and its maximal subpart's length.
constexpr uint32_t kInvalidCodePoint = 0xFFFFFFFF;
uint32_t DecodeCodePoint(absl::string_view text, size_t pos, size_t* len) {
  uint8_t lead = static_cast<uint8_t>(text[pos]);
  if (lead < 0x80) {
    *len = 1;
    return lead;
  }
  auto [length, valid] = Utf8Step(text, pos);
  *len = length;
  if (!valid) return kInvalidCodePoint;
  uint32_t cp = lead & (0x7F >> length);
  for (size_t i = 1; i < length; ++i) {
    cp = (cp << 6) | (static_cast<uint8_t>(text[pos + i]) & 0x3F);
  }
  return cp;
}

// A vocabulary token spelled in the byte-level alphabet -> its raw bytes (false when a
// character is outside the alphabet).
bool ByteLevelToBytes(absl::string_view token, std::string* bytes) {
  static const std::vector<int> kByteOf = ByteLevelDecodeTable();
  bytes->clear();
  for (size_t pos = 0; pos < token.size();) {
    size_t len;
    uint32_t cp = DecodeCodePoint(token, pos, &len);
    if (cp >= kByteOf.size() || kByteOf[cp] < 0) return false;
    bytes->push_back(static_cast<char>(kByteOf[cp]));
    pos += len;
  }
  return true;
}

// Rewrites `\s` / `\S` to Unicode White_Space classes for RE2.
absl::StatusOr<std::string> RewriteWhitespaceClasses(absl::string_view pattern) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      char e = pattern[++i];
      if (e == 's') {
        absl::StrAppend(&out, in_class ? "" : "[", kWhitespaceClass, in_class ? "" : "]");
      } else if (e == 'S') {
        if (in_class) {
          return absl::UnimplementedError("pre-tokenizer regex: \\S inside [...] is unsupported");
        }
        absl::StrAppend(&out, "[^", kWhitespaceClass, "]");
      } else {
        out.push_back(c);
        out.push_back(e);
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out.push_back(c);
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out.push_back(pattern[++i]);
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out.push_back(pattern[++i]);
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out.push_back(c);
  }
  return out;
}

// Splits a regex at its top-level '|'.
std::vector<std::string> TopLevelAlternatives(absl::string_view pattern) {
  std::vector<std::string> alternatives(1);
  int depth = 0;
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      alternatives.back().append(pattern.data() + i, 2);
      ++i;
      continue;
    }
    if (in_class) {
      in_class = c != ']';
    } else if (c == '[') {
      in_class = true;
      alternatives.back().push_back(c);
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') alternatives.back() += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') alternatives.back() += pattern[++i];
      continue;
    } else if (c == '(') {
      ++depth;
    } else if (c == ')') {
      --depth;
    } else if (c == '|' && depth == 0) {
      alternatives.emplace_back();
      continue;
    }
    alternatives.back().push_back(c);
  }
  return alternatives;
}

// A token field of tokenizer_config.json: a string or an AddedToken object {"content": ...}.
std::string ConfigTokenText(const Json& config, const char* key) {
  auto it = config.find(key);
  if (it == config.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto content = it->find("content");
    if (content != it->end() && content->is_string()) return content->get<std::string>();
  }
  return "";
}

bool ConfigBool(const Json& config, const char* key, bool fallback) {
  auto it = config.find(key);
  return it != config.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

std::string CleanUpTokenizationSpaces(std::string text) {
  // transformers' clean_up_tokenization: applied one after the other.
  static constexpr std::pair<absl::string_view, absl::string_view> kRules[] = {
      {" .", "."},     {" ?", "?"},   {" !", "!"},   {" ,", ","},     {" ' ", "'"},
      {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
  for (const auto& [from, to] : kRules) text = absl::StrReplaceAll(text, {{from, to}});
  return text;
}

}  // namespace

void AppendUtf8Lossy(absl::string_view bytes, std::string* out) {
  out->reserve(out->size() + bytes.size());
  for (size_t pos = 0; pos < bytes.size();) {
    if (static_cast<uint8_t>(bytes[pos]) < 0x80) {
      out->push_back(bytes[pos++]);
      continue;
    }
    auto [len, valid] = Utf8Step(bytes, pos);
    if (valid) {
      out->append(bytes.data() + pos, len);
    } else {
      out->append("\xEF\xBF\xBD");
    }
    pos += len;
  }
}

size_t IncompleteUtf8Suffix(absl::string_view bytes) {
  for (size_t k = 1; k <= 3 && k <= bytes.size(); ++k) {
    size_t start = bytes.size() - k;
    uint8_t lead = static_cast<uint8_t>(bytes[start]);
    int n = Utf8SequenceLength(lead);
    if (n == 0) continue;  // A continuation byte: look further back.
    if (static_cast<size_t>(n) <= k) return 0;
    for (size_t i = 1; i < k; ++i) {
      if (!Utf8ContinuationOk(lead, i, static_cast<uint8_t>(bytes[start + i]))) return 0;
    }
    return k;
  }
  return 0;
}

Tokenizer::Tokenizer()
    : chat_template_(absl::NotFoundError("tokenizer_config.json has no chat_template")) {
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
}

Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& model_dir) {
  ASSIGN_OR_RETURN(std::string tokenizer_json, ReadFile(model_dir + "/tokenizer.json"));
  std::string config_json;
  auto config = ReadFile(model_dir + "/tokenizer_config.json");
  if (config.ok()) {
    config_json = *std::move(config);
  } else if (!absl::IsNotFound(config.status())) {
    return config.status();
  }
  return FromJson(tokenizer_json, config_json);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(absl::string_view tokenizer_json,
                                                               absl::string_view config_json) {
  std::unique_ptr<Tokenizer> tokenizer(new Tokenizer());
  RETURN_IF_ERROR(tokenizer->ParseTokenizerJson(tokenizer_json));
  RETURN_IF_ERROR(tokenizer->ParseConfigJson(config_json));
  return tokenizer;
}

absl::Status Tokenizer::ParseTokenizerJson(absl::string_view text) {
  Json root = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError("tokenizer.json is not a JSON object");
  }
  const Json& model = Field(root, "model");
  RETURN_IF_ERROR(ParseBpeModel(model));
  int32_t max_id = -1;
  RETURN_IF_ERROR(ParseVocab(Field(model, "vocab"), &max_id));
  RETURN_IF_ERROR(ParseMerges(Field(model, "merges")));
  std::vector<std::pair<int32_t, std::string>> added_list;
  RETURN_IF_ERROR(ParseAddedTokens(Field(root, "added_tokens"), &max_id, &added_list));
  BuildIdTables(max_id, added_list);
  if (!Field(root, "normalizer").is_null()) {
    return absl::InvalidArgumentError("tokenizer.json: normalizers are unsupported");
  }
  RETURN_IF_ERROR(ParsePreTokenizer(Field(root, "pre_tokenizer")));
  if (TypeOf(Field(root, "decoder")) != "ByteLevel") {
    return absl::InvalidArgumentError("tokenizer.json: only the ByteLevel decoder is supported");
  }
  return ParsePostProcessor(Field(root, "post_processor"), max_id);
}

// Byte-level BPE without the options this tokenizer does not implement.
absl::Status Tokenizer::ParseBpeModel(const Json& model) {
  if (!model.is_object() || TypeOf(model) != "BPE") {
    return absl::InvalidArgumentError("tokenizer.json: only a BPE model is supported");
  }
  for (const char* key : {"unk_token", "continuing_subword_prefix", "end_of_word_suffix"}) {
    const Json& value = Field(model, key);
    if (!value.is_null() && !(value.is_string() && value.get<std::string>().empty())) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: BPE ", key, " unsupported"));
    }
  }
  if (Field(model, "byte_fallback").is_boolean() && Field(model, "byte_fallback").get<bool>()) {
    return absl::InvalidArgumentError("tokenizer.json: BPE byte_fallback is unsupported");
  }
  const Json& dropout = Field(model, "dropout");
  if (!dropout.is_null() && !(dropout.is_number() && dropout.get<double>() == 0.0)) {
    return absl::InvalidArgumentError("tokenizer.json: BPE dropout is unsupported");
  }
  ignore_merges_ =
      Field(model, "ignore_merges").is_boolean() && Field(model, "ignore_merges").get<bool>();

  return absl::OkStatus();
}

// model.vocab: every entry in the byte-level alphabet, and a token for each of the 256 bytes.
absl::Status Tokenizer::ParseVocab(const Json& vocab, int32_t* max_id) {
  if (!vocab.is_object() || vocab.empty()) {
    return absl::InvalidArgumentError("tokenizer.json: model.vocab must be a non-empty object");
  }
  std::string bytes;
  bytes_to_id_.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > (1 << 30)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: bad id for vocab entry \"", it.key(), "\""));
    }
    if (!ByteLevelToBytes(it.key(), &bytes)) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: vocab entry \"", it.key(),
                                                     "\" is not in the byte-level alphabet"));
    }
    int32_t id = it.value().get<int32_t>();
    bytes_to_id_[bytes] = id;
    *max_id = std::max(*max_id, id);
  }
  for (int b = 0; b < 256; ++b) {
    auto it = bytes_to_id_.find(std::string(1, static_cast<char>(b)));
    if (it == bytes_to_id_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: vocab lacks the token of byte ", b));
    }
    byte_ids_[b] = it->second;
  }

  return absl::OkStatus();
}

// model.merges ("left right" strings or [left, right] lists), ranked in file order.
absl::Status Tokenizer::ParseMerges(const Json& merges) {
  if (!merges.is_array()) return absl::InvalidArgumentError("tokenizer.json: no model.merges");
  merges_.reserve(merges.size());
  std::string left_bytes, right_bytes;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const Json& merge = merges[rank];
    std::string left, right;
    if (merge.is_string()) {
      std::vector<std::string> parts = absl::StrSplit(merge.get<std::string>(), ' ');
      if (parts.size() == 2) {
        left = parts[0];
        right = parts[1];
      }
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    }
    if (left.empty() || right.empty() || !ByteLevelToBytes(left, &left_bytes) ||
        !ByteLevelToBytes(right, &right_bytes)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: malformed merge #", rank, ": ", merge.dump()));
    }
    auto l = bytes_to_id_.find(left_bytes);
    auto r = bytes_to_id_.find(right_bytes);
    auto m = bytes_to_id_.find(left_bytes + right_bytes);
    if (l == bytes_to_id_.end() || r == bytes_to_id_.end() || m == bytes_to_id_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: merge #", rank, " (",
                                                     merge.dump(), ") uses tokens not in vocab"));
    }
    merges_.try_emplace(PairKey(l->second, r->second),
                        MergeRule{static_cast<int32_t>(rank), m->second});
  }

  return absl::OkStatus();
}

// added_tokens: whole-text tokens matched before BPE; special ones decode to no text.
absl::Status Tokenizer::ParseAddedTokens(const Json& added, int32_t* max_id,
                                         std::vector<std::pair<int32_t, std::string>>* list) {
  if (!added.is_null() && !added.is_array()) {
    return absl::InvalidArgumentError("tokenizer.json: added_tokens must be a list");
  }
  for (const Json& token : added.is_array() ? added : Json::array()) {
    const Json& id = Field(token, "id");
    const Json& content = Field(token, "content");
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > (1 << 30) ||
        !content.is_string() || content.get<std::string>().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: malformed added token ", token.dump()));
    }
    for (const char* flag : {"lstrip", "rstrip", "single_word", "normalized"}) {
      if (Field(token, flag).is_boolean() && Field(token, flag).get<bool>()) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer.json: added token ", token.dump(), ": ", flag, " unsupported"));
      }
    }
    bool special = Field(token, "special").is_boolean() && Field(token, "special").get<bool>();
    int32_t token_id = id.get<int32_t>();
    std::string text = content.get<std::string>();
    added_tokens_[text] = AddedToken{token_id, special};
    list->emplace_back(token_id, text);
    *max_id = std::max(*max_id, token_id);
    added_token_first_byte_[static_cast<uint8_t>(text[0])] = true;
    if (std::find(added_token_lengths_.begin(), added_token_lengths_.end(), text.size()) ==
        added_token_lengths_.end()) {
      added_token_lengths_.push_back(text.size());
    }
  }
  std::sort(added_token_lengths_.rbegin(), added_token_lengths_.rend());

  return absl::OkStatus();
}

// Bytes and specialness by id, for decoding.
void Tokenizer::BuildIdTables(int32_t max_id,
                              const std::vector<std::pair<int32_t, std::string>>& added_list) {
  id_to_bytes_.assign(max_id + 1, std::string());
  is_special_.assign(max_id + 1, false);
  for (const auto& [token_bytes, id] : bytes_to_id_) id_to_bytes_[id] = token_bytes;
  for (const auto& [id, text] : added_list) {
    id_to_bytes_[id] = text;
    is_special_[id] = added_tokens_[text].special;
  }
}

// Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)], as Llama 3 has.
absl::Status Tokenizer::ParsePreTokenizer(const Json& pre) {
  const Json& steps = Field(pre, "pretokenizers");
  bool supported_pre = TypeOf(pre) == "Sequence" && steps.is_array() && steps.size() == 2 &&
                       TypeOf(steps[0]) == "Split" && TypeOf(steps[1]) == "ByteLevel";
  if (supported_pre) {
    const Json& split = steps[0];
    const Json& byte_level = steps[1];
    supported_pre = Field(split, "pattern").is_object() &&
                    Field(Field(split, "pattern"), "Regex").is_string() &&
                    Field(split, "behavior") == "Isolated" && Field(split, "invert") == false &&
                    Field(byte_level, "use_regex") == false &&
                    Field(byte_level, "add_prefix_space") == false;
  }
  if (!supported_pre) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.json: unsupported pre_tokenizer ", pre.dump().substr(0, 400),
                     " (supported: Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)])"));
  }
  RETURN_IF_ERROR(
      SetPreTokenizerPattern(Field(Field(steps[0], "pattern"), "Regex").get<std::string>()));
  return absl::OkStatus();
}

// TemplateProcessing (alone or in a Sequence with ByteLevel): the ids around the text.
absl::Status Tokenizer::ParsePostProcessor(const Json& post, int32_t max_id) {
  std::vector<const Json*> processors;
  if (TypeOf(post) == "Sequence" && Field(post, "processors").is_array()) {
    for (const Json& p : Field(post, "processors")) processors.push_back(&p);
  } else if (!post.is_null()) {
    processors.push_back(&post);
  }
  for (const Json* processor : processors) {
    std::string type = TypeOf(*processor);
    if (type == "ByteLevel") continue;  // Only adjusts offsets.
    if (type != "TemplateProcessing" || !Field(*processor, "single").is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: unsupported post_processor ", type));
    }
    bool after_text = false;
    for (const Json& piece : Field(*processor, "single")) {
      if (piece.contains("Sequence")) {
        after_text = true;
        continue;
      }
      const Json& name = Field(Field(piece, "SpecialToken"), "id");
      std::string name_text = name.is_string() ? name.get<std::string>() : std::string();
      const Json& ids = Field(Field(Field(*processor, "special_tokens"), name_text.c_str()), "ids");
      if (!ids.is_array()) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer.json: bad TemplateProcessing piece ", piece.dump()));
      }
      for (const Json& id : ids) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > max_id) {
          return absl::InvalidArgumentError(
              absl::StrCat("tokenizer.json: bad TemplateProcessing id ", id.dump()));
        }
        (after_text ? suffix_ids_ : prefix_ids_).push_back(id.get<int32_t>());
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::SetPreTokenizerPattern(const std::string& pattern) {
  std::vector<std::string> alternatives = TopLevelAlternatives(pattern);
  std::vector<std::string> kept;
  for (size_t i = 0; i < alternatives.size(); ++i) {
    if (alternatives[i] == kLookaheadAlternative) {
      if (i + 1 >= alternatives.size() || alternatives[i + 1] != "\\s+") {
        return absl::UnimplementedError(absl::StrCat(
            "pre-tokenizer regex: ", kLookaheadAlternative,
            " is supported only when directly followed by a \\s+ alternative: ", pattern));
      }
      whitespace_lookahead_ = true;
      kept.push_back(absl::StrCat("(?P<", kWhitespaceRunGroup, ">\\s+)"));
      ++i;
      continue;
    }
    for (const char* lookaround : {"(?=", "(?!", "(?<=", "(?<!"}) {
      if (alternatives[i].find(lookaround) != std::string::npos) {
        return absl::UnimplementedError(
            absl::StrCat("pre-tokenizer regex: look-around is unsupported except for ",
                         kLookaheadAlternative, ": ", pattern));
      }
    }
    kept.push_back(alternatives[i]);
  }
  ASSIGN_OR_RETURN(std::string rewritten, RewriteWhitespaceClasses(absl::StrJoin(kept, "|")));
  RE2::Options options;
  options.set_log_errors(false);
  options.set_max_mem(int64_t{256} << 20);  // Room for the DFA of the Unicode classes.
  split_regex_ = std::make_unique<RE2>(rewritten, options);
  if (!split_regex_->ok()) {
    return absl::InvalidArgumentError(absl::StrCat("pre-tokenizer regex does not compile in RE2 (",
                                                   split_regex_->error(), "): ", pattern));
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::ParseConfigJson(absl::string_view text) {
  if (text.empty()) return absl::OkStatus();
  Json config = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError("tokenizer_config.json is not a JSON object");
  }
  std::string bos = ConfigTokenText(config, "bos_token");
  std::string eos = ConfigTokenText(config, "eos_token");
  bos_token_id_ = bos.empty() ? -1 : TokenId(bos);
  eos_token_id_ = eos.empty() ? -1 : TokenId(eos);
  if ((!bos.empty() && bos_token_id_ < 0) || (!eos.empty() && eos_token_id_ < 0)) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer_config.json: bos/eos token \"",
                                                   bos_token_id_ < 0 ? bos : eos,
                                                   "\" is not in the vocabulary"));
  }
  // transformers 4.x default; the JS port uses the same.
  clean_up_tokenization_spaces_ = ConfigBool(config, "clean_up_tokenization_spaces", true);
  // LlamaTokenizerFast rebuilds the post-processor from add_bos_token / add_eos_token;
  // PreTrainedTokenizerFast (Llama 3) ignores them and keeps tokenizer.json's.
  auto tokenizer_class = config.find("tokenizer_class");
  if (tokenizer_class != config.end() && *tokenizer_class == "LlamaTokenizerFast") {
    prefix_ids_.clear();
    suffix_ids_.clear();
    if (ConfigBool(config, "add_bos_token", true) && bos_token_id_ >= 0) {
      prefix_ids_.push_back(bos_token_id_);
    }
    if (ConfigBool(config, "add_eos_token", false) && eos_token_id_ >= 0) {
      suffix_ids_.push_back(eos_token_id_);
    }
  }
  auto chat = config.find("chat_template");
  const Json* chat_text = nullptr;
  if (chat != config.end() && chat->is_string()) {
    chat_text = &*chat;
  } else if (chat != config.end() && chat->is_array()) {  // Named templates: use "default".
    for (const Json& named : *chat) {
      if (named.is_object() && named.contains("name") && named["name"] == "default" &&
          named.contains("template") && named["template"].is_string()) {
        chat_text = &named["template"];
      }
    }
  }
  if (chat_text != nullptr) {
    chat_template_ = ChatTemplate::FromConfig(chat_text->get<std::string>(), bos);
  }
  return absl::OkStatus();
}

int32_t Tokenizer::TokenId(absl::string_view token) const {
  auto added = added_tokens_.find(token);
  if (added != added_tokens_.end()) return added->second.id;
  std::string bytes;
  if (!ByteLevelToBytes(token, &bytes)) return -1;
  auto it = bytes_to_id_.find(bytes);
  return it == bytes_to_id_.end() ? -1 : it->second;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < vocab_size() && is_special_[id];
}

absl::string_view Tokenizer::TokenBytes(int32_t id) const {
  return id >= 0 && id < vocab_size() ? absl::string_view(id_to_bytes_[id]) : absl::string_view();
}

std::vector<int32_t> Tokenizer::Encode(absl::string_view text, const EncodeOptions& options) const {
  std::string sanitized;
  if (!IsValidUtf8(text)) {
    AppendUtf8Lossy(text, &sanitized);
    text = sanitized;
  }
  std::vector<int32_t> ids;
  if (options.add_special_tokens) ids = prefix_ids_;
  ids.reserve(text.size() / 3 + prefix_ids_.size() + suffix_ids_.size() + 1);
  // Added tokens, leftmost and longest first, split the text into ordinary pieces.
  size_t piece_start = 0;
  for (size_t pos = 0; pos < text.size();) {
    if (added_token_first_byte_[static_cast<uint8_t>(text[pos])]) {
      const AddedToken* match = nullptr;
      size_t match_length = 0;
      for (size_t length : added_token_lengths_) {
        if (pos + length > text.size()) continue;
        auto it = added_tokens_.find(text.substr(pos, length));
        if (it != added_tokens_.end() && (options.parse_special_tokens || !it->second.special)) {
          match = &it->second;
          match_length = length;
          break;
        }
      }
      if (match != nullptr) {
        EncodeOrdinaryText(text.substr(piece_start, pos - piece_start), &ids);
        ids.push_back(match->id);
        pos += match_length;
        piece_start = pos;
        continue;
      }
    }
    ++pos;
  }
  EncodeOrdinaryText(text.substr(piece_start), &ids);
  if (options.add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

void Tokenizer::EncodeOrdinaryText(absl::string_view text, std::vector<int32_t>* ids) const {
  ForEachPreToken(text, [&](absl::string_view word) { EncodeWord(word, ids); });
}

std::vector<std::string> Tokenizer::PreTokenize(absl::string_view text) const {
  std::vector<std::string> words;
  ForEachPreToken(text, [&](absl::string_view word) { words.emplace_back(word); });
  return words;
}

void Tokenizer::ForEachPreToken(absl::string_view text,
                                absl::FunctionRef<void(absl::string_view)> fn) const {
  const re2::StringPiece whole(text.data(), text.size());
  re2::StringPiece match;
  re2::StringPiece groups[2];
  size_t emitted = 0;  // Text before this is handed out; unmatched gaps are pieces too.
  for (size_t pos = 0; pos < text.size();) {
    // Patterns of this family match at every position: try the cheaper anchored match first.
    if (!split_regex_->Match(whole, pos, whole.size(), RE2::ANCHOR_START, &match, 1) &&
        !split_regex_->Match(whole, pos, whole.size(), RE2::UNANCHORED, &match, 1)) {
      break;
    }
    size_t start = match.data() - text.data();
    size_t end = start + match.size();
    if (end == start) {  // An empty match splits nothing.
      pos = start + 1;
      continue;
    }
    if (whitespace_lookahead_ && end < text.size() && match.size() > 1) {
      size_t last = end - 1;
      while ((static_cast<uint8_t>(text[last]) & 0xC0) == 0x80) --last;
      size_t length;
      // Only an all-whitespace match can come from the `\s+` alternative: check the ends
      // first, then ask RE2 which alternative matched.
      if (last > start && IsWhitespace(DecodeCodePoint(text, start, &length)) &&
          IsWhitespace(DecodeCodePoint(text, last, &length)) &&
          split_regex_->Match(whole, start, end, RE2::ANCHOR_BOTH, groups, 2) &&
          groups[1].data() != nullptr) {
        // `\s+(?!\S)`: leave the last whitespace character to the next pre-token.
        end = last;
      }
    }
    if (start > emitted) fn(text.substr(emitted, start - emitted));
    fn(text.substr(start, end - start));
    emitted = pos = end;
  }
  if (emitted < text.size()) fn(text.substr(emitted));
}

void Tokenizer::EncodeWord(absl::string_view word, std::vector<int32_t>* ids) const {
  if (word.size() == 1) {
    ids->push_back(byte_ids_[static_cast<uint8_t>(word[0])]);
    return;
  }
  if (ignore_merges_) {
    auto it = bytes_to_id_.find(word);
    if (it != bytes_to_id_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  if (word.size() > kMaxCachedWordBytes) {
    MergeWord(word, ids);
    return;
  }
  {
    absl::ReaderMutexLock lock(&cache_mutex_);
    auto it = word_cache_.find(word);
    if (it != word_cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t first = ids->size();
  MergeWord(word, ids);
  absl::MutexLock lock(&cache_mutex_);
  if (word_cache_.size() >= kWordCacheCapacity) word_cache_.clear();
  word_cache_.try_emplace(word, ids->begin() + first, ids->end());
}

void Tokenizer::MergeWord(absl::string_view word, std::vector<int32_t>* ids) const {
  // Symbols in a doubly linked list; candidate merges in a min-heap by (rank, position),
  // checked when popped since neighbours change (lazy deletion).
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t merged_id;
    bool operator>(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : pos > other.pos;
    }
  };
  const int32_t n = static_cast<int32_t>(word.size());
  std::vector<Symbol> symbols(n);
  for (int32_t i = 0; i < n; ++i) {
    symbols[i] = Symbol{byte_ids_[static_cast<uint8_t>(word[i])], i - 1, i + 1 < n ? i + 1 : -1};
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  const auto push_pair = [&](int32_t left) {
    if (left < 0 || symbols[left].next < 0) return;
    int32_t right = symbols[left].next;
    auto it = merges_.find(PairKey(symbols[left].id, symbols[right].id));
    if (it != merges_.end()) heap.push(Candidate{it->second.rank, left, it->second.merged_id});
  };
  for (int32_t i = 0; i + 1 < n; ++i) push_pair(i);
  while (!heap.empty()) {
    Candidate top = heap.top();
    heap.pop();
    Symbol& left = symbols[top.pos];
    if (left.id < 0 || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    auto it = merges_.find(PairKey(left.id, right.id));
    if (it == merges_.end() || it->second.merged_id != top.merged_id) continue;  // Stale.
    left.id = top.merged_id;
    right.id = -1;  // Dead.
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    push_pair(left.prev);
    push_pair(top.pos);
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) ids->push_back(symbols[i].id);
}

absl::StatusOr<std::string> Tokenizer::Decode(const std::vector<int32_t>& ids,
                                              const DecodeOptions& options) const {
  std::string bytes;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " is outside the vocabulary [0, ", vocab_size(), ")"));
    }
    if (options.skip_special_tokens && is_special_[id]) continue;
    bytes += id_to_bytes_[id];
  }
  std::string text;
  AppendUtf8Lossy(bytes, &text);
  bool clean_up = options.clean_up_tokenization_spaces == DecodeOptions::CleanUp::kFromConfig
                      ? clean_up_tokenization_spaces_
                      : options.clean_up_tokenization_spaces == DecodeOptions::CleanUp::kOn;
  return clean_up ? CleanUpTokenizationSpaces(std::move(text)) : text;
}

absl::StatusOr<std::string> Tokenizer::ApplyChatTemplate(const std::vector<ChatMessage>& messages,
                                                         const ChatOptions& options) const {
  if (!chat_template_.ok()) return chat_template_.status();
  return chat_template_->Render(messages, options);
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::EncodeChat(const std::vector<ChatMessage>& messages,
                                                           const ChatOptions& options) const {
  ASSIGN_OR_RETURN(std::string prompt, ApplyChatTemplate(messages, options));
  EncodeOptions encode;
  encode.add_special_tokens = false;
  return Encode(prompt, encode);
}

absl::StatusOr<std::string> StreamDecoder::Push(int32_t id) {
  if (id < 0 || id >= tokenizer_->vocab_size()) {
    return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is outside the vocabulary"));
  }
  if (skip_special_tokens_ && tokenizer_->IsSpecial(id)) return std::string();
  absl::StrAppend(&pending_, tokenizer_->TokenBytes(id));
  size_t held = IncompleteUtf8Suffix(pending_);
  std::string text;
  AppendUtf8Lossy(absl::string_view(pending_).substr(0, pending_.size() - held), &text);
  pending_.erase(0, pending_.size() - held);
  return text;
}

std::string StreamDecoder::Flush() {
  std::string text;
  AppendUtf8Lossy(pending_, &text);
  pending_.clear();
  return text;
}

}  // namespace sparseaccel
