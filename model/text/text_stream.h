#ifndef SPARSEACCEL_MODEL_TEXT_TEXT_STREAM_H_
#define SPARSEACCEL_MODEL_TEXT_TEXT_STREAM_H_

// Generated tokens to the text deltas a streaming client receives, with stop strings: text
// that may be the start of a stop string is held back until it is not (or until the stream
// ends), and the text ends before the first stop string that appears. Deltas never split a
// UTF-8 character (StreamDecoder); special tokens have no text.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/text/tokenizer.h"

namespace sparseaccel {

class TextStream {
 public:
  // `tokenizer` may be null (token-id requests): every delta is then empty. Stop strings must
  // not be empty.
  TextStream(const Tokenizer* tokenizer, std::vector<std::string> stops);

  // The text to send with `token`. `last`: no token follows, so nothing is held back. Sets
  // *stopped when a stop string appeared; the text then ends before it, and the stream is over.
  absl::StatusOr<std::string> Push(int32_t token, bool last, bool* stopped);

 private:
  // Length of the longest end of the unsent text that is a proper prefix of a stop string.
  size_t HeldBack() const;

  const Tokenizer* tokenizer_;
  StreamDecoder decoder_;
  const std::vector<std::string> stops_;
  std::string text_;  // Everything decoded so far.
  size_t sent_ = 0;   // Bytes of text_ sent.
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_TEXT_TEXT_STREAM_H_
