#include "model/text/text_stream.h"

#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/text/test_tokenizer.h"
#include "model/text/tokenizer.h"

namespace sparseaccel {
namespace {

// Byte tokens (id = byte) and the merge "E"+"N" (id 256), so a stop string can end inside a
// token as well as across tokens.
std::unique_ptr<Tokenizer> ByteTokenizer() {
  TokenizerSpec spec;
  spec.merges = {{"E", "N"}};
  auto tokenizer = Tokenizer::FromJson(MakeTokenizerJson(spec).dump(), MakeConfigJson(""));
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? *std::move(tokenizer) : nullptr;
}

constexpr int32_t kEn = 256;    // "EN"
constexpr int32_t kEot = 1001;  // <|eot|>, special: no text.

struct Streamed {
  std::vector<std::string> deltas;
  std::string text;
  int stopped_at = -1;  // Index of the token whose Push reported the stop.
};

// Pushes `tokens` until a stop (the last one with last = true).
Streamed Stream(const Tokenizer* tokenizer, const std::vector<int32_t>& tokens,
                std::vector<std::string> stops) {
  TextStream stream(tokenizer, std::move(stops));
  Streamed out;
  for (size_t i = 0; i < tokens.size(); ++i) {
    bool stopped = false;
    absl::StatusOr<std::string> delta = stream.Push(tokens[i], i + 1 == tokens.size(), &stopped);
    EXPECT_TRUE(delta.ok()) << delta.status();
    if (!delta.ok()) break;
    out.deltas.push_back(*delta);
    out.text += *delta;
    if (stopped) {
      out.stopped_at = static_cast<int>(i);
      break;
    }
  }
  return out;
}

std::vector<int32_t> Bytes(const std::string& text) {
  return std::vector<int32_t>(text.begin(), text.end());
}

TEST(TextStreamTest, WithoutStopsEveryTokenIsSentAtOnce) {
  const auto tokenizer = ByteTokenizer();
  const Streamed s = Stream(tokenizer.get(), {'a', kEn, 'd', kEot, '!'}, {});
  EXPECT_EQ(s.deltas, (std::vector<std::string>{"a", "EN", "d", "", "!"}));
  EXPECT_EQ(s.stopped_at, -1);
}

TEST(TextStreamTest, APossibleStopIsHeldBackUntilItIsNotOne) {
  const auto tokenizer = ByteTokenizer();
  // "EN" could start "END": held; "x" shows it is not.
  const Streamed s = Stream(tokenizer.get(), {'a', kEn, 'x', 'b'}, {"END"});
  EXPECT_EQ(s.deltas, (std::vector<std::string>{"a", "", "ENx", "b"}));
  EXPECT_EQ(s.stopped_at, -1);
}

TEST(TextStreamTest, TheTextEndsBeforeTheStopString) {
  const auto tokenizer = ByteTokenizer();
  // Across tokens ("EN" then "D"), and inside one token ("xEN" ends in the merged token).
  Streamed s = Stream(tokenizer.get(), {'a', kEn, 'D', 'z'}, {"END"});
  EXPECT_EQ(s.text, "a");
  EXPECT_EQ(s.stopped_at, 2);
  s = Stream(tokenizer.get(), {'a', 'b', kEn, 'c'}, {"bE"});
  EXPECT_EQ(s.text, "a");
  EXPECT_EQ(s.stopped_at, 2);
}

TEST(TextStreamTest, TheEarliestOfSeveralStopsWins) {
  const auto tokenizer = ByteTokenizer();
  const Streamed s = Stream(tokenizer.get(), Bytes("hello world"), {"world", "lo w", "o"});
  EXPECT_EQ(s.text, "hell");
  EXPECT_EQ(s.stopped_at, 4);
}

TEST(TextStreamTest, TheLastTokenReleasesWhatWasHeldBack) {
  const auto tokenizer = ByteTokenizer();
  // A held-back prefix of a stop, and an incomplete UTF-8 character (the decoder's part).
  Streamed s = Stream(tokenizer.get(), {'a', kEn}, {"END"});
  EXPECT_EQ(s.text, "aEN");
  s = Stream(tokenizer.get(), {'a', 0xC3}, {});
  EXPECT_EQ(s.deltas.back(), "\xEF\xBF\xBD");  // U+FFFD: the stream ended mid-character.
  s = Stream(tokenizer.get(), {0xC3, 0xA9, 'x'}, {});
  EXPECT_EQ(s.deltas, (std::vector<std::string>{"", "\xC3\xA9", "x"}));
}

TEST(TextStreamTest, WithoutATokenizerThereIsNoText) {
  const Streamed s = Stream(nullptr, {1, 2, 3}, {});
  EXPECT_EQ(s.deltas, (std::vector<std::string>{"", "", ""}));
}

// Random byte streams over a small alphabet against the definition: the text sent is the whole
// decoded text up to the first occurrence of any stop string, reported at the token that
// completes that occurrence, and nothing after.
TEST(TextStreamTest, RandomStreamsSendTheTextBeforeTheFirstStop) {
  const auto tokenizer = ByteTokenizer();
  std::mt19937 rng(std::random_device{}());
  const std::string alphabet = "abEND";
  auto random_text = [&](size_t min, size_t max) {
    std::string s(std::uniform_int_distribution<size_t>(min, max)(rng), ' ');
    for (char& c : s) c = alphabet[rng() % alphabet.size()];
    return s;
  };
  for (int trial = 0; trial < 500; ++trial) {
    const std::vector<std::string> stops = {random_text(1, 3), random_text(2, 4)};
    std::vector<int32_t> tokens;
    std::vector<size_t> ends;  // Text length after each token.
    std::string full;
    for (int i = 0; i < 24; ++i) {
      const bool merged = rng() % 4 == 0;
      tokens.push_back(merged ? kEn : alphabet[rng() % alphabet.size()]);
      full += merged ? "EN" : std::string(1, static_cast<char>(tokens.back()));
      ends.push_back(full.size());
    }
    size_t first = std::string::npos, completed = std::string::npos;
    for (const std::string& stop : stops) {
      const size_t at = full.find(stop);
      if (at == std::string::npos) continue;
      if (at + stop.size() < completed || (at + stop.size() == completed && at < first)) {
        completed = at + stop.size();
        first = at;
      }
    }
    const Streamed s = Stream(tokenizer.get(), tokens, stops);
    if (first == std::string::npos) {
      EXPECT_EQ(s.text, full) << trial;
      EXPECT_EQ(s.stopped_at, -1) << trial;
      continue;
    }
    const int token =
        static_cast<int>(std::lower_bound(ends.begin(), ends.end(), completed) - ends.begin());
    EXPECT_EQ(s.stopped_at, token) << trial << " " << full << " " << stops[0] << "|" << stops[1];
    // At the token that completes the first match, the text ends at the earliest match in it.
    std::string upto = full.substr(0, ends[token]);
    size_t cut = upto.size();
    for (const std::string& stop : stops) cut = std::min(cut, upto.find(stop));
    EXPECT_EQ(s.text, full.substr(0, cut)) << trial;
  }
}

}  // namespace
}  // namespace sparseaccel
