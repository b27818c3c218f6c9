#ifndef SPARSEACCEL_MODEL_TEXT_CHAT_TEMPLATE_H_
#define SPARSEACCEL_MODEL_TEXT_CHAT_TEMPLATE_H_

// Llama 3 chat prompts, rendered in C++ to exactly the text that transformers'
// `apply_chat_template` renders from the model's Jinja chat_template (no Jinja engine here).
// The template text is recognised by its content:
// - Llama 3.1 / 3.2 style ("Cutting Knowledge Date" and `date_string`): BOS, then a system
//   block always ("Cutting Knowledge Date: December 2023\nToday Date: <date>\n\n" + the first
//   message's content if its role is system), then one header block per message, then the
//   assistant header when a generation prompt is asked for. The date defaults to the
//   template's literal fallback (3.1: "26 Jul 2024").
// - Llama 3 style (per-message `<|start_header_id|>` loop, BOS before the first message).
// Any other template is an Unimplemented error.
// Not supported (an error): tools, builtin_tools, tool calls and the ipython / tool roles.
// Roles are system, user and assistant; message content is trimmed of Unicode whitespace as
// Jinja's `trim` (Python's str.strip) does.

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace sparseaccel {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant".
  std::string content;
};

struct ChatOptions {
  // Ends the prompt with the assistant header, so the model writes the reply next.
  bool add_generation_prompt = true;
  // Overrides the Llama 3.1 template's date_string when not empty (e.g. "22 Nov 2026").
  std::string date_string;
};

class ChatTemplate {
 public:
  // `template_text` is tokenizer_config.json's chat_template; `bos_token` its bos_token.
  static absl::StatusOr<ChatTemplate> FromConfig(absl::string_view template_text,
                                                 absl::string_view bos_token);

  absl::StatusOr<std::string> Render(const std::vector<ChatMessage>& messages,
                                     const ChatOptions& options = {}) const;

 private:
  ChatTemplate() = default;

  bool has_system_header_ = false;  // Llama 3.1 style.
  std::string default_date_;
  std::string bos_token_;
};

// Python's str.strip(): removes leading and trailing characters with str.isspace().
std::string StripUnicodeWhitespace(absl::string_view text);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_TEXT_CHAT_TEMPLATE_H_
