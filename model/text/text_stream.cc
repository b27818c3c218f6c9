#include "model/text/text_stream.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"

namespace sparseaccel {

TextStream::TextStream(const Tokenizer* tokenizer, std::vector<std::string> stops)
    : tokenizer_(tokenizer),
      decoder_(tokenizer, /*skip_special_tokens=*/true),
      stops_(std::move(stops)) {}

absl::StatusOr<std::string> TextStream::Push(int32_t token, bool last, bool* stopped) {
  *stopped = false;
  if (tokenizer_ == nullptr) return std::string();
  ASSIGN_OR_RETURN(std::string piece, decoder_.Push(token));
  text_ += piece;
  // Text sent so far was never a possible stop prefix, so a match starts at or after sent_.
  size_t end = text_.size();
  for (const std::string& stop : stops_) {
    const size_t at = text_.find(stop, sent_);
    if (at != std::string::npos && at < end) {
      end = at;
      *stopped = true;
    }
  }
  if (!*stopped && last) {
    text_ += decoder_.Flush();
    end = text_.size();
  } else if (!*stopped) {
    end -= HeldBack();
  }
  std::string delta = text_.substr(sent_, end - sent_);
  sent_ = end;
  return delta;
}

size_t TextStream::HeldBack() const {
  const absl::string_view unsent = absl::string_view(text_).substr(sent_);
  size_t held = 0;
  for (const std::string& stop : stops_) {
    for (size_t k = std::min(stop.size() - 1, unsent.size()); k > held; --k) {
      if (absl::EndsWith(unsent, absl::string_view(stop).substr(0, k))) {
        held = k;
        break;
      }
    }
  }
  return held;
}

}  // namespace sparseaccel
