#include "common/log.h"

#include <gtest/gtest.h>

namespace sparseaccel {
namespace {

TEST(LogTest, FormatsFieldsAsKeyValue) {
  const std::string line =
      FormatLogLine(LogLevel::kInfo, "prefill_done", {{"tokens", 4096}, {"model", "tiny"}});
  EXPECT_NE(line.find(" INFO prefill_done tokens=4096 model=tiny\n"), std::string::npos) << line;
}

TEST(LogTest, QuotesValuesWithSpacesAndEscapesQuotes) {
  const std::string line =
      FormatLogLine(LogLevel::kError, "bad_request", {{"why", "prompt is \"empty\""}});
  EXPECT_NE(line.find("why=\"prompt is \\\"empty\\\"\""), std::string::npos) << line;
}

TEST(LogTest, DropsMessagesBelowMinimumLevel) {
  SetMinLogLevel(LogLevel::kWarning);
  EXPECT_EQ(MinLogLevel(), LogLevel::kWarning);
  SetMinLogLevel(LogLevel::kInfo);
  EXPECT_EQ(MinLogLevel(), LogLevel::kInfo);
}

}  // namespace
}  // namespace sparseaccel
