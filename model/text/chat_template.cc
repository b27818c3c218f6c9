#include "model/text/chat_template.h"

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace sparseaccel {
namespace {

constexpr absl::string_view kDateFallbackPrefix = "set date_string = \"";

// Decodes the UTF-8 character at `pos` (its length in *len); invalid bytes decode to
// themselves with length 1, which never counts as whitespace below.
uint32_t CodePointAt(absl::string_view text, size_t pos, size_t* len) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(text[i]); };
  uint32_t c = byte(pos);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
  if (n == 1 || pos + n > text.size()) {
    *len = 1;
    return c;
  }
  uint32_t cp = c & (0x7F >> n);
  for (size_t i = 1; i < n; ++i) {
    if ((byte(pos + i) & 0xC0) != 0x80) {
      *len = 1;
      return c;
    }
    cp = (cp << 6) | (byte(pos + i) & 0x3F);
  }
  *len = n;
  return cp;
}

bool IsPythonSpace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

std::string HeaderBlock(absl::string_view role, absl::string_view content) {
  return absl::StrCat("<|start_header_id|>", role, "<|end_header_id|>\n\n", content, "<|eot_id|>");
}

}  // namespace

std::string StripUnicodeWhitespace(absl::string_view text) {
  size_t begin = 0;
  size_t end = 0;  // End of the last non-space character seen.
  bool seen_text = false;
  for (size_t pos = 0; pos < text.size();) {
    size_t len;
    uint32_t c = CodePointAt(text, pos, &len);
    if (!IsPythonSpace(c)) {
      if (!seen_text) begin = pos;
      seen_text = true;
      end = pos + len;
    }
    pos += len;
  }
  return seen_text ? std::string(text.substr(begin, end - begin)) : std::string();
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromConfig(absl::string_view template_text,
                                                      absl::string_view bos_token) {
  ChatTemplate chat;
  chat.bos_token_ = std::string(bos_token);
  if (!absl::StrContains(template_text, "<|start_header_id|>")) {
    return absl::UnimplementedError(
        "chat_template is not a Llama 3 template (no <|start_header_id|>); only Llama 3 and "
        "Llama 3.1 chat formats are supported");
  }
  if (absl::StrContains(template_text, "Cutting Knowledge Date")) {
    size_t at = template_text.find(kDateFallbackPrefix);
    size_t end = at == absl::string_view::npos
                     ? at
                     : template_text.find('"', at + kDateFallbackPrefix.size());
    if (end == absl::string_view::npos) {
      return absl::UnimplementedError(
          "Llama 3.1 style chat_template without a literal `set date_string = \"...\"` fallback");
    }
    chat.has_system_header_ = true;
    at += kDateFallbackPrefix.size();
    chat.default_date_ = std::string(template_text.substr(at, end - at));
  }
  return chat;
}

absl::StatusOr<std::string> ChatTemplate::Render(const std::vector<ChatMessage>& messages,
                                                 const ChatOptions& options) const {
  if (messages.empty()) return absl::InvalidArgumentError("chat needs at least one message");
  for (const ChatMessage& m : messages) {
    if (m.role != "system" && m.role != "user" && m.role != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat("unsupported chat role \"", m.role,
                                                     "\" (supported: system, user, assistant)"));
    }
  }
  std::string out = bos_token_;
  size_t first = 0;
  if (has_system_header_) {
    std::string system_message;
    if (messages[0].role == "system") {
      system_message = StripUnicodeWhitespace(messages[0].content);
      first = 1;
    }
    absl::StrAppend(&out, "<|start_header_id|>system<|end_header_id|>\n\n",
                    "Cutting Knowledge Date: December 2023\n", "Today Date: ",
                    options.date_string.empty() ? default_date_ : options.date_string, "\n\n",
                    system_message, "<|eot_id|>");
  }
  for (size_t i = first; i < messages.size(); ++i) {
    absl::StrAppend(&out,
                    HeaderBlock(messages[i].role, StripUnicodeWhitespace(messages[i].content)));
  }
  if (options.add_generation_prompt) {
    absl::StrAppend(&out, "<|start_header_id|>assistant<|end_header_id|>\n\n");
  }
  return out;
}

}  // namespace sparseaccel
