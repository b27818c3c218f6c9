#ifndef SPARSEACCEL_COMMON_LOG_H_
#define SPARSEACCEL_COMMON_LOG_H_

// Structured logging: one line per event on stderr, `key=value` fields after a fixed prefix, so
// that both people and log collectors (Loki, Fluent Bit's logfmt parser) can read them.
//
//   LogInfo("prefill_done", {{"request_id", id}, {"tokens", n}, {"ms", ms}});
//   -> 2026-11-22T14:03:11.123Z INFO prefill_done request_id=ab12 tokens=4096 ms=812.5

#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace sparseaccel {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// One `key=value` field. The value is formatted on construction.
struct LogField {
  template <typename T>
  LogField(std::string_view k, const T& v) : key(k), value(absl::StrCat(v)) {}
  LogField(std::string_view k, std::string_view v) : key(k), value(v) {}
  LogField(std::string_view k, const char* v) : key(k), value(v) {}
  LogField(std::string_view k, bool v) : key(k), value(v ? "true" : "false") {}
  std::string key;
  std::string value;
};

// Messages below this level are dropped. Default kInfo; SPARSEACCEL_LOG_LEVEL=debug|info|
// warning|error in the environment overrides it at start-up.
void SetMinLogLevel(LogLevel level);
LogLevel MinLogLevel();

// Formats one line (without writing it); values with spaces, quotes or '=' are quoted.
std::string FormatLogLine(LogLevel level, std::string_view event,
                          std::initializer_list<LogField> fields);

// Writes one line to stderr atomically (one write call).
void Log(LogLevel level, std::string_view event, std::initializer_list<LogField> fields = {});

inline void LogDebug(std::string_view event, std::initializer_list<LogField> fields = {}) {
  Log(LogLevel::kDebug, event, fields);
}
inline void LogInfo(std::string_view event, std::initializer_list<LogField> fields = {}) {
  Log(LogLevel::kInfo, event, fields);
}
inline void LogWarning(std::string_view event, std::initializer_list<LogField> fields = {}) {
  Log(LogLevel::kWarning, event, fields);
}
inline void LogError(std::string_view event, std::initializer_list<LogField> fields = {}) {
  Log(LogLevel::kError, event, fields);
}

// A request's status for its log line: "OK", or the code's name, followed by the message
// only for codes about the server's side. INVALID_ARGUMENT and OUT_OF_RANGE messages can quote
// the request (a token id, a stop string): they go to the client, never into logs.
std::string StatusForLog(const absl::Status& status);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_COMMON_LOG_H_
