#ifndef SPARSEACCEL_MODEL_TEXT_TOKENIZER_H_
#define SPARSEACCEL_MODEL_TEXT_TOKENIZER_H_

// Byte-level BPE tokenizer of the Llama 3 family, loaded from a Hugging Face model directory
// (`tokenizer.json` + `tokenizer_config.json`), producing the same ids as Hugging Face's
// `tokenizer.encode` / `tokenizer.decode`.
//
// Supported tokenizer.json subset (anything else is an InvalidArgument error at load):
// - model: BPE, byte_fallback false, no unk/continuing_subword_prefix/end_of_word_suffix,
//   ignore_merges true or false; merges as "a b" strings or [a, b] lists.
// - normalizer: null.
// - pre_tokenizer: Sequence[Split(Regex, behavior Isolated, invert false),
//   ByteLevel(use_regex false)], where the regex is RE2 syntax except for one optional
//   `\s+(?!\S)` alternative directly followed by a `\s+` alternative (the GPT-4 / Llama 3
//   family); `\s`/`\S` mean Unicode White_Space as in Oniguruma, which HF uses.
// - post_processor: TemplateProcessing (alone or in a Sequence with ByteLevel) whose single
//   template is special tokens around `$A`.
// - decoder: ByteLevel.
// - added_tokens: matched in the raw text (leftmost, longest) when `normalized` is false and
//   `lstrip`/`rstrip`/`single_word` are false.
//
// Invalid UTF-8 in text given to Encode is first replaced by U+FFFD per maximal invalid
// subsequence (WHATWG / Unicode "maximal subpart" practice), which is what a Python or
// JavaScript caller gets when turning such bytes into a string before tokenizing.
//
// Thread safety: all const methods may be called concurrently.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "model/text/chat_template.h"
#include "nlohmann/json_fwd.hpp"

namespace re2 {
class RE2;
}

namespace sparseaccel {

struct EncodeOptions {
  // Adds the post-processor's special tokens (Llama 3: <|begin_of_text|> in front), like HF's
  // `add_special_tokens=True`.
  bool add_special_tokens = true;
  // Special-token strings in the text become their ids (HF's default). False encodes them as
  // plain text (HF's `split_special_tokens=True`); non-special added tokens still match.
  bool parse_special_tokens = true;
};

struct DecodeOptions {
  bool skip_special_tokens = false;
  // HF's `clean_up_tokenization_spaces` (" ." -> ".", " 's" -> "'s", ...). kFromConfig uses
  // tokenizer_config.json's value, as transformers does.
  enum class CleanUp { kFromConfig, kOn, kOff };
  CleanUp clean_up_tokenization_spaces = CleanUp::kFromConfig;
};

class Tokenizer {
 public:
  // Reads `<model_dir>/tokenizer.json` and, when present, `<model_dir>/tokenizer_config.json`.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& model_dir);
  // Same from the files' text; `config_json` may be empty.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(absl::string_view tokenizer_json,
                                                             absl::string_view config_json);
  ~Tokenizer();

  std::vector<int32_t> Encode(absl::string_view text, const EncodeOptions& options = {}) const;
  // Text of the ids; ids outside the vocabulary are an InvalidArgument error.
  absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids,
                                     const DecodeOptions& options = {}) const;

  // The chat prompt of tokenizer_config.json's chat_template (see chat_template.h), as text and
  // as ids (encoded with special tokens parsed, none added: the template writes BOS itself).
  absl::StatusOr<std::string> ApplyChatTemplate(const std::vector<ChatMessage>& messages,
                                                const ChatOptions& options = {}) const;
  absl::StatusOr<std::vector<int32_t>> EncodeChat(const std::vector<ChatMessage>& messages,
                                                  const ChatOptions& options = {}) const;

  // The pre-tokens (regex split) of text that holds no added token; for tests and tools.
  std::vector<std::string> PreTokenize(absl::string_view text) const;

  // Vocabulary size including added tokens (max id + 1).
  int32_t vocab_size() const { return static_cast<int32_t>(id_to_bytes_.size()); }
  int32_t bos_token_id() const { return bos_token_id_; }  // -1 when not configured.
  int32_t eos_token_id() const { return eos_token_id_; }  // tokenizer_config's eos_token.
  bool IsSpecial(int32_t id) const;
  // Id of a vocabulary or added token given by its text (e.g. "<|eot_id|>"), or -1.
  int32_t TokenId(absl::string_view token) const;
  // Raw bytes of one token (an added token's content); empty for unknown ids.
  absl::string_view TokenBytes(int32_t id) const;

 private:
  struct MergeRule {
    int32_t rank;
    int32_t merged_id;
  };
  struct AddedToken {
    int32_t id;
    bool special;
  };

  Tokenizer();
  // tokenizer.json, step by step.
  absl::Status ParseTokenizerJson(absl::string_view text);
  absl::Status ParseBpeModel(const nlohmann::json& model);
  absl::Status ParseVocab(const nlohmann::json& vocab, int32_t* max_id);
  absl::Status ParseMerges(const nlohmann::json& merges);
  absl::Status ParseAddedTokens(const nlohmann::json& added, int32_t* max_id,
                                std::vector<std::pair<int32_t, std::string>>* list);
  void BuildIdTables(int32_t max_id,
                     const std::vector<std::pair<int32_t, std::string>>& added_list);
  absl::Status ParsePreTokenizer(const nlohmann::json& pre);
  absl::Status ParsePostProcessor(const nlohmann::json& post, int32_t max_id);
  absl::Status ParseConfigJson(absl::string_view text);
  absl::Status SetPreTokenizerPattern(const std::string& pattern);

  // Appends the ids of one piece of text that holds no added token.
  void EncodeOrdinaryText(absl::string_view text, std::vector<int32_t>* ids) const;
  void ForEachPreToken(absl::string_view text, absl::FunctionRef<void(absl::string_view)> fn) const;
  // Appends the BPE ids of one pre-token (raw bytes).
  void EncodeWord(absl::string_view word, std::vector<int32_t>* ids) const;
  void MergeWord(absl::string_view word, std::vector<int32_t>* ids) const;

  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }

  // Vocabulary by raw bytes (the byte-level alphabet mapped back to bytes).
  absl::flat_hash_map<std::string, int32_t> bytes_to_id_;
  std::vector<std::string> id_to_bytes_;
  int32_t byte_ids_[256];
  absl::flat_hash_map<uint64_t, MergeRule> merges_;
  bool ignore_merges_ = false;

  absl::flat_hash_map<std::string, AddedToken> added_tokens_;
  std::vector<bool> is_special_;
  std::vector<size_t> added_token_lengths_;  // Distinct lengths, longest first.
  bool added_token_first_byte_[256] = {};

  std::unique_ptr<re2::RE2> split_regex_;
  // The pattern had `\s+(?!\S)`: a whitespace run matched by the `\s+` alternative (capture
  // group 1) gives back its last character unless it ends the text or is one character long.
  bool whitespace_lookahead_ = false;

  std::vector<int32_t> prefix_ids_;  // Post-processor tokens before / after the text.
  std::vector<int32_t> suffix_ids_;
  int32_t bos_token_id_ = -1;
  int32_t eos_token_id_ = -1;
  bool clean_up_tokenization_spaces_ = false;
  absl::StatusOr<ChatTemplate> chat_template_;

  // Pre-token -> ids; bounded (cleared when full).
  mutable absl::Mutex cache_mutex_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> word_cache_
      ABSL_GUARDED_BY(cache_mutex_);
};

// Streams token ids to text: each Push returns the newly complete text, never splitting a
// UTF-8 character (bytes of an incomplete character are held back). Invalid sequences become
// U+FFFD as in Decode; the concatenated deltas plus Flush equal Decode of all ids with clean-up
// off. One decoder per stream; not thread-safe.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer* tokenizer, bool skip_special_tokens = false)
      : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}
  absl::StatusOr<std::string> Push(int32_t id);
  // Returns the held-back bytes (an incomplete character at the end becomes U+FFFD).
  std::string Flush();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_tokens_;
  std::string pending_;
};

// Appends `bytes` as valid UTF-8, each maximal invalid subsequence replaced by U+FFFD.
void AppendUtf8Lossy(absl::string_view bytes, std::string* out);
// Length of the trailing bytes of `bytes` that start a UTF-8 character but do not finish it
// (0 when the text ends on a character boundary or in an invalid sequence).
size_t IncompleteUtf8Suffix(absl::string_view bytes);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_TEXT_TOKENIZER_H_
