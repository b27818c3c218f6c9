#include "model/text/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "model/text/chat_template.h"
#include "model/text/test_tokenizer.h"
#include "nlohmann/json.hpp"

namespace sparseaccel {
namespace {

using Json = nlohmann::json;

constexpr char kLlama31Template[] =
    "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul "
    "2024\" %}\n{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}"
    "<|start_header_id|>";
constexpr char kLlama3Template[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% "
    "endif %}{{ content }}{% endfor %}";

std::unique_ptr<Tokenizer> MakeTokenizer(const TokenizerSpec& spec,
                                         const std::string& chat_template = kLlama31Template) {
  auto tokenizer =
      Tokenizer::FromJson(MakeTokenizerJson(spec).dump(), MakeConfigJson(chat_template));
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? *std::move(tokenizer) : nullptr;
}

std::vector<int32_t> Bytes(const std::string& text) {
  std::vector<int32_t> ids;
  for (unsigned char c : text) ids.push_back(c);
  return ids;
}

TEST(PreTokenizeTest, Llama3PatternSplitsLikeHuggingFace) {
  // Expected splits from Python's `regex` module with the original pattern.
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"a   b", {"a", "  ", " b"}},
      {"x   ", {"x", "   "}},
      {"I'm HE'S we'D", {"I", "'m", " HE", "'S", " we", "'D"}},
      {"1234567 89", {"123", "456", "7", " ", "89"}},
      {"a \n\n  b", {"a", " \n\n", " ", " b"}},
      {"  \t\n x", {"  \t\n", " x"}},
      {"hi!!  ?\n\n", {"hi", "!!", " ", " ?\n\n"}},
      {"a\u3000\u3000b", {"a", "\u3000", "\u3000b"}},
      {"a\u0085\u0085b", {"a", "\u0085", "\u0085b"}},  // U+0085 is \s in Oniguruma.
      {"a\u00a0b", {"a", "\u00a0b"}},
      {"foo\r\n\r\n\tbar", {"foo", "\r\n\r\n", "\tbar"}},
      {"  ", {"  "}},
      {"\u4f60\u597d  \u4e16\u754c", {"\u4f60\u597d", " ", " \u4e16\u754c"}},
  };
  auto tokenizer = MakeTokenizer({});
  ASSERT_NE(tokenizer, nullptr);
  for (const auto& [text, expected] : cases) {
    EXPECT_EQ(tokenizer->PreTokenize(text), expected) << text;
  }
}

TEST(PreTokenizeTest, WhitespaceLookaheadAlternativeOnItsOwn) {
  TokenizerSpec spec;
  spec.pattern = "\\S+|\\s+(?!\\S)|\\s+";
  auto tokenizer = MakeTokenizer(spec);
  ASSERT_NE(tokenizer, nullptr);
  using Words = std::vector<std::string>;
  // A run before a non-space gives back its last character; a single one or one at the end
  // of the text stays whole.
  EXPECT_EQ(tokenizer->PreTokenize("a   b"), (Words{"a", "  ", " ", "b"}));
  EXPECT_EQ(tokenizer->PreTokenize("a b"), (Words{"a", " ", "b"}));
  EXPECT_EQ(tokenizer->PreTokenize("a  "), (Words{"a", "  "}));
  EXPECT_EQ(tokenizer->PreTokenize("  b"), (Words{" ", " ", "b"}));
  EXPECT_EQ(tokenizer->PreTokenize("a\t\u2003\u3000b"), (Words{"a", "\t\u2003", "\u3000", "b"}));
}

TEST(PreTokenizeTest, UnsupportedPatternsAreErrors) {
  for (const std::string& pattern : {std::string("\\s+(?!\\S)"), std::string("a(?=b)|\\s+"),
                                     std::string("[^\\S]"), std::string("(unclosed")}) {
    TokenizerSpec spec;
    spec.pattern = pattern;
    auto tokenizer = Tokenizer::FromJson(MakeTokenizerJson(spec).dump(), "");
    EXPECT_FALSE(tokenizer.ok()) << pattern;
  }
  Json json = MakeTokenizerJson({});
  json["pre_tokenizer"] = {{"type", "Whitespace"}};
  auto tokenizer = Tokenizer::FromJson(json.dump(), "");
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_NE(std::string(tokenizer.status().message()).find("pre_tokenizer"), std::string::npos);
}

TEST(TokenizerTest, RejectsBadFiles) {
  EXPECT_FALSE(Tokenizer::FromJson("{not json", "").ok());
  EXPECT_FALSE(Tokenizer::FromJson("[]", "").ok());
  Json json = MakeTokenizerJson({});
  json["model"]["type"] = "WordPiece";
  EXPECT_FALSE(Tokenizer::FromJson(json.dump(), "").ok());
  json = MakeTokenizerJson({{{"a", "b"}}});
  json["model"]["merges"][0] = "a b c";
  EXPECT_FALSE(Tokenizer::FromJson(json.dump(), "").ok());
  EXPECT_FALSE(Tokenizer::FromJson(MakeTokenizerJson({}).dump(), "{\"bos_token\": 5").ok());
  EXPECT_EQ(Tokenizer::Load("/nonexistent/model").status().code(), absl::StatusCode::kNotFound);
}

TEST(TokenizerTest, LoadsFromModelDirectory) {
  std::string dir = absl::StrCat(std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp",
                                 "/tokenizer_model");
  ASSERT_EQ(system(absl::StrCat("mkdir -p ", dir).c_str()), 0);
  std::ofstream(dir + "/tokenizer.json") << MakeTokenizerJson({{{"h", "i"}}}).dump();
  std::ofstream(dir + "/tokenizer_config.json") << MakeConfigJson(kLlama31Template);
  auto tokenizer = Tokenizer::Load(dir);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->Encode("hi"), (std::vector<int32_t>{1000, 256}));
  EXPECT_EQ((*tokenizer)->bos_token_id(), 1000);
  EXPECT_EQ((*tokenizer)->eos_token_id(), 1001);
  EXPECT_EQ((*tokenizer)->vocab_size(), 1004);
}

// The textbook algorithm: merge the lowest-ranked adjacent pair (leftmost on ties) until none.
std::vector<std::string> NaiveBpe(const std::string& word,
                                  const std::map<std::pair<std::string, std::string>, int>& ranks) {
  std::vector<std::string> parts;
  for (char c : word) parts.push_back(std::string(1, c));
  while (true) {
    int best = -1;
    size_t at = 0;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      auto it = ranks.find({parts[i], parts[i + 1]});
      if (it != ranks.end() && (best < 0 || it->second < best)) {
        best = it->second;
        at = i;
      }
    }
    if (best < 0) return parts;
    parts[at] += parts[at + 1];
    parts.erase(parts.begin() + at + 1);
  }
}

TEST(BpeTest, MatchesNaiveMergeOnRandomWords) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 5; ++trial) {
    // Random merges over a 4-letter alphabet, each producing a new token.
    std::vector<std::string> tokens = {"a", "b", "c", "d"};
    std::set<std::string> known(tokens.begin(), tokens.end());
    TokenizerSpec spec;
    std::map<std::pair<std::string, std::string>, int> ranks;
    while (spec.merges.size() < 60) {
      std::uniform_int_distribution<size_t> pick(0, tokens.size() - 1);
      std::string left = tokens[pick(rng)], right = tokens[pick(rng)];
      if (known.count(left + right) || left.size() + right.size() > 8) continue;
      ranks[{left, right}] = static_cast<int>(spec.merges.size());
      spec.merges.emplace_back(left, right);
      tokens.push_back(left + right);
      known.insert(left + right);
    }
    auto tokenizer = MakeTokenizer(spec);
    ASSERT_NE(tokenizer, nullptr);
    EncodeOptions plain;
    plain.add_special_tokens = false;
    for (int w = 0; w < 300; ++w) {
      std::string word;
      int length = std::uniform_int_distribution<int>(1, 40)(rng);
      for (int i = 0; i < length; ++i) word.push_back("abcd"[rng() % 4]);
      std::vector<int32_t> expected;
      for (const std::string& part : NaiveBpe(word, ranks)) {
        expected.push_back(tokenizer->TokenId(ByteLevel(part)));
      }
      // Twice: the second call is served by the word cache.
      EXPECT_EQ(tokenizer->Encode(word, plain), expected) << word;
      EXPECT_EQ(tokenizer->Encode(word, plain), expected) << word;
    }
  }
}

TEST(BpeTest, MergeListFormsAreEquivalent) {
  TokenizerSpec spec;
  spec.merges = {{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {" ", "w"}};
  auto strings = MakeTokenizer(spec);
  spec.merges_as_lists = true;
  auto lists = MakeTokenizer(spec);
  ASSERT_NE(strings, nullptr);
  ASSERT_NE(lists, nullptr);
  EXPECT_EQ(strings->Encode("hello world"), lists->Encode("hello world"));
  EXPECT_EQ(strings->Encode("hello world"),
            (std::vector<int32_t>{1000, 259, 260, 'o', 'r', 'l', 'd'}));
}

TEST(BpeTest, IgnoreMergesTakesWholeWordsFromVocab) {
  TokenizerSpec spec;
  spec.extra_vocab = {"abc"};
  EncodeOptions plain;
  plain.add_special_tokens = false;
  auto with_merges = MakeTokenizer(spec);
  spec.ignore_merges = true;
  auto ignoring = MakeTokenizer(spec);
  ASSERT_NE(with_merges, nullptr);
  ASSERT_NE(ignoring, nullptr);
  EXPECT_EQ(with_merges->Encode("abc", plain), Bytes("abc"));
  EXPECT_EQ(ignoring->Encode("abc", plain), (std::vector<int32_t>{256}));
}

TEST(TokenizerTest, AddedTokens) {
  auto tokenizer = MakeTokenizer({});
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->Encode("a<|eot|>b"), (std::vector<int32_t>{1000, 'a', 1001, 'b'}));
  // Longest match wins; a non-special added token matches even when specials are text.
  EXPECT_EQ(tokenizer->Encode("<|eot|>x<extra>"), (std::vector<int32_t>{1000, 1002, 1003}));
  EncodeOptions as_text;
  as_text.parse_special_tokens = false;
  as_text.add_special_tokens = false;
  std::vector<int32_t> expected = Bytes("<|eot|>");
  expected.push_back(1003);
  EXPECT_EQ(tokenizer->Encode("<|eot|><extra>", as_text), expected);
  EXPECT_EQ(tokenizer->Encode("<|bos|"),
            (std::vector<int32_t>{1000, '<', '|', 'b', 'o', 's', '|'}));
  EXPECT_TRUE(tokenizer->IsSpecial(1001));
  EXPECT_FALSE(tokenizer->IsSpecial(1003));
  EXPECT_EQ(tokenizer->TokenId("<|eot|>"), 1001);
  EXPECT_EQ(tokenizer->TokenId("no such token"), -1);
  EXPECT_EQ(tokenizer->TokenId("\xE2"), -1);  // Invalid UTF-8.
}

TEST(TokenizerTest, Decode) {
  auto tokenizer = MakeTokenizer({});
  ASSERT_NE(tokenizer, nullptr);
  std::vector<int32_t> ids = tokenizer->Encode("Hi , you 're<|eot|>");
  EXPECT_EQ(*tokenizer->Decode(ids), "<|bos|>Hi, you're<|eot|>");  // Config: clean-up on.
  DecodeOptions options;
  options.skip_special_tokens = true;
  options.clean_up_tokenization_spaces = DecodeOptions::CleanUp::kOff;
  EXPECT_EQ(*tokenizer->Decode(ids, options), "Hi , you 're");
  EXPECT_EQ(*tokenizer->Decode({0xE2, 0x82}), "\xEF\xBF\xBD");
  EXPECT_FALSE(tokenizer->Decode({5000}).ok());
  EXPECT_FALSE(tokenizer->Decode({-1}).ok());
}

TEST(Utf8Test, LossyConversionReplacesMaximalSubparts) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"plain \xE2\x82\xAC \xF0\x9F\x98\x80", "plain \xE2\x82\xAC \xF0\x9F\x98\x80"},
      {"\xFF", "\xEF\xBF\xBD"},
      {"\x80\xBF", "\xEF\xBF\xBD\xEF\xBF\xBD"},
      {"\xE2\x82", "\xEF\xBF\xBD"},
      {"\xE2\x82x", "\xEF\xBF\xBDx"},
      {"\xF0\x9F\x98", "\xEF\xBF\xBD"},
      {"\xED\xA0\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},  // Surrogate.
      {"\xC0\xAF", "\xEF\xBF\xBD\xEF\xBF\xBD"},                  // Overlong.
      {"\xE0\x80\xAF", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},
      {"\xF4\x90\x80\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},  // > U+10FFFF.
  };
  for (const auto& [input, expected] : cases) {
    std::string out;
    AppendUtf8Lossy(input, &out);
    EXPECT_EQ(out, expected) << input;
  }
  EXPECT_EQ(IncompleteUtf8Suffix("ab\xE2\x82"), 2u);
  EXPECT_EQ(IncompleteUtf8Suffix("ab\xF0"), 1u);
  EXPECT_EQ(IncompleteUtf8Suffix("ab\xF0\x9F\x98"), 3u);
  EXPECT_EQ(IncompleteUtf8Suffix("ab\xF0\x9F\x98\x80"), 0u);
  EXPECT_EQ(IncompleteUtf8Suffix("ab\xE0\x80"), 0u);  // Already invalid.
  EXPECT_EQ(IncompleteUtf8Suffix("ab\x80"), 0u);
}

TEST(TokenizerTest, InvalidUtf8IsEncodedAsReplacementCharacters) {
  auto tokenizer = MakeTokenizer({});
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->Encode("a\xFF\xE2\x82 b"), tokenizer->Encode("a\uFFFD\uFFFD b"));
}

TEST(StreamDecoderTest, DeltasNeverSplitCharactersAndConcatenateToDecode) {
  auto tokenizer = MakeTokenizer({{{"\xF0", "\x9F"},
                                   {"\x98", "\x80"},
                                   {"\xF0\x9F", "\x98\x80"},
                                   {"\xE4", "\xBD"},
                                   {"\xE4\xBD", "\xA0"}}});
  ASSERT_NE(tokenizer, nullptr);
  std::mt19937 rng(11);
  const std::vector<std::string> pieces = {
      "a", " ", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\xE4\xBD\xA0", "<|eot|>", "\xFF", "\xE2\x82"};
  for (int trial = 0; trial < 200; ++trial) {
    std::string text;
    int n = std::uniform_int_distribution<int>(1, 12)(rng);
    for (int i = 0; i < n; ++i) text += pieces[rng() % pieces.size()];
    // Byte tokens split characters; the merged tokens and <|eot|> do not.
    std::vector<int32_t> ids;
    for (int32_t id : tokenizer->Encode(text)) {
      if (id >= 256 && id < 1000 && rng() % 2) {
        for (unsigned char c : tokenizer->TokenBytes(id)) ids.push_back(c);
      } else {
        ids.push_back(id);
      }
    }
    for (bool skip : {false, true}) {
      StreamDecoder stream(tokenizer.get(), skip);
      std::string streamed;
      for (int32_t id : ids) {
        auto delta = stream.Push(id);
        ASSERT_TRUE(delta.ok());
        std::string valid;
        AppendUtf8Lossy(*delta, &valid);
        EXPECT_EQ(valid, *delta) << "delta is not valid UTF-8";
        streamed += *delta;
      }
      streamed += stream.Flush();
      DecodeOptions options;
      options.skip_special_tokens = skip;
      options.clean_up_tokenization_spaces = DecodeOptions::CleanUp::kOff;
      EXPECT_EQ(streamed, *tokenizer->Decode(ids, options));
    }
  }
  StreamDecoder stream(tokenizer.get());
  EXPECT_EQ(*stream.Push(0xF0), "");
  EXPECT_EQ(*stream.Push(0x9F), "");
  EXPECT_EQ(*stream.Push(0x98), "");
  EXPECT_EQ(*stream.Push(0x80), "\xF0\x9F\x98\x80");
  EXPECT_EQ(*stream.Push(0xE2), "");
  EXPECT_EQ(stream.Flush(), "\xEF\xBF\xBD");
  EXPECT_FALSE(stream.Push(99999).ok());
}

TEST(TokenizerTest, ConcurrentEncodeGivesSameIds) {
  TokenizerSpec spec;
  spec.merges = {{"t", "h"}, {"th", "e"}, {" ", "the"}, {"a", "n"}, {"an", "d"}};
  auto tokenizer = MakeTokenizer(spec);
  ASSERT_NE(tokenizer, nullptr);
  std::mt19937 rng(3);
  std::vector<std::string> texts;
  for (int i = 0; i < 50; ++i) {
    std::string text;
    for (int w = 0; w < 40; ++w) text += std::string(" the and than then")[rng() % 18];
    texts.push_back(text);
  }
  std::vector<std::vector<int32_t>> expected;
  for (const std::string& text : texts) expected.push_back(tokenizer->Encode(text));
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) {
          mismatches[t] += tokenizer->Encode(texts[i]) != expected[i];
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

TEST(ChatTemplateTest, Llama31Format) {
  auto tokenizer = MakeTokenizer({}, kLlama31Template);
  ASSERT_NE(tokenizer, nullptr);
  auto prompt = tokenizer->ApplyChatTemplate({{"user", " Hi there\n"}});
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_EQ(*prompt,
            "<|bos|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
            "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_"
            "header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
  ChatOptions options;
  options.add_generation_prompt = false;
  options.date_string = "22 Nov 2026";
  prompt = tokenizer->ApplyChatTemplate(
      {{"system", "\x1c Be brief. \u3000"}, {"user", "Q"}, {"assistant", "A"}}, options);
  ASSERT_TRUE(prompt.ok());
  EXPECT_EQ(*prompt,
            "<|bos|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
            "December 2023\nToday Date: 22 Nov 2026\n\nBe brief.<|eot_id|><|start_header_id|>"
            "user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
            "\n\nA<|eot_id|>");
  EXPECT_FALSE(tokenizer->ApplyChatTemplate({{"tool", "{}"}}).ok());
  EXPECT_FALSE(tokenizer->ApplyChatTemplate({}).ok());
}

TEST(ChatTemplateTest, Llama3Format) {
  auto tokenizer = MakeTokenizer({}, kLlama3Template);
  ASSERT_NE(tokenizer, nullptr);
  auto prompt = tokenizer->ApplyChatTemplate({{"system", "S"}, {"user", "U"}});
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_EQ(*prompt,
            "<|bos|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>"
            "user<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
            "\n\n");
  auto ids = tokenizer->EncodeChat({{"user", "U"}});
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->front(), 1000);  // BOS once, from the template.
  EXPECT_NE(ids->at(1), 1000);
}

TEST(ChatTemplateTest, UnknownTemplateIsUnimplemented) {
  auto tokenizer = MakeTokenizer({}, "{{ messages }}");
  ASSERT_NE(tokenizer, nullptr);  // The tokenizer still loads.
  EXPECT_EQ(tokenizer->ApplyChatTemplate({{"user", "x"}}).status().code(),
            absl::StatusCode::kUnimplemented);
}

TEST(ChatTemplateTest, StripMatchesPythonStrip) {
  EXPECT_EQ(StripUnicodeWhitespace(" \t\n\x0b\x0c\r\x1c\x1f\u0085\u00a0x y\u2003\u3000"), "x y");
  EXPECT_EQ(StripUnicodeWhitespace("\u200bx\ufeff"), "\u200bx\ufeff");  // Not whitespace.
  EXPECT_EQ(StripUnicodeWhitespace(" \n "), "");
}

}  // namespace
}  // namespace sparseaccel
