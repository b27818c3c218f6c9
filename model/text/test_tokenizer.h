#ifndef SPARSEACCEL_MODEL_TEXT_TEST_TOKENIZER_H_
#define SPARSEACCEL_MODEL_TEXT_TEST_TOKENIZER_H_

// Small byte-level BPE tokenizer files for tests (testonly): the 256 bytes are ids 0..255, the
// given merges follow in order, and four added tokens sit at ids 1000..1003 (<|bos|>, <|eot|>,
// <|eot|>x special; <extra> not).

#include <string>
#include <utility>
#include <vector>

#include "nlohmann/json.hpp"

namespace sparseaccel {

// Llama 3's pre-tokenizer split pattern.
extern const char kLlama3Pattern[];

// GPT-2's byte-level alphabet: the vocabulary spelling of one byte, and of a byte string.
std::string ByteLevelChar(int byte);
std::string ByteLevel(const std::string& bytes);

// What MakeTokenizerJson writes: the merges are of raw bytes, applied in order.
struct TokenizerSpec {
  std::vector<std::pair<std::string, std::string>> merges;
  std::vector<std::string> extra_vocab;  // Whole-word entries without merges.
  bool merges_as_lists = false;
  bool ignore_merges = false;
  std::string pattern = kLlama3Pattern;
};

// tokenizer.json for `spec`.
nlohmann::json MakeTokenizerJson(const TokenizerSpec& spec);

// tokenizer_config.json with bos <|bos|>, eos <|eot|> and `chat_template`.
std::string MakeConfigJson(const std::string& chat_template);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_TEXT_TEST_TOKENIZER_H_
