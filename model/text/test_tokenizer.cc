#include "model/text/test_tokenizer.h"

namespace sparseaccel {

using Json = nlohmann::json;

const char kLlama3Pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

std::string ByteLevelChar(int byte) {
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    int cp = printable ? b : next++;
    if (b == byte) {
      std::string out;
      if (cp < 0x80) {
        out.push_back(static_cast<char>(cp));
      } else {
        out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      }
      return out;
    }
  }
  return "";
}

std::string ByteLevel(const std::string& bytes) {
  std::string out;
  for (unsigned char c : bytes) out += ByteLevelChar(c);
  return out;
}

namespace {

constexpr char kPostProcessor[] = R"({
  "type": "TemplateProcessing",
  "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}},
             {"Sequence": {"id": "A", "type_id": 0}}],
  "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [1000]}}
})";

}  // namespace

Json MakeTokenizerJson(const TokenizerSpec& spec) {
  Json vocab = Json::object();
  int next_id = 0;
  for (int b = 0; b < 256; ++b) vocab[ByteLevelChar(b)] = next_id++;
  Json merges = Json::array();
  for (const auto& [left, right] : spec.merges) {
    std::string merged = ByteLevel(left + right);
    if (!vocab.contains(merged)) vocab[merged] = next_id++;
    if (spec.merges_as_lists) {
      merges.push_back({ByteLevel(left), ByteLevel(right)});
    } else {
      merges.push_back(ByteLevel(left) + " " + ByteLevel(right));
    }
  }
  for (const std::string& word : spec.extra_vocab) vocab[ByteLevel(word)] = next_id++;
  const auto added = [](int id, const std::string& content, bool special) {
    return Json{{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
                {"rstrip", false}, {"normalized", false}, {"special", special}};
  };
  return Json{{"version", "1.0"},
              {"added_tokens",
               {added(1000, "<|bos|>", true), added(1001, "<|eot|>", true),
                added(1002, "<|eot|>x", true), added(1003, "<extra>", false)}},
              {"normalizer", nullptr},
              {"pre_tokenizer",
               {{"type", "Sequence"},
                {"pretokenizers",
                 {{{"type", "Split"},
                   {"pattern", {{"Regex", spec.pattern}}},
                   {"behavior", "Isolated"},
                   {"invert", false}},
                  {{"type", "ByteLevel"},
                   {"add_prefix_space", false},
                   {"trim_offsets", true},
                   {"use_regex", false}}}}}},
              {"post_processor", Json::parse(kPostProcessor)},
              {"decoder", {{"type", "ByteLevel"}}},
              {"model",
               {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", nullptr},
                {"byte_fallback", false},
                {"ignore_merges", spec.ignore_merges},
                {"vocab", vocab},
                {"merges", merges}}}};
}

std::string MakeConfigJson(const std::string& chat_template) {
  return Json{{"bos_token", "<|bos|>"},
              {"eos_token", {{"content", "<|eot|>"}, {"__type", "AddedToken"}}},
              {"clean_up_tokenization_spaces", true},
              {"chat_template", chat_template},
              {"tokenizer_class", "PreTrainedTokenizerFast"}}
      .dump();
}

}  // namespace sparseaccel
